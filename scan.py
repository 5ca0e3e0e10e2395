"""
The vector context's recurrence, c_t = a_t * c_{t-1} + b_t (c_0 = 0, or carried in), for every position:
the loop that defines it, and the chunked form that training runs (stack.py's vector mixer).

    sequential_scan   the definition, one position at a time: T dependent steps
    chunked_scan      the same numbers, SCAN_CHUNK positions at a time, the chunks then joined by
                      doubling (a Hillis-Steele scan) in ceil(log2 n) rounds; autograd differentiates it

Glossary: B batch, T positions, C channels, Q = SCAN_CHUNK positions per chunk, n = ceil(T / Q).

Because a_t and b_t depend on the input only (never on c_{t-1}), the recurrence has a closed
form (Martin and Cundy 2018; Heinsen 2023 evaluates it in log space): with A_t = sum_{r<=t} log a_r,
    c_t = exp(A_t) * sum_{s<=t} b_s exp(-A_s).
Here it is evaluated directly, one chunk at a time, which is safe because A restarts at every
chunk: exp(-A_s) stays below e^64 since every keep gate is at least MIN_KEEP = e^-4 (16
positions x 4). test_models.py checks values and gradients against the loop.

The context matrix's recurrence (the delta rule) has its own file: delta_rule.py.
"""

import math

import torch
import torch.nn.functional as F

SCAN_CHUNK = 16
MIN_KEEP = math.exp(-64 / SCAN_CHUNK)  # a_t >= e^-4 ~ 0.018: a chunk's decay, >= e^-64, stays within float32's range


def sequential_scan(log_a, b, initial=None):
    """The definition, one position at a time. log_a, b: (B, T, C), c_0 = initial (B, C) or 0 -> c: (B, T, C)."""
    context = torch.zeros_like(b[:, 0]) if initial is None else initial
    out = []
    for t in range(b.size(1)):
        context = log_a[:, t].exp() * context + b[:, t]
        out.append(context)
    return torch.stack(out, dim=1)


def chunked_scan(log_a, b, initial=None):
    """sequential_scan's values, a chunk of positions at a time, for log_a >= log(MIN_KEEP).

    Inside a chunk, with positions t = 1 .. Q, A_t counted from the chunk's start and c_in the
    value carried in from the chunk before,
        c_t = exp(A_t) * (c_in + sum_{s<=t} b_s exp(-A_s))
    is two cumulative sums. across_chunks then carries c from one chunk into the next: the
    same recurrence, one level up, over the chunk ends.
    """
    B, T, C = b.shape
    if initial is not None:  # c_1 = a_1 c_0 + b_1: a carried-in c_0 is one more term of b_1
        b = torch.cat([b[:, :1] + log_a[:, :1].exp() * initial[:, None], b[:, 1:]], dim=1)
    A = chunks(log_a).cumsum(2)  # (B, n, Q, C): log of the decay from the chunk's start to t, >= -64
    decay = A.exp()  # exp(A_t) <= 1
    local = decay * (chunks(b) * (-A).exp()).cumsum(2)  # every chunk scanned from c_in = 0
    c_in = across_chunks(local[:, :, -1], decay[:, :, -1])  # (B, n, C)
    c = local + decay * c_in[:, :, None]  # (B, n, Q, C)
    return c.reshape(B, -1, C)[:, :T]  # (B, T, C): the padding cut off


# -----------------------------------------------------------------------------
# small pieces


def chunks(x):
    """(B, T, C) -> (B, n, Q, C), with zeros after the last position where T is not a multiple of Q
    (b = 0 adds nothing, log a = 0 keeps everything)."""
    pad = (-x.size(1)) % SCAN_CHUNK
    return F.pad(x, (0, 0, 0, pad)).unflatten(1, (-1, SCAN_CHUNK))


def across_chunks(ends, decay):
    """The value carried into each chunk i = 0 .. n-1, (B, n, C): x_0 = 0 and x_i = ends_{i-1} + decay_{i-1} x_{i-1},
    where ends_i is chunk i's last value scanned from 0 and decay_i its decay from start to end. ends, decay: (B, n, C).

    Solved by doubling. After the round with span s,
        y_i = sum_{j = i-2s+1 .. i} decay_{j+1} ... decay_i * ends_j    and    a_i = decay_{i-2s+1} ... decay_i
    (indices below 0 left out), so once 2s >= n, y_i sums every chunk up to i: y_i = x_{i+1}. No
    division, so nothing overflows however small the decays (a chunk's can be e^-64)."""
    y, a = ends, decay
    span = 1
    while span < y.size(1):
        # y_i = y_i + a_i y_{i-span} and a_i = a_i a_{i-span}, for every i >= span at once
        y = torch.cat([y[:, :span], y[:, span:] + a[:, span:] * y[:, :-span]], dim=1)
        a = torch.cat([a[:, :span], a[:, span:] * a[:, :-span]], dim=1)
        span *= 2
    return F.pad(y[:, :-1], (0, 0, 1, 0))  # carried into chunk i: everything up to chunk i - 1
