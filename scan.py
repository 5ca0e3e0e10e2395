"""
The vector context's recurrence, c_t = a_t * c_{t-1} + b_t (c_0 = 0), for every position:
the loop that defines it, and the chunked form that training runs (stack.py's vector mixer).

    sequential_scan   the definition, one position at a time: T steps
    parallel_scan     the same numbers, a chunk of 16 positions at a time, the chunks then joined
                      in ceil(log2(n)) rounds; its gradient is a scan run from the end, the same
                      way (ParallelScan)

Glossary: B batch, T positions, C channels, Q = CHUNK positions per chunk, n = ceil(T / Q).

Because a_t and b_t depend on the input only (never on c_{t-1}), the recurrence has a
closed form: with A_t = sum_{r<=t} log a_r,
    c_t = exp(A_t) * sum_{s<=t} b_s exp(-A_s).
Heinsen (2023) evaluates it in log space; here it is evaluated directly, one chunk at a
time, which is safe because A restarts at every chunk: exp(-A_s) stays below e^64 since
every keep gate is at least MIN_KEEP = e^-4 (16 positions x 4). Inside a chunk that is two
cumulative sums; rescaling by exp(A) adds no cancellation of its own, so the chunked form
is as accurate as the loop. test_models.py checks values and gradients against the loop.

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


def chunked_scan(log_a, b):
    """sequential_scan's values, a chunk of positions at a time, and each chunk's growth.

    Inside a chunk, with positions t = 1 .. Q, A_t = sum_{r<=t} log a_r counted from the
    chunk's start, growth_t = exp(A_t) and c_in the value carried in from the chunk before,
        c_t = growth_t * (c_in + sum_{s<=t} b_s / growth_s)
    is two cumulative sums. Then across_chunks carries c from one chunk into the next: the
    same recurrence, one level up, over the chunk ends. Values only: ParallelScan calls it with
    autograd off, so the in-place steps (fewer passes over memory) are safe.
    """
    B, T, C = b.shape
    growth = sums_within_chunks(chunks(log_a)).exp_()  # exp(A_t) >= e^-64: decay from the chunk's start to t
    local = sums_within_chunks(chunks(b) / growth).mul_(growth)  # every chunk scanned from c_in = 0
    c_in = across_chunks(local[:, :, -1], growth[:, :, -1])  # (B, n, C)
    c = local.addcmul_(growth, c_in[:, :, None])
    return c.reshape(B, -1, C)[:, :T], growth


class ParallelScan(torch.autograd.Function):
    """chunked_scan with its backward pass written out. Autograd would keep every intermediate of
    the chunked form and replay each step backwards; here the forward pass keeps three tensors
    (growth, b, c) and the gradient is itself a scan, run from the end.

    With g_t = dL/dc_t counted through every later position,
        g_t = grad_t + a_{t+1} g_{t+1},   dL/db_t = g_t,   dL/d(log a_t) = g_t a_t c_{t-1} = g_t (c_t - b_t).
    Inside a chunk (positions 1 .. Q, as in chunked_scan), a_{t+1} ... a_s = growth_s / growth_t, so
        g_t = (sum_{s>=t} grad_s growth_s + growth_Q g_in) / growth_t
    where g_in = a_{Q+1} g_{Q+1} comes in from the next chunk's first position. With total_i chunk
    i's whole sum (its s >= 1 sum) and decay_i its growth_Q, g_in_i = total_{i+1} + decay_{i+1} g_in_{i+1},
    and 0 after the last chunk: a sum towards each chunk's end (a product with a triangle of ones)
    and the recurrence over the chunks, last chunk first (across_chunks).
    """

    @staticmethod
    def forward(ctx, log_a, b):
        c, growth = chunked_scan(log_a, b)
        ctx.save_for_backward(growth, b, c)
        return c

    @staticmethod
    def backward(ctx, grad_c):
        growth, b, c = ctx.saved_tensors
        B, T, C = grad_c.shape
        to_end = sums_within_chunks(chunks(grad_c) * growth, to_end=True)  # sum_{s>=t} grad_s growth_s (B, n, Q, C)
        decay = growth[:, :, -1]  # growth_Q: each chunk's decay from its start to its end (B, n, C)
        g_in = across_chunks(to_end[:, :, 0], decay, last_first=True)  # to_end at t = 1 is total_i
        g = to_end.add_((decay * g_in)[:, :, None]).div_(growth).reshape(B, -1, C)[:, :T]
        # without --gate, log a is a constant and needs no gradient
        return (g * (c - b) if ctx.needs_input_grad[0] else None), g


def parallel_scan(log_a, b):
    """The same result as sequential_scan, a chunk of positions at a time (ParallelScan: forward and backward),
    for log_a >= log(MIN_KEEP), which stack.py's gate floors guarantee."""
    return ParallelScan.apply(log_a, b)


# -----------------------------------------------------------------------------
# small pieces


def chunks(x):
    """(B, T, C) -> (B, n, Q, C), with zeros after the last position where T is not a multiple of Q
    (b = 0 adds nothing, log a = 0 keeps everything). A view of x when no zeros are needed."""
    pad = (-x.size(1)) % CHUNK
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(1, (-1, CHUNK))


def sums_within_chunks(x, to_end=False):
    """Cumulative sums along each chunk of x (B, n, Q, C): from its start (s <= t), or towards its end
    (s >= t). A product with a Q x Q triangle of ones: one pass, where cumsum from the end needs two flips.
    In x's own precision even under autocast: a running sum in bfloat16 would drift. (So would one
    in TF32, which PyTorch leaves off for float32 products unless asked.)"""
    ones = torch.ones(CHUNK, CHUNK, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        return (ones.triu() if to_end else ones.tril()) @ x


def across_chunks(ends, decay, last_first=False):
    """The value carried into each chunk i = 0 .. n-1, (B, n, C): x_0 = 0 and x_i = ends_{i-1} + decay_{i-1} x_{i-1},
    or, last_first, x_{n-1} = 0 and x_i = ends_{i+1} + decay_{i+1} x_{i+1}. ends, decay: (B, n, C).

    The same recurrence as the scan's, one level up, solved by doubling. After the round with `span` = s,
        y_i = sum_{j = i-2s+1 .. i} decay_{j+1} ... decay_i * ends_j    and    a_i = decay_{i-2s+1} ... decay_i
    (indices below 0 left out), so once 2s >= n, y_i sums every chunk up to i: y_i = x_{i+1}.
    ceil(log2(n)) rounds of whole-tensor operations instead of n steps of one chunk each (and so nothing
    for torch.compile to unroll), and no division, so nothing can overflow however small the decays (a
    chunk's can be e^-64)."""
    if last_first:
        return across_chunks(ends.flip(1), decay.flip(1)).flip(1)
    y, a = ends, decay
    span = 1
    while span < y.size(1):
        # y_i = y_i + a_i y_{i-span} and a_i = a_i a_{i-span}, for every i >= span at once
        y = torch.cat([y[:, :span], torch.addcmul(y[:, span:], a[:, span:], y[:, :-span])], dim=1)
        a = torch.cat([a[:, :span], a[:, span:] * a[:, :-span]], dim=1)
        span *= 2
    return F.pad(y[:, :-1], (0, 0, 1, 0))  # carried into chunk i: everything up to chunk i - 1
