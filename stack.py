"""
The context stack: the report's proposed fixes (REPORT.md) built into one attention-free
model. Read newllm.py first; this is where its single context vector goes next.

    python train.py --preset best-newllm-cpu                  # the best vector stack, ~0.8M parameters
    python train.py --preset best-matrix-cpu                  # the context-matrix stack, same size
    python train.py --arch stack --mixer matrix --context-heads 2

Glossary (sizes in brackets after an equation are the vector's length)
    B batch size    T sequence length    V vocabulary size    E embed_dim    H hidden_dim (MLP)
    L layers (blocks, one memory each)   C context_dim        K short_conv (kernel width)
    nh context_heads (matrix mixer)      dv = C / nh value width per head
    dk key_dim (matrix mixer: key and query width per head; dv when not given, a square matrix)
    w local_window (the hybrid only)

What changes from newllm.py. The report's model reads c_{t-1} through its whole FNN, so
training must visit the positions one by one. Here every gate and value is computed from
the block's input u_t alone, never from the memory, so the memory can be computed for all
positions at once (scan.py, delta_rule.py), and the model is a stack of L residual blocks
shaped like a Transformer's with attention replaced by a memory ("several context vectors",
the report's fix 1):
    u_t = conv(LN(x))_t           --short-conv K: a causal depthwise conv over the last K inputs, so
                                  patterns a few characters long need not pass through the memory
    x  += W_o (norm(m_t) * silu(W_r u_t))   the memory's answer m_t, gated by the input (Mixer)
    x  += MLP(LN(x))

The memory, chosen by --mixer:
  vector  one context vector per block (the report's, with its fix 4, the gate):
            a_t = f + (1 - f) sigmoid(W_a u_t)     keep gate (--gate), with a floor f >= MIN_KEEP
            c_t = a_t * c_{t-1} + (1 - a_t) * W_v u_t                                        (C)
            c_t = c_{t-1} + W_v u_t                without --gate: the report's plain addition
            m_t = c_t
          The floor f keeps the parallel scan inside float32's range (scan.py). --timescales
          raises it per channel, from ~0 (forgets at once) to ~1 (remembers about T tokens):
          fast and slow contexts by construction (the report's fix 2, a hierarchy).
  matrix  one context matrix per head: a memory of key -> value associations, written with the
          delta rule (Widrow-Hoff; DeltaNet, Schlag et al. 2021 and Yang et al. 2024):
            q_t, k_t, v_t = W_q u_t, W_k u_t, W_v u_t, split into nh heads; q, k L2-normalised
            beta_t = sigmoid(W_b u_t)            how strongly to write (one per head)
            alpha_t = sigmoid(W_a u_t + 3)       keep gate (--gate, Gated DeltaNet; else 1)
            S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T                (dv x dk)
            m_t = S_t q_t                        the heads' answers side by side              (C)
          Why a matrix. The vector's update can only add: c_t = a c_{t-1} + b_t mixes the new
          fact into everything already there, and reading it back gives the blend. The matrix
          stores each value under its own key. S k_t is what the memory holds for k_t now, and
          the update S + beta_t (v_t - S k_t) k_t^T replaces that one entry by v_t, leaving
          the directions orthogonal to k_t untouched: it can look a fact up and overwrite it,
          which is what associative recall needs (results/recall.md). Its size is still fixed:
          nh * dv * dk numbers per block, whatever the length of the text. How many facts
          it can hold apart depends most on the keys' width dk (that many directions are
          orthogonal), so --key-dim can give the keys more room than the values, which only
          carry the answer; results/recall.md shows where that stops helping. The same
          parameters split into more, smaller heads go the other way: less recall, but more
          write strengths and keep gates, and a slightly lower loss on text
          (results/improvements.md, 8 heads against 2).
  --local-window w  the hybrid (the report's fix 3): each block also attends to its last w
          positions. The one variant with attention; its state is bounded by w, not by T.

Left out on purpose: no attention except the hybrid's window; no custom kernels (both
recurrences are plain PyTorch, so they also run on a laptop).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from delta_rule import at_least_float32, delta_rule_chunked, delta_rule_loop, delta_rule_step
from newllm import NewLLM, check_dropout, check_positive, language_model_loss
from scan import MIN_KEEP, parallel_scan, sequential_scan
from transformer import MLP, CausalSelfAttention, rows_padded

KEEP_OFFSET = 3.0  # the matrix keep gate starts near sigmoid(3) = 0.95: remember unless told to forget

# -----------------------------------------------------------------------------
# small pieces: the short convolution and the gate floors


class ShortConv(nn.Module):
    """Causal depthwise convolution: u_t = bias + sum_j weight_j * x_{t-K+1+j}, channel by channel."""

    reference = False  # True: the readable loop over taps below instead of CausalConv's written-out backward

    def __init__(self, channels, width):
        super().__init__()
        bound = 1 / math.sqrt(width)  # PyTorch's default for a depthwise Conv1d
        self.weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))  # (E, K), oldest first
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x):
        if not self.reference:
            return CausalConv.apply(x, self.weight, self.bias)
        T, K = x.size(1), self.weight.size(1)
        padded = F.pad(x, (0, 0, K - 1, 0))  # K - 1 zeros before the first position: (B, T + K - 1, E)
        u = self.bias
        for j in range(K):
            u = u + padded[:, j : j + T] * self.weight[:, j]
        return u  # (B, T, E)

    def step(self, x, recent):
        """x (B, E) and the last K - 1 inputs (B, K - 1, E) -> u (B, E) and the new last K - 1 inputs."""
        window = torch.cat([recent, x[:, None]], dim=1)  # (B, K, E), oldest first
        return self.bias + (window * self.weight.T).sum(dim=1), window[:, 1:]


class CausalConv(torch.autograd.Function):
    """ShortConv's forward pass, x (B, T, E), weight (E, K), bias (E) -> u (B, T, E), with its backward
    written out. Tap j looks `lag` = K - 1 - j positions back; the positions before the first have no
    input, so each tap touches only the T - lag positions that have one, and nothing is padded.
    Autograd through the loop above would keep a padded copy of x, and for every tap build a zero
    gradient the padded size and add them up: this does the same arithmetic in about half the passes
    over memory (test_models.py checks it against the loop).

    Each tap's E weights are copied into a row of their own first: weight[:, j] is a column, one
    number every K in memory, and an elementwise op whose last axis is strided like that runs
    unvectorised, about 4x slower than with the row (README, Speed)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        T, K = x.size(1), weight.size(1)
        rows = weight.T.contiguous()  # (K, E): tap j's weights side by side
        u = torch.addcmul(bias, x, rows[K - 1])  # the newest input, lag 0
        for j, lag in taps(K, T):
            u[:, lag:].addcmul_(x[:, : T - lag], rows[j])
        ctx.save_for_backward(x, rows)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u):
        x, rows = ctx.saved_tensors
        T, K = x.size(1), rows.size(0)
        grad_x = grad_u * rows[K - 1]
        grad_rows = torch.zeros_like(rows)  # stays 0 for taps that look back past the start: they see no input
        grad_rows[K - 1] = (grad_u * x).sum((0, 1))
        for j, lag in taps(K, T):  # x_s reaches u_{s + lag} through tap j
            grad_x[:, : T - lag].addcmul_(grad_u[:, lag:], rows[j])
            grad_rows[j] = (grad_u[:, lag:] * x[:, : T - lag]).sum((0, 1))
        return grad_x, grad_rows.T, grad_u.sum((0, 1))


