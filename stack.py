"""
The context stack: the report's proposed fixes (REPORT.md) built into one attention-free
model. Read newllm.py first; this is where its single context vector goes next.

    python train.py --preset best-newllm-cpu                  # the best vector stack, ~0.8M parameters
    python train.py --preset best-matrix-cpu                  # the context-matrix stack, same size

Glossary (sizes in brackets after an equation are the vector's length)
    B batch size    T sequence length    V vocabulary size    E embed_dim    H hidden_dim (MLP)
    L layers (blocks, one memory each)   C context_dim        K short_conv (kernel width)
    nh context_heads (matrix mixer)      dv = C / nh value width per head
    dk key_dim (matrix mixer: key and query width per head; dv when not given, a square matrix)
    w local_window (the hybrid only)     N state_dim (mamba mixer: state numbers per channel)

What changes from newllm.py. The report's model reads c_{t-1} through its whole FNN, so
training must visit the positions one by one. Here every gate and value is computed from
the block's input u_t alone, never from the memory, so the memory can be computed for all
positions at once (scan.py, delta_rule.py), and the model is a stack of L residual blocks
shaped like a Transformer's with attention replaced by a memory ("several context vectors",
the report's fix 1):
    u_t = conv(LN(x))_t           --short-conv K: a causal depthwise conv over the last K inputs
    x  += W_o (norm(m_t) * silu(W_r u_t))   the memory's answer m_t, gated by the input (Mixer)
    x  += MLP(LN(x))

The memory, chosen by --mixer:
  vector  one context vector per block (the report's fix 4, the gate; as minGRU and HGRN gate):
            a_t = f + (1 - f) sigmoid(W_a u_t)     keep gate (--gate), with a floor f >= MIN_KEEP
            c_t = a_t * c_{t-1} + (1 - a_t) * W_v u_t                                        (C)
            c_t = c_{t-1} + W_v u_t                without --gate: the report's plain addition
            m_t = c_t
          The floor keeps the chunked scan inside float32's range (scan.py). --timescales raises
          it per channel, from ~0 (forgets at once) to ~1 (remembers about T tokens): fast and
          slow contexts by construction (the report's fix 2, a hierarchy).
  matrix  one context matrix per head, written with the delta rule (DeltaNet; with --gate,
          Gated DeltaNet; delta_rule.py):
            q_t, k_t, v_t = W_q u_t, W_k u_t, W_v u_t, split into nh heads; q, k L2-normalised
            beta_t = sigmoid(W_b u_t)            how strongly to write (one per head)
            alpha_t = sigmoid(W_a u_t + 3)       keep gate (--gate; else 1)
            S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T                (dv x dk)
            m_t = S_t q_t                        the heads' answers side by side              (C)
          The vector can only add: c_t = a c_{t-1} + b_t blends each new fact into everything
          already there. The matrix stores each value under its own key: S + beta (v - S k) k^T
          replaces the entry for k_t and leaves the directions orthogonal to k_t untouched, so it
          can look a fact up (results/recall.md). Still fixed in size: nh * dv * dk numbers per
          block; --key-dim gives the keys more room than the values.
  mamba   Mamba's selective state space: N numbers per channel, decays chosen by the input (mamba.py)
  --local-window w  the hybrid (the report's fix 3): each block also attends to its last w
          positions (sliding-window attention); its state is bounded by w, not by T.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from delta_rule import at_least_float32, delta_rule_chunked, delta_rule_step
from newllm import NewLLM, language_model_loss
from scan import MIN_KEEP, chunked_scan
from transformer import MLP, CausalSelfAttention

KEEP_OFFSET = 3.0  # the matrix keep gate starts near sigmoid(3) = 0.95: remember unless told to forget

# -----------------------------------------------------------------------------
# small pieces: the short convolution and the gate floors


class ShortConv(nn.Module):
    """Causal depthwise convolution: u_t = bias + sum_j weight_j * x_{t-K+1+j}, channel by channel."""

    def __init__(self, channels, width):
        super().__init__()
        bound = 1 / math.sqrt(width)  # PyTorch's default for a depthwise Conv1d
        self.weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))  # (E, K), oldest first
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x, recent=None):
        """x (B, T, E) and the K - 1 inputs before it (carried from the window before; zeros when not given)."""
        T, K = x.size(1), self.weight.size(1)
        padded = F.pad(x, (0, 0, K - 1, 0)) if recent is None else torch.cat([recent, x], dim=1)  # (B, T + K - 1, E)
        u = self.bias
        for j in range(K):
            u = u + padded[:, j : j + T] * self.weight[:, j]
        return u  # (B, T, E)

    def step(self, x, recent):
        """x (B, E) and the last K - 1 inputs (B, K - 1, E) -> u (B, E) and the new last K - 1 inputs."""
        window = torch.cat([recent, x[:, None]], dim=1)  # (B, K, E), oldest first
        return self.bias + (window * self.weight.T).sum(dim=1), window[:, 1:]


def gate_floors(channels, timescales, longest):
    """Per-channel floors f of the keep gate a = f + (1 - f) * sigmoid(.), never below MIN_KEEP.

    With --timescales, channel i cannot forget faster than a half-life h_i; the half-lives
    run geometrically from 1/8 token (f ~ 0) to `longest` tokens (f ~ 1): f = 0.5 ** (1 / h).
    Without it every floor is MIN_KEEP, the least the chunked scan can carry (scan.py).
    """
    if not timescales:
        return torch.full((channels,), MIN_KEEP)
    half_lives = torch.logspace(math.log10(0.125), math.log10(max(longest, 2)), channels)  # longest >= 2: a range
    return (0.5 ** (1.0 / half_lives)).clamp(min=MIN_KEEP)  # (C,)


# -----------------------------------------------------------------------------
# the two memories: a context vector, a context matrix


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
        self.norm = nn.LayerNorm(C) if config.context_norm else nn.Identity()  # keeps m_t at one scale
        self.proj = nn.Linear(C, E)
        self.fast_inputs = None  # fast.py's input projection, padded to a multiple of 16 rows; None: as written
        self.fast = None  # fast.py's form of the memory's recurrence (the scan, the delta rule); None: as written

    def inputs(self, u):
        """W u_t, split into pieces of self.sizes."""
        return (self.fast_inputs or self.to_inputs)(u).split(self.sizes, dim=-1)

    def read_out(self, m, read):
        """m (..., C): what the memory returns; read (..., C): the read gate's input W_r u_t -> (..., E)."""
        return self.proj(self.norm(m.to(read.dtype)) * F.silu(read))


