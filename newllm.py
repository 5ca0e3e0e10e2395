"""
New-LLM: a language model with no attention. A fixed-size context vector
carries everything the model knows about the past and is updated token by
token, so the state never grows with the text.

Read this file top to bottom: the seed report's model first (one context
vector, SEED.md), then the pieces of the report's proposed improvements, then
the stack that combines them, then the NewLLM class that wraps either.

    python train.py --arch newllm --context-dim 256                  # the seed model
    python train.py --preset best-newllm-cpu                         # the best attention-free stack

Glossary
    B batch size     T sequence length (time)     V vocabulary size
    E embed_dim      C context_dim                H hidden_dim
    L layers (FNN depth of the one-context model) K num_contexts (blocks of the stack)
    S short_conv (kernel width)                   W local_window (hybrid only)

The seed model, --num-contexts 1 (SEED.md, "The New-LLM idea"):
    x_t      = tok_emb[idx_t] + pos_emb[t]                                  (E)
    h_t      = FNN([x_t ; c_{t-1}])     FNN = (Linear -> ReLU -> Dropout) x L   (H)
    logits_t = W_tok h_t                                                    (V)
    c_t      = c_{t-1} + W_ctx h_t          additive update, c_0 = 0            (C)
  --gate          a_t = sigmoid(W_a h_t);  c_t = a_t * c_{t-1} + (1 - a_t) * W_ctx h_t
  --context-norm  c_t = LayerNorm(c_t) after every update (the author's later note)
  --timescales    a_t = f + (1 - f) * sigmoid(.), floors f fixed per channel (see below)
  Each step reads c_{t-1} through the whole FNN, so training loops over positions.

The context stack, --num-contexts K >= 2 (the report's "several context vectors"):
  K residual blocks shaped like a Transformer's, attention replaced by a context vector:
    u_t  = conv(LN(x))_t           --short-conv S: causal depthwise conv over the last S inputs
    a_t  = f + (1-f) sigmoid(W_a u_t)   keep gate (--gate; without it a_t = 1: plain addition)
    v_t  = W_v u_t                 new value
    c_t  = a_t * c_{t-1} + (1 - a_t) * v_t                                 (C)
    x   += W_o (norm(c_t) * silu(W_r u_t))    read the context out, gated by the input
    x   += MLP(LN(x))
  --timescales      gate floors f fixed per channel, from ~0 (forgets at once) to ~1
                    (remembers ~T tokens): fast and slow contexts by construction.
  --local-window W  the hybrid: each block also attends to its last W positions. This is
                    the one variant with attention; its state is bounded by W, not by T.
  a_t and v_t depend on the input only, never on c_{t-1}, so the recurrence
  c_t = a_t * c_{t-1} + b_t has a closed form for all t at once (Heinsen 2023):
    A_t = sum_{r<=t} log a_r,    c_t = exp(A_t) * sum_{s<=t} b_s exp(-A_s)
  parallel_scan evaluates it chunk by chunk; sequential_scan is the loop it must equal
  (test_models.py checks values and gradients).

Left out on purpose: no attention anywhere except the hybrid, no tied embeddings (the
report's heads are untied), no caching tricks beyond the constant-size state itself.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer import IGNORE, MLP, CausalSelfAttention  # the stack reuses the Transformer's parts

# -----------------------------------------------------------------------------
# the scan: c_t = a_t * c_{t-1} + b_t with c_0 = 0, given log a_t (>= log MIN_KEEP) and b_t

MIN_KEEP = math.exp(-4)  # every keep gate a_t >= e^-4 ~ 0.018, so 16 steps of decay stay within float32 range
CHUNK = 16


def sequential_scan(log_a, b):
    """The definition, one position at a time. log_a, b: (B, T, C) -> c: (B, T, C)."""
    context = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.size(1)):
        context = log_a[:, t].exp() * context + b[:, t]
        out.append(context)
    return torch.stack(out, dim=1)


def parallel_scan(log_a, b):
    """The same result, computed a chunk of 16 positions at a time instead of one.

    Inside a chunk, with A_t = sum_{r<=t} log a_r (from the chunk's start),
        c_t = exp(A_t) * (c_start + sum_{s<=t} b_s * exp(-A_s))
    is two cumulative sums (Heinsen 2023's closed form, in linear space; exp(-A)
    stays below e^64 because a >= MIN_KEEP). Then a short loop over the chunk
    ends carries c from one chunk into the next: T/16 steps instead of T.
    """
    B, T, C = b.shape
    pad = (-T) % CHUNK
    log_a = F.pad(log_a, (0, 0, 0, pad)).view(B, -1, CHUNK, C)  # (B, n, Q, C): n chunks of Q positions
    b = F.pad(b, (0, 0, 0, pad)).view(B, -1, CHUNK, C)
    A = log_a.cumsum(dim=2)  # log decay from each chunk's start to position t
    local = A.exp() * (b * (-A).exp()).cumsum(dim=2)  # every chunk scanned from c_start = 0
    decay, ends = A[:, :, -1].exp().unbind(1), local[:, :, -1].unbind(1)  # per chunk: total decay, end value
    starts = [torch.zeros_like(ends[0])]
    for i in range(len(ends) - 1):  # c at each chunk's start, chunk by chunk
        starts.append(decay[i] * starts[-1] + ends[i])
    c = local + A.exp() * torch.stack(starts, dim=1)[:, :, None]  # add what came in from before
    return c.reshape(B, -1, C)[:, :T]


# -----------------------------------------------------------------------------
# small pieces shared by both layouts


def gate_floors(channels, timescales, longest):
    """Per-channel floors f of the keep gate a = f + (1 - f) * sigmoid(.), never below MIN_KEEP.

    With --timescales, channel i cannot forget faster than a half-life h_i, and
    the half-lives run geometrically from 1/8 token (f ~ 0: free to forget at
    once) to `longest` tokens (f ~ 1: a slow, long-term memory): f = 0.5 ** (1 / h).
    """
    if not timescales:
        return torch.full((channels,), MIN_KEEP)
    half_lives = torch.logspace(math.log10(0.125), math.log10(max(longest, 2)), channels)
    return (0.5 ** (1.0 / half_lives)).clamp(min=MIN_KEEP)  # (C,)


def keep_gate(logit, floor):
    """Keep gate a = f + (1 - f) * sigmoid(logit) and its complement 1 - a, each without cancellation."""
    return floor + (1 - floor) * torch.sigmoid(logit), (1 - floor) * torch.sigmoid(-logit)


# -----------------------------------------------------------------------------
# the seed model: one context vector read through an FNN (SEED.md)


class SeedCell(nn.Module):
    """The report's recurrence: h_t = FNN([x_t ; c_{t-1}]), then the context update."""

    def __init__(self, config):
        super().__init__()
        E, C, H = config.embed_dim, config.context_dim, config.hidden_dim
        self.config = config
        self.fnn = nn.ModuleList([nn.Linear(E + C, H)] + [nn.Linear(H, H) for _ in range(config.layers - 1)])
        self.to_context = nn.Linear(H, C)  # the context head: writes delta_t (or v_t)
        self.to_gate = nn.Linear(H, C) if config.gate else None
        self.norm = nn.LayerNorm(C) if config.context_norm else None
        self.register_buffer("floor", gate_floors(C, config.timescales, config.block_size), persistent=False)
        self.out_dim = H

    def fnn_tail(self, h):
        """ReLU -> Dropout after the first Linear, then the remaining Linear -> ReLU -> Dropout layers."""
        h = F.dropout(F.relu(h), self.config.dropout, self.training)
        for layer in self.fnn[1:]:
            h = F.dropout(F.relu(layer(h)), self.config.dropout, self.training)
        return h

    def update(self, context, h):
        """c_{t-1}, h_t -> c_t: additive, or gated, then optionally normalised."""
        value = self.to_context(h)
        if self.to_gate is None:
            context = context + value
        else:
            keep, write = keep_gate(self.to_gate(h), self.floor)
            context = keep * context + write * value
        return self.norm(context) if self.norm is not None else context

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.config.context_dim, device=device)

    def step(self, x, context):
        """One position, exactly as SEED.md writes it: x (B, E), c_{t-1} (B, C) -> h_t (B, H), c_t."""
        h = self.fnn_tail(self.fnn[0](torch.cat([x, context], dim=-1)))
        return h, self.update(context, h)

    def forward(self, x):
        """The same loop as step, with the context-free work taken out of it. x: (B, T, E) -> (B, T, H)."""
        E = self.config.embed_dim
        token_weight, context_weight = self.fnn[0].weight[:, :E], self.fnn[0].weight[:, E:].contiguous()  # (H, E), (H, C)
        # The token half of the first layer never reads the context: all positions in one matmul.
        token_part = F.linear(x, token_weight, self.fnn[0].bias).unbind(1)  # T tensors of (B, H)
        context = self.init_state(x.size(0), x.device).to(x.dtype)
        hiddens = []
        for t in range(x.size(1)):
            h = self.fnn_tail(token_part[t] + F.linear(context, context_weight))  # = FNN([x_t ; c_{t-1}])
            context = self.update(context, h)
            hiddens.append(h)
        return torch.stack(hiddens, dim=1)  # (B, T, H); the token head runs once, after the loop


