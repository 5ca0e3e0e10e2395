"""
A GPT-style Transformer decoder, from scratch: the baseline New-LLM is measured against.

    python train.py --arch transformer                 # the default CPU-sized model
    python train.py --preset seed-transformer          # the report's Transformer (REPORT.md)

Glossary
    B batch size   T sequence length   V vocabulary size   E embed_dim
    nh heads       hd = E / nh (head width)                H hidden_dim (MLP width, 4E by default)

One block (pre-LayerNorm, GPT-2's layout; --post-norm gives the original/the report's):
    x += Attention(LN(x))        q, k, v = x W_q, x W_k, x W_v, split into nh heads of hd
                                 y_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(hd)) v_s
    x += MLP(LN(x))              MLP = Linear(E, H) -> GELU -> Linear(H, E)
Generation keeps every past k and v (the KV cache): the state grows by 2 * layers * E
numbers per token, which is exactly what New-LLM's fixed-size context avoids.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from newllm import language_model_loss  # the same loss as New-LLM's

# -----------------------------------------------------------------------------
# blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        E = config.embed_dim
        self.heads, self.dropout = config.heads, config.dropout
        self.qkv = nn.Linear(E, 3 * E)  # query, key and value projections in one matmul
        self.proj = nn.Linear(E, E)
        self.fast = None  # fast.py's fused kernel; None: attention written out (attend)

    def split_heads(self, x):
        B, T, E = x.shape
        return x.view(B, T, self.heads, E // self.heads).transpose(1, 2)  # (B, nh, T, hd)

    def attend(self, q, k, v, allowed=None):
        """Scores, mask what may not be seen, softmax, weighted sum of values. q (B, nh, Tq, hd), k and v
        (B, nh, Tk, hd) -> (B, nh, Tq, hd). allowed (Tq, Tk): True where query t may read key s; None: causal."""
        dropout = self.dropout if self.training else 0.0
        if self.fast is not None:
            return self.fast(q, k, v, allowed, dropout)
        if allowed is None:
            allowed = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()  # s <= t
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
        return F.dropout(F.softmax(scores, dim=-1), dropout, self.training) @ v

    def forward(self, x, allowed=None):
        B, T, E = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(E, dim=2))  # (B, nh, T, hd) each
        y = self.attend(q, k, v, allowed)
        return self.proj(y.transpose(1, 2).reshape(B, T, E))  # heads side by side again: (B, T, E)

    def step(self, x, cache):
        """x (B, E) -> (B, E); the cache (k, v), each (B, nh, t, hd), gains one position."""
        q, k, v = map(self.split_heads, self.qkv(x[:, None]).split(x.size(-1), dim=2))  # (B, nh, 1, hd)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        everything = torch.ones(1, k.size(2), dtype=torch.bool, device=x.device)  # every cached position is past
        return self.proj(self.attend(q, k, v, everything).transpose(1, 2).reshape(x.shape)), (k, v)


class MLP(nn.Module):
    """Linear(E, H) -> GELU -> Linear(H, E)."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.embed_dim, config.hidden_dim)
        self.down = nn.Linear(config.hidden_dim, config.embed_dim)
        self.fast = None  # fast.py's version at a width padded to a multiple of 16; None: as written

    def forward(self, x):
        if self.fast is not None:
            return self.fast(self, x)
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.post_norm = config.post_norm
        self.ln_attn = nn.LayerNorm(config.embed_dim)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.post_norm:  # the original Transformer: normalise after each residual sum
            x = self.ln_attn(x + self.drop(self.attn(x)))
            return self.ln_mlp(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def step(self, x, cache):
        if self.post_norm:
            y, cache = self.attn.step(x, cache)
            x = self.ln_attn(x + y)
            return self.ln_mlp(x + self.mlp(x)), cache
        y, cache = self.attn.step(self.ln_attn(x), cache)
        x = x + y
        return x + self.mlp(self.ln_mlp(x)), cache


# -----------------------------------------------------------------------------
# the model


@dataclass
class TransformerConfig:
    vocab_size: int = 65              # V: tokens read and predicted
    block_size: int = 128             # longest sequence; rows of the position table
    embed_dim: int = 256              # E: width of the residual stream
    heads: int = 4                    # nh: attention heads; must divide E
    layers: int = 3                   # blocks
    hidden_dim: Optional[int] = None  # H: MLP width; 4E when not given
    dropout: float = 0.1              # on the embeddings, the attention weights and each residual branch
    post_norm: bool = False           # LayerNorm after each residual sum (the report's layout)
    init: str = "gpt2"                # "gpt2": N(0, 0.02) (nanoGPT's); "torch": PyTorch's defaults

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.embed_dim


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_len = config.block_size
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.block_size, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_final = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.vocab_size)  # untied, with bias, as in the report
        if config.init == "gpt2":
            self._init_gpt2()

    def _init_gpt2(self):
        """GPT-2's initialisation: N(0, 0.02), residual projections shrinking with depth (nanoGPT's).

        It gives the lower language-model loss here; PyTorch's own defaults (--init torch)
        learn associative recall hundreds of steps sooner (results/recall.md uses them).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for module in (block.attn.proj, block.mlp.down):
                nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.layers))

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over scored targets."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens, but the position table has {self.config.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))  # (B, T, E)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_final(x))  # (B, T, V)
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size, device):
        """The KV cache starts empty and grows by one position per step (the arguments are the shared
        interface's: an empty cache needs neither)."""
        return {"position": 0, "cache": [None] * len(self.blocks)}

    @torch.inference_mode()  # no autograd bookkeeping at all: generation never differentiates
    def step(self, token, state):
        """token (B,) -> next-token logits (B, V), state with the new position's keys and values."""
        position = state["position"]
        if position >= self.config.block_size:
            raise ValueError(f"this model has learned positions up to {self.config.block_size} only")
        x = self.tok_emb(token) + self.pos_emb.weight[position]  # (B, E)
        for i, block in enumerate(self.blocks):
            x, state["cache"][i] = block.step(x, state["cache"][i])
        state["position"] = position + 1
        return self.head(self.ln_final(x)), state