class VectorMixer(Mixer):
    """One context vector per block, written from the block's input only, read out gated."""

    def __init__(self, config):
        # r_t (read gate), v_t (value) and, with --gate, the keep gate's logit: C each
        super().__init__(config, [config.context_dim] * (3 if config.gate else 2))
        self.register_buffer("floor", gate_floors(config.context_dim, config.timescales, config.block_size),
                             persistent=False)

    def coefficients(self, u):
        """u (..., E) -> a_t and 1 - a_t (None without --gate), v_t (float32) and the read gate's input."""
        read, value, *gate = self.inputs(u)
        value = at_least_float32(value)  # the scan sums many terms: never in bfloat16
        if not gate:
            return None, None, value, read
        z = at_least_float32(gate[0])
        keep = self.floor + (1 - self.floor) * torch.sigmoid(z)  # a_t, never below the floor
        write = (1 - self.floor) * torch.sigmoid(-z)  # 1 - a_t, without the rounding of 1 - keep near 1
        return keep, write, value, read

    def forward(self, u, context=None):  # step's work for a whole window: c_0 (B, C), or None for 0
        keep, write, value, read = self.coefficients(u)  # (B, T, C) each
        if keep is None:  # the report's plain addition: c_t = c_{t-1} + v_t
            log_a, b = torch.zeros_like(value), value
        else:  # c_t = a_t c_{t-1} + (1 - a_t) v_t
            log_a, b = keep.log(), write * value
        c = chunked_scan(log_a, b, context)  # c_t at every position at once (scan.py)
        return self.read_out(c, read), c[:, -1]  # (B, T, E), and c_T

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.config.context_dim, device=device)  # c_0 = 0

    def step(self, u, context):
        keep, write, value, read = self.coefficients(u)
        context = context + value if keep is None else keep * context + write * value
        return self.read_out(context, read), context


