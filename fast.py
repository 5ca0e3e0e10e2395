"""
The engine: everything in this lab that exists only for speed. Read the lesson files first
(newllm.py, transformer.py, stack.py, scan.py, delta_rule.py, mamba.py): they define every model, and
`python train.py --no-fast` runs them alone. Nothing here changes what a model computes.

    accelerate(model)                    # what train.py, sample.py and bench.py call (unless --no-fast)
    python bench.py --engine             # each piece's gain: the model's training step with it on and off
    python -m pytest -q test_fast.py     # each piece equals the definition it replaces

Each piece below names the definition it replaces, is tested equal to it (values and gradients, in
float64, at odd shapes) and is kept only while it makes its model's training step at least 5% faster
(results/engine.json; written-out backward passes for the vector scan and the short convolution
were measured too, gained less, and were dropped). A model picks a piece up through one visible
line: the module's `fast` attribute (the stacks' input projection: `fast_inputs`), None in the
lesson, set here. A piece that replaces a module's whole forward pass (ContextCell, MLP) is called with
the module first; one that replaces a function inside it (attention, the delta rule, the input
projection) with that function's arguments.

    report_loop   newllm.ContextCell.forward, for the report's own update (no gate, no norm): the loop
                  over positions with its backward pass written out, each weight's gradient summed
                  over all positions in one product, and (on a CPU, in float32) oneDNN's products
    selective_scan  mamba.selective_scan, a cache-sized tile of sequences x channels at a time, the states
                  recomputed in a backward pass written out; its scans' cumulative sums each one product
                  with a triangle of ones (those products alone, tried in the vector mixer's scan with 16
                  times fewer channels, gained under 5%: the vector mixer runs scan.chunked_scan)
    delta_rule    delta_rule.delta_rule_chunked, with its backward pass written out
    attention     transformer.CausalSelfAttention's attention: PyTorch's fused kernel
    padding       transformer.MLP and the stacks' input projections, at widths padded to a multiple of 16
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from delta_rule import DELTA_CHUNK, at_least_float32
from mamba import MambaMixer, selective_scan, transition
from newllm import ContextCell
from scan import MIN_KEEP, SCAN_CHUNK, across_chunks, chunked_scan, chunks
from stack import MatrixMixer, Mixer
from transformer import MLP, CausalSelfAttention

PIECES = ("report_loop", "selective_scan", "delta_rule", "attention", "padding")
HOOKS = ("fast", "fast_inputs")  # the module attributes through which a model picks a piece up


def accelerate(model, pieces=PIECES):
    """Give every module of `model` that has a faster form the engine's version of it; returns the model.
    `pieces` picks which (bench.py times each piece by leaving it out)."""
    for module in model.modules():
        if isinstance(module, ContextCell) and "report_loop" in pieces:
            report_update = module.to_gate is None and module.norm is None  # the loop below knows only this update
            module.fast = report_loop if report_update else None
        elif isinstance(module, MatrixMixer) and "delta_rule" in pieces:
            module.fast = delta_rule_fast
        elif isinstance(module, MambaMixer) and "selective_scan" in pieces:
            module.fast = selective_scan_fast
        elif isinstance(module, CausalSelfAttention) and "attention" in pieces:
            module.fast = fused_attention
        if isinstance(module, MLP) and "padding" in pieces and module.up.out_features % 16:
            module.fast = padded_mlp
        if isinstance(module, Mixer) and "padding" in pieces and module.to_inputs.out_features % 16:
            module.fast_inputs = functools.partial(padded_rows, module.to_inputs)
    return model


def lesson_only(model):
    """Undo accelerate: every module back to its definition."""
    for module in model.modules():
        for name in HOOKS:
            if hasattr(module, name):
                setattr(module, name, None)
    return model


# -----------------------------------------------------------------------------
# padding: matrix products run faster when a width is a multiple of 16


def padded_rows(linear, x):
    """linear(x) computed with zero output rows up to a multiple of 16, the extra outputs dropped (in training
    only: padding copies the weights at every call, which generation would pay at every token)."""
    if not linear.training:
        return linear(x)
    extra = -linear.out_features % 16
    return F.linear(x, F.pad(linear.weight, (0, 0, 0, extra)), F.pad(linear.bias, (0, extra)))[..., :linear.out_features]


def padded_mlp(mlp, x):
    """transformer.MLP's result with its width H computed as the next multiple of 16: each extra unit is gelu(0) = 0
    and is read with weight 0, so the output and every gradient are those of width H, up to rounding."""
    if not mlp.training:
        return mlp.down(F.gelu(mlp.up(x)))
    extra = -mlp.up.out_features % 16
    hidden = F.gelu(F.linear(x, F.pad(mlp.up.weight, (0, 0, 0, extra)), F.pad(mlp.up.bias, (0, extra))))
    return F.linear(hidden, F.pad(mlp.down.weight, (0, extra)), mlp.down.bias)


# -----------------------------------------------------------------------------
# the selective scan's inner scan: each cumulative sum over a chunk's positions one product with a triangle


def triangular_scan(log_a, b, initial=None):
    """scan.chunked_scan's values. A cumulative sum along the middle dimension of (B, n, Q, C) is slow on a CPU
    (forward and backward, which flips and sums again); the same sums as one batched product with the Q x Q
    lower triangle of ones are faster (3 to 5 times, timed on Mamba's whole (B, T, 2,048) tensors), and their backward
    pass is a product too. On a GPU the lesson's scan runs: there products may round their inputs (TF32)."""
    if b.device.type != "cpu":
        return chunked_scan(log_a, b, initial)
    with torch.autocast("cpu", enabled=False):  # a float32 scan stays float32: it sums many terms
        ones = torch.ones(SCAN_CHUNK, SCAN_CHUNK, dtype=b.dtype, device=b.device).tril()
        B, T, C = b.shape
        if initial is not None:  # c_1 = a_1 c_0 + b_1, as chunked_scan
            b = torch.cat([b[:, :1] + log_a[:, :1].exp() * initial[:, None], b[:, 1:]], dim=1)
        A = ones @ chunks(log_a)  # (B, n, Q, C): the cumulative sum of log a_t inside each chunk
        decay = A.exp()
        local = decay * (ones @ (chunks(b) * (-A).exp()))
        c_in = across_chunks(local[:, :, -1], decay[:, :, -1])
        return (local + decay * c_in[:, :, None]).reshape(B, -1, C)[:, :T]


# -----------------------------------------------------------------------------
# selective scan: Mamba's memory a cache-sized tile at a time, its states recomputed in the backward pass
#
# mamba.selective_scan materialises log a_t, b_t and every state h_t, (B, T, C, N) each (mamba-cpu: 32 MiB
# apiece for a batch of 32 x 128), and autograd keeps a dozen such tensors for the backward pass: a step spends
# most of its time streaming them through memory. Channels and sequences are independent, so the same
# numbers are computed one tile of sequences x channels at a time, each (b, T, c, N) tensor about 1 MiB
# rather than 32, small enough for the processor's caches, and nothing (B, T, C, N) is kept: the
# backward pass recomputes a tile's states (as Mamba's own kernel does) and runs the recurrence backwards
# for the gradient reaching each h_t,
#     lambda_t = dL/dh_t = dy_t C_t + a_{t+1} lambda_{t+1},
# from which, with h_{t-1}:  dL/db_t = lambda_t,   dL/d(Delta_t A) = lambda_t h_{t-1} (1 - MIN_KEEP) exp(Delta_t A)
# (as a_t = MIN_KEEP + (1 - MIN_KEEP) exp(Delta_t A)), and dL/dC_t = sum_c dy_t h_t.
# The scans inside are triangular_scan's: each cumulative sum one product with a triangle of ones.

TILE_ELEMENTS = 1 << 18  # (b, T, c, N) numbers per tile: 1 MiB in float32


def selective_scan_fast(x, delta, B, C, A_log, h0=None):
    """mamba.selective_scan's h_t C_t and h_T, by SelectiveScan on a CPU (on a GPU the lesson's runs). h_T comes
    back without a gradient, and a carried-in h_0 must come in without one, as training carries the state
    (--carry-state cuts the gradient at the window)."""
    if x.device.type != "cpu":
        return selective_scan(x, delta, B, C, A_log, h0)
    if h0 is not None and h0.requires_grad:
        raise ValueError("selective_scan_fast does not differentiate the initial state: pass it detached")
    with torch.autocast("cpu", enabled=False):  # a float32 scan stays float32: it sums many terms
        return apply_selective_scan(x, delta, B, C, *map(at_least_float32, (A_log, h0)))  # as the lesson promotes


@torch.compiler.disable  # torch.compile would unroll the loop over tiles into its graph
def apply_selective_scan(x, delta, B, C, A_log, h0):
    return SelectiveScan.apply(x, delta, B, C, A_log, h0)


def tiles(batch, T, C, N):
    """(sequences, channels) slices covering (batch, C), each tile at most TILE_ELEMENTS numbers of (b, T, c, N),
    unless T * N alone is more (then one sequence x one channel)."""
    c_step = max(1, min(C, TILE_ELEMENTS // (T * N)))
    b_step = max(1, TILE_ELEMENTS // (T * c_step * N))
    return [(slice(b, b + b_step), slice(c, c + c_step)) for b in range(0, batch, b_step) for c in range(0, C, c_step)]


def tile_states(x, delta, B, A_log, h0):
    """One tile's log a_t and every h_t, (b, T, c, N) each, by mamba.transition and triangular_scan."""
    log_a, b = transition(x, delta, B, A_log)
    h = triangular_scan(log_a.flatten(2), b.flatten(2), None if h0 is None else h0.flatten(1))
    return log_a, h.unflatten(2, b.shape[2:])


class SelectiveScan(torch.autograd.Function):
    """mamba.selective_scan tile by tile (tiles), keeping only its inputs for the backward pass (the comment above)."""

    @staticmethod
    def forward(ctx, x, delta, B, C, A_log, h0):
        y, h_end = torch.empty_like(x), x.new_empty(*x.shape[:1], *A_log.shape)
        for rows, channels in tiles(x.size(0), x.size(1), *A_log.shape):
            start = None if h0 is None else h0[rows, channels]
            _, h = tile_states(x[rows, :, channels], delta[rows, :, channels], B[rows], A_log[channels], start)
            y[rows, :, channels] = torch.einsum("btcn,btn->btc", h, C[rows])  # y_t = h_t C_t
            h_end[rows, channels] = h[:, -1]
        ctx.mark_non_differentiable(h_end)  # a state carried on to the next window, where its gradient is cut
        ctx.save_for_backward(x, delta, B, C, A_log, h0)
        return y, h_end

    @staticmethod
    @once_differentiable  # refused, not supported: a second derivative through the tiles is untested
    def backward(ctx, grad_y, grad_h_end):  # grad_h_end: zeros, unused (h_end is marked non-differentiable)
        x, delta, B, C, A_log, h0 = ctx.saved_tensors
        dx, d_delta, dB, dC, dA_log = (torch.zeros_like(t) for t in (x, delta, B, C, A_log))
        A = -A_log.exp()
        for rows, channels in tiles(x.size(0), x.size(1), *A_log.shape):
            xs, ds, dy = x[rows, :, channels], delta[rows, :, channels], grad_y[rows, :, channels]
            start = None if h0 is None else h0[rows, channels]
            log_a, h = tile_states(xs, ds, B[rows], A_log[channels], start)
            dC[rows] += torch.einsum("btcn,btc->btn", h, dy)
            # lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}: the forward scan on the reversed positions
            g = dy[..., None] * C[rows, :, None, :]
            log_a_next = F.pad(log_a[:, 1:], (0, 0, 0, 0, 0, 1))  # log a_{t+1}; 0 past the end, where lambda is 0
            lam = triangular_scan(log_a_next.flip(1).flatten(2), g.flip(1).flatten(2)).flip(1).view_as(h)
            h_before = torch.cat([torch.zeros_like(h[:, :1]) if start is None else start[:, None], h[:, :-1]], 1)
            # dL/d(Delta_t A), with (1 - MIN_KEEP) exp(Delta_t A) from Delta_t A itself: a_t - MIN_KEEP would cancel
            d_decay = lam * h_before * torch.exp(math.log1p(-MIN_KEEP) + ds[..., None] * A[channels])
            d_write = torch.einsum("btcn,btn->btc", lam, B[rows])  # dL/d(Delta_t x_t)
            dB[rows] += torch.einsum("btcn,btc->btn", lam, ds * xs)
            dx[rows, :, channels] = ds * d_write
            d_delta[rows, :, channels] = xs * d_write + torch.einsum("btcn,cn->btc", d_decay, A[channels])
            dA_log[channels] += torch.einsum("btcn,btc->cn", d_decay, ds) * A[channels]
        return dx, d_delta, dB, dC, dA_log, None


# -----------------------------------------------------------------------------
# attention: one fused kernel (flash or memory-efficient attention where available)


def fused_attention(q, k, v, allowed, dropout):
    """transformer.CausalSelfAttention.attend's result; allowed None means causal."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=allowed is None)


# -----------------------------------------------------------------------------
# the report's model: backpropagation through time, written out
#
# The model at each position t (newllm.py; P_t = W_x x_t + b_0 is computed for every position before the
# loop, because it never reads the context):
#     z_0 = P_t + W_c c_{t-1};   h_0 = drop(relu(z_0))
#     z_l = W_l h_{l-1} + b_l;   h_l = drop(relu(z_l))          l = 1 .. L-1
#     c_t = c_{t-1} + W_ctx h_{L-1} + b_ctx
# Autograd records ~3L operations at every position and adds each weight's gradient, a thin (H x B) @ (B x H)
# product, into .grad T times over. Only the gradients flowing backwards through the positions must be
# computed one position at a time; each weight's gradient is a sum over positions, dW_l = sum_t dz_l,t^T
# h_{l-1,t}, so it is computed after the loop as one product of T*B rows. Dropout and ReLU leave
# h_l = z_l * D_l, D_l = mask_l where z_l > 0, else 0; D_l is recovered as sign(h_l) * mask_l.


def report_loop(cell, x, masks=None):
    """cell(x) for newllm.ContextCell with the report's update: x (B, T, E) -> h (B, T, H).
    masks: dropout's multipliers, one (T, B, H) per layer (drawn here when None and dropout is on)."""
    E = cell.config.embed_dim
    first = cell.fnn[0]
    # W [x_t ; c] = W_x x_t + W_c c: the token half for every position in one product, before the loop
    token_part = F.linear(x, first.weight[:, :E], first.bias)  # (B, T, H)
    token_part = at_least_float32(token_part).transpose(0, 1).contiguous()  # (T, B, H); summed in float32
    if masks is None and cell.training and cell.config.dropout > 0:
        masks = dropout_masks(token_part, cell.config.dropout, cell.config.layers)
    weights = [first.weight[:, E:].contiguous(), *(p for layer in cell.fnn[1:] for p in (layer.weight, layer.bias)),
               cell.to_context.weight, cell.to_context.bias]
    # a bfloat16 or float16 model's weights join the float32 sum in float32 (a no-op for a float32 model)
    hidden = context_loop(masks, token_part, *(w.to(token_part.dtype) for w in weights))  # (T, B, H)
    return hidden.transpose(0, 1).to(x.dtype)


def dropout_masks(like, p, layers):
    """One tensor shaped like `like` per layer, of dropout's multipliers: 0, or 1 / (1 - p) where a uniform draw
    falls below 1 - p (torch.rand fills a tensor faster than bernoulli_ does)."""
    keep = 1 - p
    return [torch.rand_like(like).lt_(keep).div_(keep) for _ in range(layers)]


def onednn_works():
    """Whether this PyTorch does the loop's products with oneDNN, and gets them right. The ops are private to
    PyTorch (its compiler's CPU backend uses them): every call form used is tried once on random numbers against
    torch's own product; anything missing, changed or wrong falls back to torch's products."""
    try:
        numbers = torch.Generator().manual_seed(0)  # its own generator: importing this file changes no random state
        x, other, w, b = (torch.randn(*shape, generator=numbers) for shape in ((3, 5), (3, 4), (4, 5), (4,)))
        laid_out = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        mkldnn = torch.ops.mkldnn._linear_pointwise
        answers = [(mkldnn(x, laid_out, None, "none", [], ""), x @ w.T),
                   (mkldnn(x, laid_out, b, "relu", [], ""), torch.relu(x @ w.T + b)),
                   (mkldnn.binary(x, other, laid_out, None, "add"), other + x @ w.T),
                   (mkldnn.binary(x, other, laid_out, b, "add"), other + x @ w.T + b),
                   (mkldnn(x.T.contiguous().T, w.T.contiguous().T, None, "none", [], ""), x @ w.T)]  # strided, as in backward
        return all(torch.allclose(got, expected, rtol=1e-4, atol=1e-5) for got, expected in answers)
    except Exception:  # noqa: BLE001  (missing or changed in this version: torch's products do the work)
        return False


ONEDNN_WORKS = onednn_works()


class Products:
    """The loop's matrix products, x (rows, n) times the transpose of a weight (m, n) as nn.Linear stores it:
    by oneDNN for float32 on a CPU (where `torch.backends.mkldnn.enabled` is on and the probe above passed),
    else by torch. `laid_out` rearranges a weight once per pass into oneDNN's blocked layout for products of
    B rows (torch needs none). results/bench_products.json has the figures this choice rests on."""

    def __init__(self, like):
        self.onednn = (ONEDNN_WORKS and torch.backends.mkldnn.enabled and like.device.type == "cpu"
                       and like.dtype == torch.float32)
        self.rows = like.size(-2)  # B: the rows of every product inside the loop

    def laid_out(self, weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.rows) if self.onednn else weight

    def linear(self, x, weight):  # x W^T
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return x @ weight.T

    def linear_relu(self, x, weight, bias):  # relu(x W^T + b)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
        return torch.addmm(bias, x, weight.T).relu_()

    def plus_linear(self, other, x, weight, bias=None):  # other + x W^T (+ b)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")
        return torch.addmm(other if bias is None else other + bias, x, weight.T)


class ContextLoop(torch.autograd.Function):
    """masks: L tensors (T, B, H) or None; token_part P (T, B, H); W_c (H, C), then W_1, b_1, ..., W_{L-1},
    b_{L-1}, W_ctx (C, H), b_ctx (C) -> h_{L-1} at every position (T, B, H).

    Every per-position tensor is kept one per layer, (T, B, H), not as one (L, T, B, H) block: blocks of 32 MiB
    and more go back to the system when freed (cli.reuse_freed_memory), and would be paged in again every step."""

    @staticmethod
    def forward(ctx, masks, token_part, context_weight, *weights):
        with torch.autocast(token_part.device.type, enabled=False):  # the context is summed: never in bfloat16
            layers, (out_weight, out_bias) = list(zip(weights[:-2:2], weights[1:-2:2])), weights[-2:]
            T, B, H = token_part.shape
            products = Products(token_part)
            hidden = [token_part.new_empty(T, B, H) for _ in range(len(layers) + 1)]  # h_l after dropout
            contexts = token_part.new_empty(T, B, context_weight.size(1))  # c_{t-1} at every position
            context = token_part.new_zeros(B, context_weight.size(1))  # c_0 = 0
            loop_weights = [products.laid_out(w) for w in (context_weight, *(w for w, _ in layers), out_weight)]
            loop_layers = list(zip(loop_weights[1:-1], (b for _, b in layers)))

            def dropped(h, l, t):  # h_l = drop(relu(z_l)), written where backward will read it
                return torch.mul(h, masks[l][t], out=hidden[l][t]) if masks is not None else hidden[l][t].copy_(h)

            for t in range(T):
                contexts[t] = context
                h = dropped(products.plus_linear(token_part[t], context, loop_weights[0]).relu_(), 0, t)  # h_0
                for l, (weight, bias) in enumerate(loop_layers, start=1):
                    h = dropped(products.linear_relu(h, weight, bias), l, t)  # h_l
                context = products.plus_linear(context, h, loop_weights[-1], out_bias)  # c_t = c_{t-1} + W_ctx h + b_ctx
            ctx.layers = len(hidden)
            ctx.save_for_backward(*hidden, contexts, context_weight, out_weight, *weights[:-2:2], *(masks or ()))
            return hidden[-1].clone()

    @staticmethod
    @once_differentiable  # the loop's own products are not differentiated again
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            saved, L, (T, B, _) = ctx.saved_tensors, ctx.layers, grad_out.shape
            hidden, (contexts, context_weight, out_weight) = saved[:L], saved[L:L + 3]
            layer_weights, masks = saved[L + 3:2 * L + 2], saved[2 * L + 2:]  # masks: () without dropout
            products = Products(grad_out)
            multiplier = [h.sign() for h in hidden]  # D_l (dz = dh * D): h_l >= 0, so 1 where h_l > 0
            for d, mask in zip(multiplier, masks):
                d.mul_(mask)
            # backwards multiplies by W rather than W^T: back_weights[l] is W_l^T (0: W_c^T, L: W_ctx^T), laid out once
            back_weights = [products.laid_out(w.T) for w in (context_weight, *layer_weights, out_weight)]
            grad_z = [torch.empty_like(h) for h in hidden]  # dL/dz_l at every position
            grad_c = grad_out.new_empty(T, B, context_weight.size(1))  # dL/dc_t at every position
            dc = grad_out.new_zeros(B, context_weight.size(1))  # nothing after the last position
            for t in reversed(range(T)):
                grad_c[t] = dc
                dh = products.plus_linear(grad_out[t], dc, back_weights[-1])  # dL/dh_{L-1}: the output, and via c_t
                for l in reversed(range(1, L)):
                    dh = products.linear(torch.mul(dh, multiplier[l][t], out=grad_z[l][t]), back_weights[l])
                dz0 = torch.mul(dh, multiplier[0][t], out=grad_z[0][t])
                dc = products.plus_linear(dc, dz0, back_weights[0])  # dL/dc_{t-1} = dL/dc_t + dz_0 W_c
            # the weight gradients: sums over all positions, one large product each
            positions = lambda x: x.reshape(-1, x.size(-1))  # noqa: E731  (T, B, n) -> (T*B, n)
            summed = lambda a, b: products.linear(positions(a).T, positions(b).T)  # noqa: E731  sum_t a_t^T b_t
            grads = []
            for l in range(1, L):
                grads += [summed(grad_z[l], hidden[l - 1]), grad_z[l].sum((0, 1))]
            grads += [summed(grad_c, hidden[-1]), grad_c.sum((0, 1))]
            return None, grad_z[0], summed(grad_z[0], contexts), *grads


@torch.compiler.disable  # torch.compile would unroll the loop over positions, and cannot lower oneDNN's ops
def context_loop(masks, token_part, context_weight, *weights):
    return ContextLoop.apply(masks, token_part, context_weight, *weights)


# -----------------------------------------------------------------------------
# the chunked delta rule, its backward pass written out


def delta_rule_fast(q, k, v, beta, log_alpha=None, chunk=DELTA_CHUNK, initial=None):
    """delta_rule.delta_rule_chunked's result (o and the last S), by ChunkedDeltaRule. A carried-in S_0 (initial)
    takes no gradient, as training carries it (--carry-state cuts the gradient at the window)."""
    if initial is not None and initial.requires_grad:
        raise ValueError("delta_rule_fast does not differentiate the initial state: pass it detached")
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta, log_alpha, initial = map(at_least_float32, (q, k, v, beta, log_alpha, initial))
        if log_alpha is None:
            log_alpha = torch.zeros_like(beta)
        o, S = apply_chunked_delta_rule(q, k, v, beta, log_alpha, initial, min(chunk, k.shape[2]))
    return o.to(out_dtype), S


@torch.compiler.disable  # torch.compile would unroll the loop over chunks into its graph: minutes to compile
def apply_chunked_delta_rule(q, k, v, beta, log_alpha, initial, Q):
    return ChunkedDeltaRule.apply(q, k, v, beta, log_alpha, initial, Q)


def batched(x):
    """(..., m, p) -> (batch, m, p): the 3-d shape baddbmm takes. A view, never a copy (view fails loudly where
    reshape would copy), so that an in-place baddbmm_ on it writes into x itself."""
    return x.view(-1, *x.shape[-2:])


def to_chunks(x, n, Q):
    """(B, nh, T, ...) -> (n, B, nh, Q, ...), chunk first and contiguous, zero-padded to n * Q positions, so
    that the loop over chunks reads and writes each chunk's slice in place."""
    pad = n * Q - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (n, Q)).movedim(2, 0).contiguous()


def from_chunks(x, T):
    """(n, B, nh, Q, ...) -> (B, nh, T, ...), laid out in memory as (B, T, nh, ...): the caller's next step,
    which transposes back to positions first, then needs no copy."""
    positions_first = x.movedim(0, 1).transpose(2, 3).contiguous()  # (B, n, Q, nh, ...)
    return positions_first.flatten(1, 2)[:, :T].transpose(1, 2)


class ChunkedDeltaRule(torch.autograd.Function):
    """delta_rule.delta_rule_chunked's three lines (its docstring) with the backward pass written out: the
    forward pass keeps what the gradient needs, and the backward pass is the chain rule through the three
    lines in reverse (the loop over chunks last chunk first). Chunked tensors are (n, B, nh, Q, ...)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, initial, Q):
        B, nh, T, dk = k.shape
        dv = v.shape[-1]
        n = -(-T // Q)
        q, k, v, beta, log_alpha = (to_chunks(x, n, Q) for x in (q, k, v, beta, log_alpha))
        g = log_alpha.cumsum(-1)
        gamma = g.exp()
        # decay[t, i] = exp(g_t - g_i) for i <= t; above the diagonal exp may overflow to inf, which tril_ zeroes
        decay = (g[..., :, None] - g[..., None, :]).exp_().tril_()  # (.., Q, Q)
        decayed_gram = (k @ k.mT).mul_(decay)
        eye = torch.eye(Q, dtype=q.dtype, device=q.device)
        lower = (beta[..., None] * decayed_gram).tril_(-1).add_(eye)  # I + A
        # M formed once: two products with it cost less than two triangular solves
        M = torch.linalg.solve_triangular(lower, eye.expand(lower.shape), upper=False, unitriangular=True)
        scaled_k, scaled_v = (beta * gamma)[..., None] * k, beta[..., None] * v
        W, U = M @ scaled_k, M @ scaled_v  # U holds U0 until the loop subtracts W S_0^T in place
        to_end = (g[..., -1:] - g).exp()
        decayed_k = to_end[..., None] * k
        last = gamma[..., -1, None, None]
        S = q.new_empty(n, B, nh, dv, dk)
        S[0] = 0 if initial is None else initial
        for c in range(n):
            batched(U[c]).baddbmm_(batched(W[c]), batched(S[c]).mT, alpha=-1)  # U = U0 - W S_0^T
            if c + 1 < n:  # the next chunk's S_0
                batched(torch.mul(S[c], last[c], out=S[c + 1])).baddbmm_(batched(U[c]).mT, batched(decayed_k[c]))
        S_end = torch.baddbmm(batched(S[-1] * last[-1]), batched(U[-1]).mT, batched(decayed_k[-1])).view_as(S[-1])
        ctx.mark_non_differentiable(S_end)  # a state carried on to the next window, where its gradient is cut
        read_old = q @ S.mT
        P = (q @ k.mT).mul_(decay)
        o = torch.addcmul(P @ U, gamma[..., None], read_old)
        ctx.save_for_backward(q, k, v, beta, gamma, to_end, decay, decayed_gram, M, scaled_k, scaled_v, W, S, U,
                              decayed_k, P, read_old)
        ctx.length = T
        return from_chunks(o, T), S_end

    @staticmethod
    @once_differentiable  # the forward pass records no graph: a second derivative through it would be wrong
    def backward(ctx, grad_o, grad_S_end):  # grad_S_end: none, S_end is not differentiable
        (q, k, v, beta, gamma, to_end, decay, decayed_gram, M, scaled_k, scaled_v, W, S, U, decayed_k, P,
         read_old) = ctx.saved_tensors
        n, Q = q.shape[0], q.shape[3]
        dO = to_chunks(grad_o, n, Q)
        # O = diag(gamma) R S_0^T + P U,  P = (R K^T) * decay
        dP, dU = dO @ U.mT, P.mT @ dO
        gamma_dO = gamma[..., None] * dO
        dS = gamma_dO.mT @ q  # what each chunk's S_0 gets from its outputs
        dQK = dP * decay
        dq = torch.baddbmm(batched(dQK @ k), batched(gamma_dO), batched(S)).view_as(q)
        dgamma = (dO * read_old).sum(-1)
        # the loop, last chunk first: S_next = gamma_Q S_0 + U^T D K and U = U0 - W S_0^T, so
        # dU += D K dS_next^T and dS_0 += gamma_Q dS_next - dU^T W
        dS_ends = torch.empty_like(S)
        dS_ends[-1] = 0
        last = gamma[..., -1, None, None]
        for c in reversed(range(n)):
            batched(dU[c]).baddbmm_(batched(decayed_k[c]), batched(dS_ends[c]).mT)
            if c > 0:
                batched(torch.addcmul(dS[c], last[c], dS_ends[c], out=dS_ends[c - 1])).baddbmm_(
                    batched(dU[c]).mT, batched(W[c]), alpha=-1)
        d_decayed_k = U @ dS_ends
        dgamma[..., -1] += (dS_ends * S).sum((-2, -1))
        # W = M (beta gamma K), U0 = M (beta V): dU0 = dU, dW = -dU S_0 (kept with its sign flipped)
        minus_dW = dU @ S
        dM = torch.baddbmm(batched(dU @ scaled_v.mT), batched(minus_dW), batched(scaled_k.mT), alpha=-1).view_as(M)
        minus_d_scaled_k, d_scaled_v = M.mT @ minus_dW, M.mT @ dU
        # M = (I + A)^{-1}: dA = -M^T dM M^T, on A's strictly lower part; A = beta_t * decayed_gram
        dA = -(M.mT @ dM @ M.mT).tril_(-1)
        dA_gram = dA * decayed_gram
        dgram = dA.mul_(decay).mul_(beta[..., None])
        dk = (dgram + dgram.mT) @ k + dQK.mT @ q
        minus_d_beta_gamma = (minus_d_scaled_k * k).sum(-1)
        dk.addcmul_((beta * gamma)[..., None], minus_d_scaled_k, value=-1).addcmul_(to_end[..., None], d_decayed_k)
        dv = beta[..., None] * d_scaled_v
        dbeta = dA_gram.sum(-1) - gamma * minus_d_beta_gamma + (d_scaled_v * v).sum(-1)
        dgamma -= beta * minus_d_beta_gamma
        # everything that depends on g: decay = exp(g_t - g_i), gamma = exp(g), to_end = exp(g_Q - g)
        d_exponent = dP.mul_(P).add_(dA_gram.mul_(beta[..., None]))
        d_to_end = (d_decayed_k * k).sum(-1) * to_end
        dg = d_exponent.sum(-1) - d_exponent.sum(-2) + dgamma * gamma - d_to_end
        dg[..., -1] += d_to_end.sum(-1)
        d_log_alpha = dg.flip(-1).cumsum(-1).flip(-1)  # g = cumsum(log_alpha)
        T = ctx.length
        return (from_chunks(dq, T), from_chunks(dk, T), from_chunks(dv, T), from_chunks(dbeta, T),
                from_chunks(d_log_alpha, T), None, None)
