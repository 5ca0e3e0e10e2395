"""
What every command-line script shares: a user's mistake ends as one line (never a
traceback), argparse reports a bad flag the same way, the device is chosen once, and on
Linux freed memory is kept for the next tensors.

Nothing here is about language models; read newllm.py first.
"""

import argparse
import ctypes
import sys
from contextlib import nullcontext
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake in what the user asked for. Scripts print it as one line and exit 2."""


def run_script(main, io_note=""):
    """Run a script's main(): a user's mistake or an I/O failure ends as one line on stderr, no traceback.
    io_note is added to an I/O failure's line (train.py: its checkpoints are written atomically)."""
    reuse_freed_memory()
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {error.strerror or error} ({error.filename or 'I/O'}){io_note}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as error:  # a size too large for this machine is a user's choice too
        message = str(error)
        if not isinstance(error, MemoryError) and "allocate" not in message and "out of memory" not in message:
            raise  # anything else is a bug: keep its traceback
        print(f"error: out of memory ({message.splitlines()[0][:160] if message else 'MemoryError'}); "
              "try a smaller --batch-size, --block-size or model", file=sys.stderr)
        sys.exit(2)


def reuse_freed_memory():
    """Ask glibc's allocator to keep the memory PyTorch frees and hand it to the next tensors.

    A training step allocates and frees the same large activations every step. By default
    glibc returns blocks that large to the system, and getting them back costs a page fault
    per 4 KiB the next time they are written: a large share of a stack's CPU step (docs/speed.md). Blocks of
    32 MiB and more always go back (the most glibc allows), so no tensor of a training step should reach
    that size. PyTorch's CPU performance guide gets the same by preloading jemalloc or tcmalloc.
    Elsewhere (macOS, musl, Windows) this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MiB (glibc's most) come from the reused heap
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # and freed memory stays there


def check_seed(seed):
    """torch.manual_seed takes 0 .. 2**63 - 1 here; anything else would end in a traceback."""
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63) (got {seed})")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one UserError line instead of a usage screen."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


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


def autocast_for(device, amp):
    """bfloat16 autocast on a CUDA GPU that computes in bfloat16 natively (compute capability 8.0 on: A100,
    H100, RTX 30xx and later), else none: float32, said in one line where --amp asked for more (a T4 or V100 only
    emulates bfloat16; float16 would need a gradient scaler this lab does not carry)."""
    if not amp or device.type != "cuda":
        return nullcontext()
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    print(f"note: {torch.cuda.get_device_name(device)} has no native bfloat16: training in float32")
    return nullcontext()


def hardware(device):
    """A short description of where a run happened, for results tables."""
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (mps)"
    try:  # the first processor's block of /proc/cpuinfo (Linux)
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        first = ""
    info = dict((key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in first.splitlines()))
    name = info.get("model name", "CPU")
    if "cpu family" in info:  # a model name alone can cover several generations
        avx512 = ", AVX-512" if "avx512f" in info.get("flags", "").split() else ""
        name += f" (family {info['cpu family']}, model {info.get('model', '?')}{avx512})"
    return f"{torch.get_num_threads()} threads of {name}"
