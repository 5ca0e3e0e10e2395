"""
Every architecture behind one name, so that train.py, sample.py, bench.py and the tests
never branch on which model they hold. Each model has the same interface:

    logits, loss = model(idx, targets=None)      # idx (B, T) -> logits (B, T, V); loss if targets given
    state = model.init_state(batch_size, device)  # the memory of the past before any token
    logits, state = model.step(token, state)      # one token (B,) -> next-token logits (B, V)
    model.max_len                                 # longest sequence it can read (None: unbounded)

    newllm       the report's model, one context vector (newllm.py)
    stack        the context stack: vector or matrix memories (stack.py)
    transformer  the GPT-style baseline (transformer.py)

    python train.py --arch stack --mixer matrix --dry-run     # build one and count its parameters
"""

from dataclasses import asdict

import torch

from checkpoint import FORMAT
from cli import UserError
from newllm import NewLLM, NewLLMConfig
from stack import ContextStack, StackConfig
from transformer import Transformer, TransformerConfig

ARCHS = {  # name -> (config class, model class)
    "newllm": (NewLLMConfig, NewLLM),
    "stack": (StackConfig, ContextStack),
    "transformer": (TransformerConfig, Transformer),
}


def build_model(arch, **config):
    """Build an architecture from its config fields; an impossible size is a UserError."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}' (choose {', '.join(ARCHS)})")
    config_class, model_class = ARCHS[arch]
    try:
        return model_class(config_class(**config))
    except ValueError as error:  # the configs validate themselves with ValueError
        raise UserError(str(error)) from None


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def model_config_dict(model):
    return asdict(model.config)


def use_reference(model, on=True):
    """Switch every layer that has a fast path to its readable definition (the tests and bench compare them):
    the context cell's literal loop, the scans' loops, the short convolution's loop, attention written out."""
    for module in model.modules():
        if hasattr(type(module), "reference"):
            module.reference = on
    return model


def state_tensors(state):
    """Every tensor in a (nested) generation state: context vectors and matrices, conv windows, a KV cache."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, (dict, list, tuple)):
        for value in state.values() if isinstance(state, dict) else state:
            yield from state_tensors(value)


def state_size(state):
    """Numbers the model carries from one token to the next."""
    return sum(t.numel() for t in state_tensors(state))


def state_bytes(state):
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


def model_from_checkpoint(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights (older layouts included)."""
    arch, config, weights = checkpoint["arch"], checkpoint["model_config"], checkpoint["model"]
    if checkpoint.get("format", 1) < FORMAT:
        arch, config, weights = from_single_file_layout(arch, config, weights)
    model = build_model(arch, **config)
    model.load_state_dict(weights)
    return model


def from_single_file_layout(arch, config, weights):
    """Format 1 checkpoints kept both New-LLM models under arch "newllm": the report's model with
    num_contexts 1, the stack with num_contexts >= 2. The same weights under today's names."""
    if arch != "newllm":
        return arch, config, weights
    config = dict(config)
    contexts = config.pop("num_contexts")
    if contexts >= 2:
        config.update(layers=contexts, mixer="vector")
        return "stack", config, {k.removeprefix("core.").replace(".mixer.conv.", ".conv."): v for k, v in weights.items()}
    if config.pop("gate") or config.pop("timescales"):
        raise UserError("this format 1 checkpoint holds the report's model with --gate, whose gate then had a "
                        "floor it no longer has: its outputs would change, so train it again")
    for name in ("short_conv", "local_window", "heads"):
        config.pop(name)
    return arch, config, {k.replace("core.", "cell.", 1): v for k, v in weights.items()}