def taps(K, T):
    """(tap, lag) for every tap but the newest that reaches back to an input: lag = K - 1 - tap < T."""
    return [(j, K - 1 - j) for j in range(K - 1) if K - 1 - j < T]


def gate_floors(channels, timescales, longest):
    """Per-channel floors f of the keep gate a = f + (1 - f) * sigmoid(.), never below MIN_KEEP.

    With --timescales, channel i cannot forget faster than a half-life h_i; the half-lives
    run geometrically from 1/8 token (f ~ 0) to `longest` tokens (f ~ 1): f = 0.5 ** (1 / h).
    Without it every floor is MIN_KEEP, the least the parallel scan can carry (scan.py).
    """
    if not timescales:
        return torch.full((channels,), MIN_KEEP)
    half_lives = torch.logspace(math.log10(0.125), math.log10(max(longest, 2)), channels)  # longest >= 2: a range
    return (0.5 ** (1.0 / half_lives)).clamp(min=MIN_KEEP)  # (C,)


# -----------------------------------------------------------------------------
# the two memories: a context vector, a context matrix


class UnitLength(torch.autograd.Function):
    """y = x / |x| along the last axis (F.normalize's result), with its gradient written out:
    dL/dx = (dL/dy - y (dL/dy . y)) / |x|, the part of dL/dy orthogonal to y, scaled: three passes over
    memory in the backward pass, where autograd through x * rsqrt(sum(x * x)) takes about seven
    (test_models.py checks it against F.normalize)."""

    @staticmethod
    def forward(ctx, x):
        inverse_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
        y = x * inverse_norm
        ctx.save_for_backward(y, inverse_norm)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y, inverse_norm = ctx.saved_tensors
        along_y = torch.linalg.vecdot(grad_y, y, dim=-1)[..., None]
        return torch.addcmul(grad_y, y, along_y, value=-1).mul_(inverse_norm)


