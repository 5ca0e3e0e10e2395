"""
The LSTM language model: the classic fixed-state answer to the report's question (Hochreiter and
Schmidhuber 1997; the character-level recipe of Karpathy's char-rnn), and what the report's fix 4,
"a gate like an LSTM's", points at. Read newllm.py first: the LSTM is a context vector too, with
gates that read the previous state.

    python train.py --arch lstm                   # 2 layers of 256 on Tiny Shakespeare
    python train.py --preset lstm-cpu             # matched to transformer-cpu's parameters

Glossary
    B batch size   T sequence length   V vocabulary size   E embed_dim   H hidden_dim   L layers

One layer, at each position t (PyTorch's nn.LSTM; its input x_t is the layer below's h_t):
    i, f, g, o = sigmoid(.), sigmoid(.), tanh(.), sigmoid(.) of W x_t + U h_{t-1} + b     (4H)
    c_t = f * c_{t-1} + i * g          the cell: kept where the forget gate f is open   (H)
    h_t = o * tanh(c_t)                what the layer shows the next one and the head  (H)
The state carried from token to token is (h, c) of every layer: 2 * L * H numbers, whatever the
length of the text. Unlike the stacks' gates (stack.py), f reads h_{t-1}, so training runs the
positions one after another, as the report's model does (nn.LSTM's loop, in one fused kernel).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from newllm import language_model_loss


@dataclass
class LSTMConfig:
    vocab_size: int = 65      # V: tokens read and predicted
    block_size: int = 128     # longest training sequence (the model itself has no length limit)
    embed_dim: int = 128      # E: width of the token embedding
    hidden_dim: int = 256     # H: width of each layer's h and c
    layers: int = 2           # L: stacked LSTM layers
    dropout: float = 0.1      # on the embedding, between layers and before the head


class LSTM(nn.Module):
    """Embedding -> L LSTM layers -> token head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_dim, config.layers, batch_first=True,
                            dropout=config.dropout if config.layers > 1 else 0.0)
        self.head = nn.Linear(config.hidden_dim, config.vocab_size)
        self.max_len = None  # no position table: generation may run on forever

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy over scored targets."""
        x = F.dropout(self.tok_emb(idx), self.config.dropout, self.training)  # (B, T, E)
        h, _ = self.lstm(x)  # (B, T, H): the top layer's h_t at every position, from (h, c) = 0
        logits = self.head(F.dropout(h, self.config.dropout, self.training))  # (B, T, V)
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size, device):
        """h and c of every layer, zero before the first token: (L, B, H) each."""
        shape = (self.config.layers, batch_size, self.config.hidden_dim)
        return {"h": torch.zeros(shape, device=device), "c": torch.zeros(shape, device=device)}

    @torch.inference_mode()  # no autograd bookkeeping at all: generation never differentiates
    def step(self, token, state):
        """token (B,) -> next-token logits (B, V), and the state after reading it."""
        h, (state["h"], state["c"]) = self.lstm(self.tok_emb(token)[:, None], (state["h"], state["c"]))
        return self.head(h[:, 0]), state
