"""
New-LLM: the report's language model with no attention (REPORT.md). One fixed-size
context vector carries everything the model knows about the past and is updated token
by token, so its memory never grows with the text.

Read this file next to REPORT.md's equations, then transformer.py (what it is measured
against), then stack.py (the report's proposed fixes, built).

    python train.py --arch newllm --context-dim 256      # train it on Tiny Shakespeare
    python sample.py --ckpt runs/newllm/ckpt.pt          # and read what it writes

Glossary
    B batch size     T sequence length     V vocabulary size
    E embed_dim      C context_dim         H hidden_dim        L layers (depth of the FNN)

The model, at each position t (REPORT.md, "The model"; the brackets give each vector's size):
    x_t      = tok_emb[idx_t] + pos_emb[t]                                     (E)
    h_t      = FNN([x_t ; c_{t-1}])        FNN = (Linear -> ReLU -> Dropout) x L   (H)
    logits_t = W_tok h_t + b_tok                                               (V)
    c_t      = c_{t-1} + delta_t,  delta_t = W_ctx h_t + b_ctx   additive, c_0 = 0   (C)
and its two single-context variants (REPORT.md, "What it proposed, and never built", 4, and the
author's later note):
    --gate          a_t = sigmoid(W_a h_t + b_a);   c_t = a_t * c_{t-1} + (1 - a_t) * (W_ctx h_t + b_ctx)
    --context-norm  c_t = LayerNorm(c_t) after every update (the author's later note)

h_t reads c_{t-1}, which needed h_{t-1}: the positions must be visited one after another,
in training too. `ContextCell.step` is the definition, one position; `forward` runs it at every
position. fast.py has the same loop with its backward pass written out, for the report's own update
(no --gate, no --context-norm; `--no-fast` turns it off).

Built in stack.py instead: several contexts, gates that read only the input (so training
runs in parallel), a matrix memory.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -1  # target value the loss skips (padding); data.py marks targets with it

# -----------------------------------------------------------------------------
# the recurrence: FNN([x_t ; c_{t-1}]) -> h_t -> c_t


class ContextCell(nn.Module):
    """The report's recurrence: h_t = FNN([x_t ; c_{t-1}]), then the context update."""

    def __init__(self, config):
        super().__init__()
        E, C, H, L = config.embed_dim, config.context_dim, config.hidden_dim, config.layers
        self.config = config
        self.fnn = nn.ModuleList([nn.Linear(E + C, H)] + [nn.Linear(H, H) for _ in range(L - 1)])
        self.to_context = nn.Linear(H, C)  # the context head: delta_t (or the new value, gated)
        self.to_gate = nn.Linear(H, C) if config.gate else None
        self.norm = nn.LayerNorm(C) if config.context_norm else None
        self.fast = None  # fast.py's loop, for the report's own update; None: the definition below

    def update(self, context, h):
        """c_{t-1}, h_t -> c_t: added to, or gated; then normalised if asked."""
        value = self.to_context(h)
        if self.to_gate is None:
            context = context + value  # c_t = c_{t-1} + delta_t
        else:
            keep = torch.sigmoid(self.to_gate(h))  # a_t
            context = keep * context + (1 - keep) * value
        return self.norm(context) if self.norm is not None else context

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, self.config.context_dim, device=device)  # c_0 = 0

    def step(self, x, context):
        """One position, as REPORT.md writes it: x_t (B, E), c_{t-1} (B, C) -> h_t (B, H), c_t (B, C)."""
        h = torch.cat([x, context], dim=-1)  # [x_t ; c_{t-1}]  (B, E + C)
        for layer in self.fnn:
            h = F.dropout(F.relu(layer(h)), self.config.dropout, self.training)  # Linear -> ReLU -> Dropout
        return h, self.update(context, h)

    def forward(self, x):
        """All positions: x (B, T, E) -> h (B, T, H), one step after another."""
        if self.fast is not None:
            return self.fast(self, x)
        context = self.init_state(x.size(0), x.device).to(x.dtype)
        hiddens = []
        for t in range(x.size(1)):
            h, context = self.step(x[:, t], context)
            hiddens.append(h)
        return torch.stack(hiddens, dim=1)  # (B, T, H)


# -----------------------------------------------------------------------------
# the model


@dataclass
class NewLLMConfig:
    vocab_size: int = 65          # V: tokens read and predicted
    block_size: int = 128         # longest sequence; rows of the position table
    embed_dim: int = 256          # E: width of the token (and position) embeddings
    context_dim: int = 256        # C: size of the context vector, the whole memory of the past
    hidden_dim: int = 512         # H: width of the FNN
    layers: int = 8               # L: Linear layers in the FNN
    dropout: float = 0.1          # after every FNN layer
    pos_embed: bool = True        # learned positions (the report's); caps the length at block_size
    gate: bool = False            # c_t = a_t * c_{t-1} + (1 - a_t) * value instead of c_{t-1} + delta
    context_norm: bool = False    # LayerNorm on the context after every update


class NewLLM(nn.Module):
    """Embeddings -> the context cell, position by position -> token head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.block_size, config.embed_dim) if config.pos_embed else None
        self.cell = ContextCell(config)
        self.head = nn.Linear(config.hidden_dim, config.vocab_size)  # the token head
        self.max_len = config.block_size if config.pos_embed else None  # None: generation may run on forever
        # PyTorch's default initialisation throughout, as in the report

    def embed(self, idx, start=0):
        """Token plus position embedding. idx (B, T) from position `start` -> (B, T, E)."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            if start + idx.size(1) > self.config.block_size:
                raise ValueError(f"this model has learned positions up to {self.config.block_size} only")
            x = x + self.pos_emb(torch.arange(start, start + idx.size(1), device=idx.device))
        return x

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over scored targets."""
        h = self.cell(self.embed(idx))  # (B, T, H)
        logits = self.head(h)  # (B, T, V): the logits never feed back into the context: one call after the loop
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size, device):
        """The whole memory of the past: its size does not depend on how much text was read."""
        return {"position": 0, "context": self.cell.init_state(batch_size, device)}

    @torch.inference_mode()  # no autograd bookkeeping at all: generation never differentiates
    def step(self, token, state):
        """token (B,) -> next-token logits (B, V), and the state after reading it."""
        x = self.embed(token[:, None], state["position"])[:, 0]  # (B, E)
        h, state["context"] = self.cell.step(x, state["context"])
        state["position"] += 1
        return self.head(h), state


# -----------------------------------------------------------------------------
# shared by every model


def language_model_loss(logits, targets):
    """Mean cross-entropy of next-token predictions, skipping IGNORE targets; None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