unit_length = UnitLength.apply


class Mixer(nn.Module):
    """What both memories share: one input projection, and the gated read-out
    x += W_o (norm(m_t) * silu(W_r u_t)): the input decides, channel by channel, how much of
    what the memory returns passes into the residual stream (Mamba's and GLA's output gate)."""

    def __init__(self, config, sizes):
        super().__init__()
        E, C = config.embed_dim, config.context_dim
        self.config = config
        self.sizes = sizes  # the widths of the memory's per-position inputs, in the order `inputs` returns them
        self.to_inputs = nn.Linear(E, sum(sizes))  # all of them in one matmul
        self.extra = -sum(sizes) % 16  # zero rows that round it up to a multiple of 16 in training (as transformer.MLP)
        self.norm = nn.LayerNorm(C) if config.context_norm else nn.Identity()  # keeps m_t at one scale
        self.proj = nn.Linear(C, E)

    def inputs(self, u):
        """W u_t, split into pieces of self.sizes. In training it is computed with `extra` zero rows,
        as transformer.MLP does and for its reason: the matrix mixer's 516 outputs cost ~12% more
        than 528 (forward and backward, README, Speed); the extra piece is never read."""
        if not (self.extra and self.training):
            return self.to_inputs(u).split(self.sizes, dim=-1)
        return F.linear(u, *rows_padded(self.to_inputs, self.extra)).split([*self.sizes, self.extra], dim=-1)[:-1]

    def read_out(self, m, read):
        """m (..., C): what the memory returns; read (..., C): the read gate's input W_r u_t -> (..., E)."""
        return self.proj(self.norm(m.to(read.dtype)) * F.silu(read))


class VectorMixer(Mixer):
    """One context vector per block, written from the block's input only, read out gated."""

    reference = False  # True: sequential_scan (the loop) instead of parallel_scan

    def __init__(self, config):
        # r_t (read gate), v_t (value) and, with --gate, the keep gate's logit: C each
        super().__init__(config, [config.context_dim] * (3 if config.gate else 2))
        self.register_buffer("floor", gate_floors(config.context_dim, config.timescales, config.block_size),
                             persistent=False)

    def coefficients(self, u):
        """u (..., E) -> 1 - a_t (None without --gate), v_t (float32) and the read gate r_t, where
        c_t = a_t * c_{t-1} + (1 - a_t) * v_t, or c_{t-1} + v_t without the gate."""
        read, value, *gate = self.inputs(u)
        value = at_least_float32(value)  # the scan sums many terms: never in bfloat16
        if not gate:
            return None, value, read
        # 1 - a_t = (1 - f)(1 - sigmoid(.)) = (1 - f) sigmoid(-.): written without the cancellation of 1 - a_t
        write = (1 - self.floor) * torch.sigmoid(-at_least_float32(gate[0]))
        return write, value, read

    def forward(self, u):
        write, value, read = self.coefficients(u)  # (B, T, C) each
        if write is None:  # the report's plain addition: a_t = 1, b_t = v_t
            log_a, b = torch.zeros_like(value), value
        else:  # log a_t = log(1 - write), exact even where a_t is too close to 1 to round well
            log_a, b = torch.log1p(-write), write * value
        scan = sequential_scan if self.reference else parallel_scan
        return self.read_out(scan(log_a, b), read)  # c for every position at once, read out: (B, T, E)

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.config.context_dim, device=device)  # c_0 = 0

    def step(self, u, context):
        write, value, read = self.coefficients(u)
        # a_t c_{t-1} + (1 - a_t) v_t: a step from c_{t-1} towards v_t
        context = context + value if write is None else torch.lerp(context, value, write)
        return self.read_out(context, read), context


