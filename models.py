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
    lstm         the classic fixed-state language model (lstm.py)

    python train.py --arch stack --mixer matrix --dry-run     # build one and count its parameters
"""

from dataclasses import asdict

import torch

from cli import UserError
from fast import accelerate
from lstm import LSTM, LSTMConfig
from newllm import NewLLM, NewLLMConfig
from stack import ContextStack, StackConfig
from transformer import Transformer, TransformerConfig

ARCHS = {  # name -> (config class, model class)
    "newllm": (NewLLMConfig, NewLLM),
    "stack": (StackConfig, ContextStack),
    "transformer": (TransformerConfig, Transformer),
    "lstm": (LSTMConfig, LSTM),
}


def build_model(arch, fast=True, **config):
    """Build an architecture from its config fields, with fast.py's engine unless fast=False (--no-fast: the
    lesson files alone); an impossible size is a UserError."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}' (choose {', '.join(ARCHS)})")
    config_class, model_class = ARCHS[arch]
    config = config_class(**config)
    check_config(config)
    model = model_class(config)
    return accelerate(model) if fast else model


def check_config(config):
    """Sizes a model cannot have, refused as a UserError naming the flag (the lesson files assume sane sizes)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    c = asdict(config)
    for name in ("vocab_size", "block_size", "embed_dim", "context_dim", "hidden_dim", "layers", "heads",
                 "context_heads", "key_dim", "state_dim"):
        if c.get(name) is not None and c[name] < 1:
            raise UserError(f"{flag(name)} must be positive (got {c[name]})")
    if not 0 <= c["dropout"] < 1:
        raise UserError(f"--dropout must be in [0, 1) (got {c['dropout']})")
    if c.get("init", "gpt2") not in ("gpt2", "torch"):
        raise UserError(f"--init must be gpt2 or torch (got {c['init']})")
    if "heads" in c and (isinstance(config, TransformerConfig) or c.get("local_window")) and c["embed_dim"] % c["heads"]:
        raise UserError(f"--heads {c['heads']} must divide --embed-dim {c['embed_dim']}")
    if not isinstance(config, StackConfig):
        return
    if c["mixer"] not in ("vector", "matrix", "mamba"):
        raise UserError(f"--mixer must be vector, matrix or mamba (got {c['mixer']})")
    if c["context_dim"] % c["context_heads"]:
        raise UserError(f"--context-heads {c['context_heads']} must divide --context-dim {c['context_dim']}")
    if c["mixer"] != "matrix" and (c["context_heads"] != 1 or c["key_dim"] is not None):
        raise UserError(f"{'--context-heads' if c['context_heads'] != 1 else '--key-dim'} belongs to the matrix "
                        "mixer: add --mixer matrix")
    if c["timescales"] and not (c["gate"] and c["mixer"] == "vector"):
        raise UserError("--timescales shapes the vector mixer's gate: use --mixer vector --gate")
    if c["short_conv"] < 0 or c["local_window"] < 0:
        raise UserError("--short-conv and --local-window must be 0 (off) or positive")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def model_config_dict(model):
    return asdict(model.config)


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


def model_from_checkpoint(checkpoint, fast=True):
    """Rebuild the model a checkpoint describes and load its weights."""
    model = build_model(checkpoint["arch"], fast=fast, **checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model
