"""
The vector context's recurrence, c_t = a_t * c_{t-1} + b_t (c_0 = 0), for every position:
the loop that defines it, and the chunked form that training runs (stack.py's vector mixer).

    sequential_scan   the definition, one position at a time: T steps
    parallel_scan     the same numbers, a chunk of 16 positions at a time: T/16 steps; its
                      gradient is the same chunked scan run backwards (ParallelScan)

Glossary: B batch, T positions, C channels, Q = CHUNK positions per chunk, n = ceil(T / Q).

Because a_t and b_t depend on the input only (never on c_{t-1}), the recurrence has a
closed form (Heinsen 2023): with A_t = sum_{r<=t} log a_r,
    c_t = exp(A_t) * sum_{s<=t} b_s exp(-A_s).
Inside a chunk that is two cumulative sums; exp(-A_s) stays below e^64 because every keep
gate is at least MIN_KEEP = e^-4 (16 positions x 4). test_models.py checks values and
gradients against the loop.

The context matrix's recurrence (the delta rule) has its own file: delta_rule.py.
"""

import math

import torch
import torch.nn.functional as F

MIN_KEEP = math.exp(-4)  # a_t >= e^-4 ~ 0.018: 16 positions of decay stay within float32's range
CHUNK = 16


def sequential_scan(log_a, b):
    """The definition, one position at a time. log_a, b: (B, T, C) -> c: (B, T, C)."""
    context = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.size(1)):
        context = log_a[:, t].exp() * context + b[:, t]
        out.append(context)
    return torch.stack(out, dim=1)


class ParallelScan(torch.autograd.Function):
    """parallel_scan with its backward pass written out: autograd would record and replay the dozen
    elementwise steps of the chunked form; the gradient is itself one scan, run backwards in time.

    With g_t = dL/dc_t counted through every later position,
        g_t = grad_t + a_{t+1} g_{t+1}     (a scan from the end, with the gates shifted by one)
        dL/db_t = g_t,   dL/d(log a_t) = g_t a_t c_{t-1} = g_t (c_t - b_t).
    """

    @staticmethod
    def forward(ctx, log_a, b):
        c = chunked_scan(log_a, b)
        ctx.save_for_backward(log_a, b, c)
        return c

    @staticmethod
    def backward(ctx, grad_c):
        log_a, b, c = ctx.saved_tensors
        next_log_a = F.pad(log_a[:, 1:], (0, 0, 0, 1))  # a_{t+1}; after the last position log a = 0 (a = 1)
        # is harmless: the reversed scan starts there from 0
        g = chunked_scan(next_log_a.flip(1), grad_c.flip(1)).flip(1)
        return g * (c - b), g


@torch.compiler.disable  # torch.compile would unroll the loop over chunks into its graph: minutes to compile
def parallel_scan(log_a, b):
    """The same result as sequential_scan, a chunk of positions at a time (ParallelScan: forward and backward).
    Under torch.compile it stays eager; the gates and the read-out around it are still compiled."""
    return ParallelScan.apply(log_a, b)


def chunked_scan(log_a, b):
    """sequential_scan's values, a chunk of positions at a time.

    Inside a chunk, with A_t = sum_{r<=t} log a_r counted from the chunk's start and c_in
    the value carried in from the previous chunk,
        c_t = exp(A_t) * (c_in + sum_{s<=t} b_s / exp(A_s))
    is two cumulative sums. Then a short loop over the chunk ends carries c from one
    chunk into the next. Values only: ParallelScan calls it with autograd off, so the
    in-place steps (fewer passes over memory) are safe.
    """
    B, T, C = b.shape
    pad = (-T) % CHUNK
    if pad:  # zeros at the end: b = 0 adds nothing and log a = 0 keeps everything
        log_a, b = F.pad(log_a, (0, 0, 0, pad)), F.pad(b, (0, 0, 0, pad))
    log_a, b = log_a.reshape(B, -1, CHUNK, C), b.reshape(B, -1, CHUNK, C)  # (B, n, Q, C)
    growth = log_a.cumsum(dim=2).exp_()  # exp(A_t) >= e^-64: decay from each chunk's start to position t
    local = torch.div(b, growth).cumsum_(dim=2).mul_(growth)  # every chunk scanned from c_in = 0
    decay, ends = growth[:, :, -1].unbind(1), local[:, :, -1].unbind(1)  # per chunk: total decay, end value
    starts = [torch.zeros_like(ends[0])]
    for i in range(len(ends) - 1):  # c at each chunk's start, chunk by chunk
        starts.append(torch.addcmul(ends[i], decay[i], starts[-1]))  # decay * start + end
    c = torch.addcmul(local, growth, torch.stack(starts, dim=1)[:, :, None])  # what came in from before
    return c.reshape(B, -1, C)[:, :T]