class MatrixMixer(Mixer):
    """One dv x dk context matrix per head, written with the (gated) delta rule, read out gated."""

    reference = False  # True: delta_rule_loop (the definition) instead of delta_rule_chunked

    def __init__(self, config):
        # in order: r_t (C), q_t and k_t (nh * dk each), v_t (C), beta_t's and (--gate) alpha_t's logits (nh each)
        nh, keys = config.context_heads, config.context_heads * config.key_dim
        super().__init__(config, [config.context_dim, 2 * keys, config.context_dim, (2 if config.gate else 1) * nh])

    def coefficients(self, u):
        """u (..., E) -> q, k (..., nh, dk) of unit length, v (..., nh, dv); beta, log alpha (..., nh); read gate r_t."""
        nh = self.config.context_heads
        read, qk, v, gates = self.inputs(u)
        # unit keys make k k^T a projection, so the delta rule's write can never blow the memory up;
        # unit queries read every head on the same scale
        q, k = unit_length(at_least_float32(qk).unflatten(-1, (2 * nh, -1))).chunk(2, dim=-2)  # (..., nh, dk) each
        v = v.unflatten(-1, (nh, -1))  # (..., nh, dv)
        beta, *alpha = at_least_float32(gates).split(nh, dim=-1)
        log_alpha = F.logsigmoid(alpha[0] + KEEP_OFFSET) if alpha else None
        return q, k, v, torch.sigmoid(beta), log_alpha, read

    def forward(self, u):
        q, k, v, beta, log_alpha, read = self.coefficients(u)  # (B, T, nh, dk or dv) and (B, T, nh)
        q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))  # heads first: (B, nh, T, ...)
        log_alpha = log_alpha.transpose(1, 2) if log_alpha is not None else None
        if self.reference:
            recalled = delta_rule_loop(q, k, v, beta, log_alpha)
        else:
            recalled = delta_rule_chunked(q, k, v, beta, log_alpha)
        return self.read_out(recalled.transpose(1, 2).flatten(2), read)  # m_t = S_t q_t (B, T, C), read out: (B, T, E)

    def init_state(self, batch_size, device):
        nh, dk = self.config.context_heads, self.config.key_dim
        return torch.zeros(batch_size, nh, self.config.context_dim // nh, dk, device=device)  # S_0 = 0: (B, nh, dv, dk)

    def step(self, u, memory):
        q, k, v, beta, log_alpha, read = self.coefficients(u)
        recalled, memory = delta_rule_step(memory, q, k, v, beta, log_alpha)  # (B, nh, dv), (B, nh, dv, dk)
        return self.read_out(recalled.flatten(1), read), memory


class LocalAttention(CausalSelfAttention):
    """The hybrid's attention (--local-window w): the Transformer's, restricted to the last w positions."""

    def __init__(self, config):
        super().__init__(config)
        self.window = config.local_window

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(E, dim=2))
        t = torch.arange(T, device=x.device)
        lag = t[:, None] - t[None, :]  # (T, T): how far back key s is from query t
        band = (lag >= 0) & (lag < self.window)
        if self.reference:
            y = self.attend_reference(q, k, v, allowed=band)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, E))

    def step(self, x, cache):
        y, (k, v) = super().step(x, cache)
        start = max(0, k.size(2) - (self.window - 1))  # keep w - 1 positions: with the next token, w in view
        return y, (k[:, :, start:], v[:, :, start:])


# -----------------------------------------------------------------------------
# a block, and the stack of them