class MatrixMixer(Mixer):
    """One dv x dk context matrix per head, written with the (gated) delta rule, read out gated."""

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
        q, k = F.normalize(at_least_float32(qk).unflatten(-1, (2 * nh, -1)), dim=-1).chunk(2, dim=-2)  # (..., nh, dk)
        v = v.unflatten(-1, (nh, -1))  # (..., nh, dv)
        beta, *alpha = at_least_float32(gates).split(nh, dim=-1)
        log_alpha = F.logsigmoid(alpha[0] + KEEP_OFFSET) if alpha else None
        return q, k, v, torch.sigmoid(beta), log_alpha, read

    def forward(self, u, memory=None):
        q, k, v, beta, log_alpha, read = self.coefficients(u)  # (B, T, nh, dk or dv) and (B, T, nh)
        q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))  # heads first: (B, nh, T, ...)
        log_alpha = log_alpha.transpose(1, 2) if log_alpha is not None else None
        recalled, memory = (self.fast or delta_rule_chunked)(q, k, v, beta, log_alpha, initial=memory)  # m_t = S_t q_t
        return self.read_out(recalled.transpose(1, 2).flatten(2), read), memory  # m_t = S_t q_t read out, and S_T

    def init_state(self, batch_size, device):
        nh, dk = self.config.context_heads, self.config.key_dim
        return torch.zeros(batch_size, nh, self.config.context_dim // nh, dk, device=device)  # S_0 = 0: (B, nh, dv, dk)

    def step(self, u, memory):
        q, k, v, beta, log_alpha, read = self.coefficients(u)
        recalled, memory = delta_rule_step(memory, q, k, v, beta, log_alpha)  # (B, nh, dv), (B, nh, dv, dk)
        return self.read_out(recalled.flatten(1), read), memory


class LocalAttention(CausalSelfAttention):
    """The hybrid's attention (--local-window w): the Transformer's, restricted to the last w positions
    (sliding-window attention)."""

    def __init__(self, config):
        super().__init__(config)
        self.window = config.local_window

    def forward(self, x):
        t = torch.arange(x.size(1), device=x.device)
        lag = t[:, None] - t[None, :]  # (T, T): how far back key s is from query t
        return super().forward(x, allowed=(lag >= 0) & (lag < self.window))

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
        if config.mixer == "mamba":
            from mamba import MambaMixer  # here, not at the top: mamba.py builds on this file's Mixer
            self.mixer = MambaMixer(config)
        else:
            self.mixer = VectorMixer(config) if config.mixer == "vector" else MatrixMixer(config)
        self.local = LocalAttention(config) if config.local_window > 0 else None
        self.ln_mlp = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, state=None):
        """state (--carry-state): where the window before ended; replaced in place by where this one ends, gradient cut."""
        normed = self.ln_mix(x)
        u = self.conv(normed, state and state["recent"]) if self.conv is not None else normed
        mixed, memory = self.mixer(u, state and state["memory"])
        if self.local is not None:  # (its window of keys and values is not carried: train.py refuses --carry-state)
            mixed = mixed + self.local(normed)
        if state is not None:
            recent = torch.cat([state["recent"], normed], dim=1)[:, normed.size(1):]  # the conv's last K - 1 inputs
            state.update(memory=memory.detach().clone(), recent=recent.detach().clone())  # clone: not their windows
        x = x + self.drop(mixed)
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def init_state(self, batch_size, device):
        E = self.ln_mix.normalized_shape[0]
        K = self.conv.weight.size(1) if self.conv is not None else 1
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
    state_dim: int = 16                 # N: mamba mixer: numbers of state per channel
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

    def forward(self, idx, targets=None, state=None):
        """idx (B, T) -> logits (B, T, V) and the mean cross-entropy; with a state, reads on from it as step would."""
        x = self.embed(idx, state["position"] if state is not None else 0)  # (B, T, E)
        for i, block in enumerate(self.blocks):
            x = block(x, state and state["blocks"][i])
        if state is not None:
            state["position"] += idx.size(1)
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