# -----------------------------------------------------------------------------
# the stack's pieces: a short convolution, a context mixer, an optional local attention
# (the MLP is the Transformer's)


class ShortConv(nn.Module):
    """Causal depthwise convolution: u_t = bias + sum_k w_k * x_{t-S+1+k}, channel by channel."""

    def __init__(self, channels, width):
        super().__init__()
        bound = 1 / math.sqrt(width)  # PyTorch's default for a depthwise Conv1d
        self.weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))  # (E, S), oldest first
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x):
        T, S = x.size(1), self.weight.size(1)
        padded = F.pad(x, (0, 0, S - 1, 0))  # S - 1 zeros before the first position: (B, T + S - 1, E)
        return self.bias + sum(padded[:, k : k + T] * self.weight[:, k] for k in range(S))  # (B, T, E)

    def step(self, x, recent):
        """x (B, E) and the last S - 1 inputs (B, S - 1, E) -> u (B, E) and the new last S - 1 inputs."""
        window = torch.cat([recent, x[:, None]], dim=1)  # (B, S, E), oldest first
        return self.bias + (window * self.weight.T).sum(dim=1), window[:, 1:]


class ContextMixer(nn.Module):
    """One context vector per block, updated from the block's input only, read out gated."""

    def __init__(self, config):
        super().__init__()
        E, C, S = config.embed_dim, config.context_dim, config.short_conv
        self.config = config
        self.conv = ShortConv(E, S) if S > 0 else None
        # one matmul for the read gate r_t, the value v_t and (with --gate) the keep gate's logit
        self.to_inputs = nn.Linear(E, (3 if config.gate else 2) * C)
        self.norm = nn.LayerNorm(C) if config.context_norm else nn.Identity()
        self.proj = nn.Linear(C, E)
        self.register_buffer("floor", gate_floors(C, config.timescales, config.block_size), persistent=False)

    def coefficients(self, u):
        """u (..., E) -> log a_t and b_t of c_t = a_t * c_{t-1} + b_t (float32), and the read gate r_t."""
        read, value, *gate = self.to_inputs(u).split(self.config.context_dim, dim=-1)
        value = value.float()
        if not gate:
            return torch.zeros_like(value), value, read  # a_t = 1: the seed's plain addition
        keep, write = keep_gate(gate[0].float(), self.floor)
        return keep.log(), write * value, read

    def read_out(self, context, read):
        return self.proj(self.norm(context.to(read.dtype)) * F.silu(read))

    def forward(self, x, scan=parallel_scan):
        u = self.conv(x) if self.conv is not None else x  # (B, T, E)
        log_a, b, read = self.coefficients(u)
        return self.read_out(scan(log_a, b), read)  # the scan gives c for every position: (B, T, C)

    def init_state(self, batch_size, device):
        E, C, S = self.config.embed_dim, self.config.context_dim, self.config.short_conv
        return {"context": torch.zeros(batch_size, C, device=device),
                "recent": torch.zeros(batch_size, max(S - 1, 0), E, device=device)}  # conv's last S-1 inputs

    def step(self, x, state):
        """x (B, E) -> output (B, E); the state keeps c and the conv's last S-1 inputs: constant size."""
        u = x
        if self.conv is not None:
            u, state["recent"] = self.conv.step(x, state["recent"])
        log_a, b, read = self.coefficients(u)
        state["context"] = log_a.exp() * state["context"] + b
        return self.read_out(state["context"], read), state


