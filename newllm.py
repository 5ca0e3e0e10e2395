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

IGNORE = -1  # targets equal to this are not scored (padding, unasked recall positions)

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
    decay, ends = A[:, :, -1].exp(), local[:, :, -1]  # (B, n, C): whole-chunk decay and end value
    starts = [torch.zeros_like(ends[:, 0])]
    for i in range(ends.size(1) - 1):  # c at each chunk's start, chunk by chunk
        starts.append(decay[:, i] * starts[-1] + ends[:, i])
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


def log_gates(logit, floor):
    """Keep gate a = f + (1 - f) * sigmoid(logit), returned as (log a, log(1 - a)), computed stably."""
    log_keep = torch.logaddexp(floor.log(), torch.log1p(-floor) - F.softplus(-logit))
    return log_keep, torch.log1p(-floor) - F.softplus(logit)


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
            log_keep, log_write = log_gates(self.to_gate(h), self.floor)
            context = log_keep.exp() * context + log_write.exp() * value
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
        first = self.fnn[0]
        # The token half of the first layer never reads the context: all positions in one matmul.
        token_part = F.linear(x, first.weight[:, :E], first.bias)  # (B, T, H)
        context_weight = first.weight[:, E:]  # (H, C)
        context = self.init_state(x.size(0), x.device).to(x.dtype)
        hiddens = []
        for t in range(x.size(1)):
            h = self.fnn_tail(token_part[:, t] + context @ context_weight.T)  # = FNN([x_t ; c_{t-1}])
            context = self.update(context, h)
            hiddens.append(h)
        return torch.stack(hiddens, dim=1)  # (B, T, H); the token head runs once, after the loop


# -----------------------------------------------------------------------------
# the stack's pieces: a context mixer, an optional local attention, an MLP


class ContextMixer(nn.Module):
    """One context vector per block, updated from the block's input only, read out gated."""

    def __init__(self, config):
        super().__init__()
        E, C, S = config.embed_dim, config.context_dim, config.short_conv
        self.config = config
        # causal depthwise convolution: u_t mixes x_{t-S+1} .. x_t channel by channel
        self.conv = nn.Conv1d(E, E, S, groups=E, padding=S - 1) if S > 0 else None
        self.to_gate = nn.Linear(E, C) if config.gate else None
        self.to_value = nn.Linear(E, C)
        self.to_read = nn.Linear(E, C)  # output gate: what of the context this position reads
        self.norm = nn.LayerNorm(C) if config.context_norm else nn.Identity()
        self.proj = nn.Linear(C, E)
        self.register_buffer("floor", gate_floors(C, config.timescales, config.block_size), persistent=False)

    def coefficients(self, u):
        """u (..., E) -> log a and b of c_t = a_t * c_{t-1} + b_t, each (..., C), in float32."""
        value = self.to_value(u).float()
        if self.to_gate is None:
            return torch.zeros_like(value), value  # a_t = 1: the seed's plain addition
        log_keep, log_write = log_gates(self.to_gate(u).float(), self.floor)
        return log_keep, log_write.exp() * value

    def read(self, context, u):
        return self.proj(self.norm(context.to(u.dtype)) * F.silu(self.to_read(u)))

    def forward(self, x, scan=parallel_scan):
        T = x.size(1)
        u = self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2) if self.conv is not None else x  # (B, T, E)
        context = scan(*self.coefficients(u))  # (B, T, C)
        return self.read(context, u)

    def init_state(self, batch_size, device):
        E, C, S = self.config.embed_dim, self.config.context_dim, self.config.short_conv
        return {"context": torch.zeros(batch_size, C, device=device),
                "recent": torch.zeros(batch_size, max(S - 1, 0), E, device=device)}  # conv's last S-1 inputs

    def step(self, x, state):
        """x (B, E) -> output (B, E); the state keeps c and the conv's last S-1 inputs: constant size."""
        u = x
        if self.conv is not None:
            window = torch.cat([state["recent"], x[:, None]], dim=1)  # (B, S, E), oldest first
            u = (window * self.conv.weight[:, 0].T).sum(dim=1) + self.conv.bias
            state["recent"] = window[:, 1:]
        log_a, b = self.coefficients(u)
        state["context"] = log_a.exp() * state["context"] + b
        return self.read(state["context"], u), state


class LocalAttention(nn.Module):
    """The hybrid's causal attention over the last W positions only (--local-window W)."""

    def __init__(self, config):
        super().__init__()
        E = config.embed_dim
        self.heads, self.window = config.heads, config.local_window
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)

    def split_heads(self, x):
        B, T, E = x.shape
        return x.view(B, T, self.heads, E // self.heads).transpose(1, 2)  # (B, heads, T, E/heads)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(E, dim=2))
        t = torch.arange(T, device=x.device)
        lag = t[:, None] - t[None, :]  # (T, T): how far back key s is from query t
        band = (lag >= 0) & (lag < self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)  # (B, heads, T, E/heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, E))

    def init_state(self, batch_size, device):
        return None  # keys and values of the last W positions, once there are any

    def step(self, x, state):
        q, k, v = map(self.split_heads, self.qkv(x[:, None]).split(x.size(-1), dim=2))  # (B, heads, 1, E/heads)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)[:, :, -self.window :]  # never more than W positions
            v = torch.cat([state[1], v], dim=2)[:, :, -self.window :]
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, E/heads)
        return self.proj(y.transpose(1, 2).reshape(x.shape)), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.embed_dim, config.hidden_dim)
        self.down = nn.Linear(config.hidden_dim, config.embed_dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


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

    @property
    def attention_free(self):
        return self.local_window == 0


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
