"""
Mamba's memory, the selective state space (Gu and Dao 2023), as the context stack's mixer:
`--mixer mamba`. Read stack.py first: this is its vector mixer with N numbers per channel in
place of one, and a decay chosen per channel and per state number.

    python train.py --preset mamba-cpu                       # matched to transformer-cpu
    python train.py --arch stack --mixer mamba --state-dim 16

Glossary (as stack.py): B batch, T positions, E embed_dim, C context_dim (channels), N state_dim.

Per channel i, a state h_t[i] of N numbers, written and read through the block's input u_t:
    x_t = W_x u_t                                      the channels' inputs          (C)
    Delta_t = softplus(W_Delta u_t + b_Delta)          each channel's step size      (C)
    B_t, C_t = W_B u_t, W_C u_t                        where to write, what to read  (N each)
    A = -exp(A_log)                                    decay rates, learned          (C x N)
    h_t = exp(Delta_t A) * h_{t-1} + Delta_t x_t B_t                                 (C x N)
    y_t = h_t C_t + D * x_t                            the memory's answer           (C)
and the block reads y_t out through the stack's gate, W_o (norm(y_t) * silu(W_r u_t)).
Delta_t is the selection: a large step forgets h and writes x_t in; a small one keeps h and
lets the token pass by. With N = 1, A = -1 and B_t = C_t = 1 it is close to the vector mixer's
gate: the same keep a_t = sigmoid(-z), but the write is Delta_t = softplus(z) (not 1 - a_t), plus D x_t.

Training: h_t is C * N independent recurrences, scan.py's c_t = a_t c_{t-1} + b_t side by side, with
a_t = exp(Delta_t A) and b_t = Delta_t x_t B_t, so selective_scan runs chunked_scan over all of them at once.
As with the vector mixer's gate, a_t has the floor MIN_KEEP that scan needs (scan.py):
a_t = MIN_KEEP + (1 - MIN_KEEP) exp(Delta_t A). Mamba's own step may wipe a state number in one
token; this one keeps at least e^-4 of it. State per block: C * N numbers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from delta_rule import at_least_float32
from scan import MIN_KEEP, chunked_scan
from stack import Mixer

STEP_RANGE = (1e-3, 1e-1)  # Delta_t starts log-uniform in this range, channel by channel (Mamba's initialisation)


def transition(x, delta, B, A_log):
    """The coefficients of h_t = a_t h_{t-1} + b_t, (..., C, N) each: log a_t, with its floor, and
    b_t = Delta_t x_t B_t."""
    decay = delta[..., None] * -at_least_float32(A_log).exp()  # Delta_t A, <= 0
    # log a_t = log(MIN_KEEP + (1 - MIN_KEEP) exp(Delta_t A)), computed in log space
    log_a = torch.logaddexp(decay.new_tensor(math.log(MIN_KEEP)), math.log1p(-MIN_KEEP) + decay)
    return log_a, (delta * x)[..., None] * B[..., None, :]


def selective_scan(x, delta, B, C, A_log, h0=None):
    """Every h_t at once, read out: x_t, Delta_t (batch, T, C), B_t, C_t (batch, T, N), h_0 (batch, C, N) or None
    for 0 -> h_t C_t for every t (y_t before D x_t), (batch, T, C), and h_T (batch, C, N)."""
    log_a, b = transition(x, delta, B, A_log)  # (batch, T, C, N) each
    h = chunked_scan(log_a.flatten(2), b.flatten(2), None if h0 is None else h0.flatten(1)).unflatten(2, b.shape[2:])
    return (h * C[..., None, :]).sum(-1), h[:, -1]


class MambaMixer(Mixer):
    """C channels, each a state of N numbers with its own decays, written and read by the input."""

    def __init__(self, config):
        C, N = config.context_dim, config.state_dim
        # in order: r_t (the read gate's input), x_t, Delta_t's logit (C each), B_t, C_t (N each)
        super().__init__(config, [C, C, C, N, N])
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(C, 1))  # A = -1 .. -N (S4D-real)
        self.A_log.no_weight_decay = True  # decay rates, not weights: pulling them to 0 would make every A = -1
        self.D = nn.Parameter(torch.ones(C))
        low, high = STEP_RANGE
        step = torch.exp(torch.rand(C) * (math.log(high) - math.log(low)) + math.log(low))
        with torch.no_grad():  # b_Delta = softplus^-1(step): the step sizes start in STEP_RANGE
            self.to_inputs.bias[2 * C : 3 * C] = step + torch.log(-torch.expm1(-step))

    def coefficients(self, u):
        """u (..., E) -> x_t, Delta_t (..., C), B_t, C_t (..., N), at least float32; and the read gate's input."""
        read, *rest = self.inputs(u)
        x, delta, B, C = map(at_least_float32, rest)  # the scan sums many terms: never in bfloat16
        return x, F.softplus(delta), B, C, read

    def forward(self, u, h=None):
        x, delta, B, C, read = self.coefficients(u)  # (batch, T, C) twice, (batch, T, N) twice
        read_h, h_end = (self.fast or selective_scan)(x, delta, B, C, self.A_log, h)  # h_t C_t for every t; h_T
        return self.read_out(read_h + self.D * x, read), h_end  # y_t = h_t C_t + D x_t, read out: (B, T, E)

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.config.context_dim, self.config.state_dim, device=device)  # h_0 = 0

    def step(self, u, h):
        x, delta, B, C, read = self.coefficients(u)
        log_a, b = transition(x, delta, B, self.A_log)
        h = log_a.exp() * h + b  # (B, C, N)
        return self.read_out((h * C[..., None, :]).sum(-1) + self.D * x, read), h
