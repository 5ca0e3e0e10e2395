"""
The plumbing every script shares: user errors, devices, building a model by
name, checkpoints that cannot be half-written, and text generation through a
model's recurrent step.

Read newllm.py and transformer.py first; this file only connects them to
train.py, sample.py, experiments.py and bench.py.
"""

import argparse
import os
import sys
import zipfile
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from newllm import NewLLM, NewLLMConfig
from transformer import Transformer, TransformerConfig

# Every architecture behind one flag: name -> (config class, model class).
ARCHS = {
    "newllm": (NewLLMConfig, NewLLM),
    "transformer": (TransformerConfig, Transformer),
}


class UserError(Exception):
    """A mistake in what the user asked for. Scripts print it as one line and exit 2."""


def run_script(main, io_note=""):
    """Run a script's main(): a user's mistake or an I/O failure ends as one line on stderr, no traceback.
    io_note is added to an I/O failure's line (train.py: its checkpoints are written atomically)."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {error.strerror or error} ({error.filename or 'I/O'}){io_note}", file=sys.stderr)
        sys.exit(1)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one UserError line instead of a usage screen."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


# -----------------------------------------------------------------------------
# devices

def pick_device(name):
    """'auto' -> cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine has no Apple GPU (try --device auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}' (choose auto, cpu, cuda or mps)")
    return torch.device(name)


# -----------------------------------------------------------------------------
# models by name

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


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, checkpoint):
    """Write atomically: a temporary file in the same folder, flushed, then renamed.

    os.replace is atomic on POSIX and Windows, so a run killed at any moment
    leaves either the old checkpoint or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; anything else is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"arch", "model_config", "model", "tokenizer"} <= checkpoint.keys():
        raise UserError(f"{path} is not a New-LLM lab checkpoint")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """Rebuild the model a checkpoint describes and load its weights."""
    model = build_model(checkpoint["arch"], **checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model


def model_config_dict(model):
    return asdict(model.config)


# -----------------------------------------------------------------------------
# generation through the recurrent step (context vector or KV cache)

@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None):
    """Continue each row of `prompt` (B, T0) by max_new_tokens tokens, one step at a time.

    The prompt is fed through model.step too, so generation never re-reads the
    past: New-LLM carries one context vector, the Transformer its KV cache.
    A model with a learned position table (model.max_len) cannot step past it;
    there the state is rebuilt from the last half-table of tokens and goes on.
    """
    model.eval()

    def prefill(tokens):
        state = model.init_state(tokens.size(0), tokens.device)
        for t in range(tokens.size(1)):
            logits, state = model.step(tokens[:, t], state)
        return logits, state

    if model.max_len is not None and prompt.size(1) > model.max_len:
        raise UserError(f"the prompt is {prompt.size(1)} tokens; this model reads at most {model.max_len}")
    logits, state = prefill(prompt)
    out = [prompt]
    position = prompt.size(1)
    for _ in range(max_new_tokens):
        logits = logits.float() / max(temperature, 1e-6)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        next_token = torch.multinomial(probs, 1)  # (B, 1)
        out.append(next_token)
        if model.max_len is not None and position == model.max_len:
            logits, state = prefill(torch.cat(out, dim=1)[:, -(model.max_len // 2):])
            position = model.max_len // 2
        else:
            logits, state = model.step(next_token[:, 0], state)
            position += 1
    return torch.cat(out, dim=1)


def state_tensors(state):
    """Every tensor in a (nested) generation state: context vectors, conv windows, a KV cache."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from state_tensors(value)


def hardware(device):
    """A short description of where a run happened, for results tables."""
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (mps)"
    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{torch.get_num_threads()} threads of {name}"