class LocalAttention(CausalSelfAttention):
    """The hybrid's attention (--local-window W): the Transformer's, restricted to the last W positions."""

    def __init__(self, config):
        super().__init__(config)
        self.window = config.local_window

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(E, dim=2))
        t = torch.arange(T, device=x.device)
        lag = t[:, None] - t[None, :]  # (T, T): how far back key s is from query t
        band = (lag >= 0) & (lag < self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, heads, T, E/heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, E))

    def init_state(self, batch_size, device):
        return None  # keys and values of the last W positions, once there are any

    def step(self, x, cache):
        y, (k, v) = super().step(x, cache)
        start = max(0, k.size(2) - (self.window - 1))  # keep W - 1 positions: with the next token, W in view
        return y, (k[:, :, start:], v[:, :, start:])


class ContextBlock(nn.Module):
    """x += mixer(LN(x)) [+ local attention(LN(x))];  x += MLP(LN(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_mix = nn.LayerNorm(config.embed_dim)
        self.mixer = ContextMixer(config)
        self.local = LocalAttention(config) if config.local_window > 0 else None
        self.ln_mlp = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, scan=parallel_scan):
        u = self.ln_mix(x)
        mixed = self.mixer(u, scan)
        if self.local is not None:
            mixed = mixed + self.local(u)
        x = x + self.drop(mixed)
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def init_state(self, batch_size, device):
        return {"mixer": self.mixer.init_state(batch_size, device),
                "local": self.local.init_state(batch_size, device) if self.local is not None else None}

    def step(self, x, state):
        u = self.ln_mix(x)
        mixed, state["mixer"] = self.mixer.step(u, state["mixer"])
        if self.local is not None:
            local, state["local"] = self.local.step(u, state["local"])
            mixed = mixed + local
        x = x + mixed
        return x + self.mlp(self.ln_mlp(x)), state


class ContextStack(nn.Module):
    """K context blocks and a final LayerNorm: (B, T, E) -> (B, T, E)."""

    def __init__(self, config):
        super().__init__()
        self.blocks = nn.ModuleList([ContextBlock(config) for _ in range(config.num_contexts)])
        self.ln_final = nn.LayerNorm(config.embed_dim)
        self.out_dim = config.embed_dim

    def forward(self, x, scan=parallel_scan):
        for block in self.blocks:
            x = block(x, scan)
        return self.ln_final(x)

    def init_state(self, batch_size, device):
        return [block.init_state(batch_size, device) for block in self.blocks]

    def step(self, x, state):
        for i, block in enumerate(self.blocks):
            x, state[i] = block.step(x, state[i])
        return self.ln_final(x), state


# -----------------------------------------------------------------------------
# the model


@dataclass
class NewLLMConfig:
    vocab_size: int = 65             # V: tokens read and predicted
    block_size: int = 128            # longest training sequence; rows of the position table
    embed_dim: int = 256             # E: width of token (and position) embeddings
    context_dim: int = 256           # C: size of each context vector
    hidden_dim: int = 512            # H: FNN width (one context) or MLP width (stack)
    layers: Optional[int] = None     # L: FNN depth of the one-context model (8); the stack has none
    num_contexts: int = 1            # K: 1 = the seed model; K >= 2 = a stack of K context blocks
    dropout: float = 0.1             # dropout after each FNN layer / on each residual branch
    pos_embed: bool = True           # learned positions (the report's); caps the length at block_size
    context_norm: bool = False       # LayerNorm on the context (after each update / before reading it)
    gate: bool = False               # gated update a*c + (1-a)*v instead of c + delta
    timescales: bool = False         # per-channel floors on the gate: fast and slow channels
    short_conv: int = 0              # S: causal depthwise conv width before each context (stack only)
    local_window: int = 0            # W: hybrid's attention window (stack only); 0 = attention-free
    heads: int = 4                   # heads of the hybrid's local attention

    def __post_init__(self):
        stack = self.num_contexts >= 2
        if self.layers is None and not stack:
            self.layers = 8
        for name in ("vocab_size", "block_size", "embed_dim", "context_dim", "hidden_dim", "num_contexts", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if not stack and self.layers < 1:
            raise ValueError(f"--layers must be positive (got {self.layers})")
        if stack and self.layers is not None:
            raise ValueError("--layers sets the FNN depth of the one-context model; a stack's depth is --num-contexts")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.timescales and not self.gate:
            raise ValueError("--timescales shapes the gate: add --gate")
        if not stack and (self.short_conv or self.local_window):
            raise ValueError("--short-conv and --local-window belong to the stack: add --num-contexts 2 or more")
        if self.short_conv < 0 or self.local_window < 0:
            raise ValueError("--short-conv and --local-window must be 0 (off) or positive")
        if self.local_window and self.embed_dim % self.heads:
            raise ValueError(f"--heads {self.heads} must divide --embed-dim {self.embed_dim}")


class NewLLM(nn.Module):
    """Embeddings -> the seed cell or the context stack -> token head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.block_size, config.embed_dim) if config.pos_embed else None
        self.core = SeedCell(config) if config.num_contexts == 1 else ContextStack(config)
        self.head = nn.Linear(self.core.out_dim, config.vocab_size)
        self.max_len = config.block_size if config.pos_embed else None
        # PyTorch's default initialisation throughout: the seed model's, and as good as GPT-2's for the stack

    def embed(self, idx, start=0):
        x = self.tok_emb(idx)  # (B, T, E) or (B, E)
        if self.pos_emb is not None:
            if start + (idx.size(1) if idx.dim() == 2 else 1) > self.config.block_size:
                raise ValueError(f"this model has learned positions up to {self.config.block_size} only")
            positions = torch.arange(start, start + idx.size(1), device=idx.device) if idx.dim() == 2 else start
            x = x + self.pos_emb(torch.as_tensor(positions, device=idx.device))
        return x

    def forward(self, idx, targets=None, scan=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over scored targets."""
        x = self.embed(idx)
        features = self.core(x) if scan is None else self.core(x, scan)  # (B, T, H or E)
        logits = self.head(features)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    def init_state(self, batch_size, device):
        """The whole memory of the past: its size does not depend on how much text was read."""
        return {"position": 0, "core": self.core.init_state(batch_size, device)}

    @torch.no_grad()
    def step(self, token, state):
        """token (B,) -> next-token logits (B, V), new state."""
        x = self.embed(token, state["position"])
        h, state["core"] = self.core.step(x, state["core"])
        state["position"] += 1
        return self.head(h), state