class ContextBlock(nn.Module):
    """u = conv(LN(x));  x += mixer(u) [+ local attention(LN(x))];  x += MLP(LN(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_mix = nn.LayerNorm(config.embed_dim)
        self.conv = ShortConv(config.embed_dim, config.short_conv) if config.short_conv > 0 else None
        self.mixer = VectorMixer(config) if config.mixer == "vector" else MatrixMixer(config)
        self.local = LocalAttention(config) if config.local_window > 0 else None
        self.ln_mlp = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        normed = self.ln_mix(x)
        mixed = self.mixer(self.conv(normed) if self.conv is not None else normed)
        if self.local is not None:
            mixed = mixed + self.local(normed)
        x = x + self.drop(mixed)
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def init_state(self, batch_size, device):
        E, K = self.ln_mix.normalized_shape[0], self.conv.weight.size(1) if self.conv is not None else 1
        return {"memory": self.mixer.init_state(batch_size, device),  # the context vector or matrices
                "recent": torch.zeros(batch_size, K - 1, E, device=device),  # the conv's last K - 1 inputs
                "local": None}  # the hybrid's last w keys and values, once there are any

    def step(self, x, state):
        normed = u = self.ln_mix(x)
        if self.conv is not None:
            u, state["recent"] = self.conv.step(normed, state["recent"])
        mixed, state["memory"] = self.mixer.step(u, state["memory"])
        if self.local is not None:
            local, state["local"] = self.local.step(normed, state["local"])
            mixed = mixed + local
        x = x + mixed
        return x + self.mlp(self.ln_mlp(x)), state


@dataclass
class StackConfig:
    vocab_size: int = 65                # V: tokens read and predicted
    block_size: int = 128               # longest training sequence (rows of the position table, if any)
    embed_dim: int = 256                # E: width of the residual stream
    context_dim: int = 256              # C: the vector's size; the matrix mixer's q, k, v width (all heads)
    hidden_dim: Optional[int] = None    # H: MLP width; 4E when not given
    layers: int = 3                     # L: blocks, one context (vector or matrices) each
    dropout: float = 0.1                # on each residual branch
    mixer: str = "vector"               # "vector": a context vector; "matrix": delta-rule context matrices
    context_heads: int = 1              # nh: matrix mixer: heads, each a dv x dk matrix, dv = C/nh
    key_dim: Optional[int] = None       # dk: matrix mixer: key and query width per head; dv when not given
    gate: bool = True                   # keep gate a_t (vector) / alpha_t (matrix); off: plain writes
    context_norm: bool = True           # LayerNorm on what the memory returns, before the read gate
    short_conv: int = 4                 # K: causal depthwise conv width before the mixer (0 = off)
    timescales: bool = False            # vector mixer: per-channel gate floors, fast and slow channels
    local_window: int = 0               # w: the hybrid's attention window (0 = attention-free)
    heads: int = 4                      # the hybrid's attention heads
    pos_embed: bool = False             # learned positions (caps the length at block_size)

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.embed_dim
        if self.mixer == "matrix" and self.key_dim is None and self.context_heads > 0:
            self.key_dim = self.context_dim // self.context_heads  # square: dk = dv
        for name in ("vocab_size", "block_size", "embed_dim", "context_dim", "hidden_dim", "layers",
                     "context_heads", "heads"):
            check_positive(self, name)
        check_dropout(self.dropout)
        if self.mixer not in ("vector", "matrix"):
            raise ValueError(f"--mixer must be vector or matrix (got {self.mixer})")
        if self.context_dim % self.context_heads:
            raise ValueError(f"--context-heads {self.context_heads} must divide --context-dim {self.context_dim}")
        if self.mixer == "vector" and self.context_heads != 1:
            raise ValueError("--context-heads belongs to the matrix mixer: add --mixer matrix")
        if self.mixer == "vector" and self.key_dim is not None:
            raise ValueError("--key-dim belongs to the matrix mixer: add --mixer matrix")
        if self.mixer == "matrix":
            check_positive(self, "key_dim")
        if self.timescales and not (self.gate and self.mixer == "vector"):
            raise ValueError("--timescales shapes the vector mixer's gate: use --mixer vector --gate")
        if self.short_conv < 0 or self.local_window < 0:
            raise ValueError("--short-conv and --local-window must be 0 (off) or positive")
        if self.local_window and self.embed_dim % self.heads:
            raise ValueError(f"--heads {self.heads} must divide --embed-dim {self.embed_dim}")


class ContextStack(nn.Module):
    """Embeddings -> L context blocks -> LayerNorm -> token head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.block_size, config.embed_dim) if config.pos_embed else None
        self.blocks = nn.ModuleList([ContextBlock(config) for _ in range(config.layers)])
        self.ln_final = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.vocab_size)
        self.max_len = config.block_size if config.pos_embed else None  # None: generation may run on forever
        # PyTorch's default initialisation: here as good as GPT-2's

    embed = NewLLM.embed  # the report's model's embedding (it reads tok_emb, pos_emb and config.block_size)

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over scored targets."""
        x = self.embed(idx)  # (B, T, E)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_final(x))  # (B, T, V)
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size, device):
        """Every block's memory and conv window: the same size after 10 tokens or 10 million."""
        return {"position": 0, "blocks": [block.init_state(batch_size, device) for block in self.blocks]}

    @torch.inference_mode()  # no autograd bookkeeping at all: generation never differentiates
    def step(self, token, state):
        """token (B,) -> next-token logits (B, V), and the state after reading it."""
        x = self.embed(token[:, None], state["position"])[:, 0]  # (B, E)
        for i, block in enumerate(self.blocks):
            x, state["blocks"][i] = block.step(x, state["blocks"][i])
        state["position"] += 1
        return self.head(self.ln_final(x)), state
