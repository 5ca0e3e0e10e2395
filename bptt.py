"""
Backpropagation through time, written out for the report's recurrence (newllm.py), so
that training does only the work the sequential algorithm needs.

The model at each position t (newllm.py's glossary; P_t = W_x x_t + b_0 is computed for every
position before the loop, because it never reads the context):
    z_0 = P_t + W_c c_{t-1};   h_0 = drop(relu(z_0))
    z_l = W_l h_{l-1} + b_l;   h_l = drop(relu(z_l))          l = 1 .. L-1
    c_t = c_{t-1} + W_o h_{L-1} + b_o                         (the additive update, no gate, no norm)
and the loop returns h_{L-1} at every position (the token head reads it after the loop).
Names: W_c are the first Linear's columns that read c_{t-1} (W_x the ones that read x_t);
W_o, b_o are REPORT.md's W_ctx, b_ctx (newllm.py's `to_context`).

Why write the backward pass by hand. Autograd handles this loop well but not cheaply: at every
position it records ~3L operations, and for each weight it computes that position's gradient
(a thin (H x B) @ (B x H) product) and adds it into the weight's .grad, T times over. But only
the gradients flowing *backwards through the positions* must be computed one position at a
time. The weight gradients are sums over positions,
    dW_l = sum_t dz_l,t^T h_{l-1,t},
so the backward pass below stores every dz_l,t and computes each weight's gradient after the
loop as one large matrix product (T*B rows at once), which a CPU does at several times the speed.

Dropout and ReLU leave h_l = z_l * D_l with D_l = mask_l where z_l > 0, else 0 (mask_l: 0, or
1 / (1 - p) for the units kept). D_l is recovered from h_l and the mask (h_l > 0 exactly where
z_l > 0 and the unit is kept: D_l = sign(h_l) * mask_l), so nothing else is stored.

The products themselves. On a CPU, in float32, they go through oneDNN (torch.ops.mkldnn, part of
PyTorch's x86 builds) rather than torch's default BLAS, and the loop's weights are first laid out in
oneDNN's blocked format for products of B rows (once per pass, not at every position). Measured by
`python bench.py --products` on the README's machine (2 cores of an AMD EPYC with AVX-512), GFLOPS:
                                                 torch (MKL)   oneDNN   oneDNN, weight laid out
    32 x 512 by 512 x 512 (the loop's)               137         212          339
    512 x 2048 by 2048 x 512 (a weight's gradient)   200         330
It is the same float32 arithmetic, summed in another order. Anywhere else (float64, a GPU, a build
without these ops) the loop uses torch's own products.

test_models.py checks values and every gradient against autograd on newllm.py's literal loop (in
float64, torch's products), and oneDNN's products against torch's (in float32).
"""

import torch


def onednn_available():
    """Whether this PyTorch can do the loop's products with oneDNN. The ops are private to PyTorch (its
    compiler's CPU backend uses them), so they are tried once, on numbers whose answer is known."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 3), 2)
        product = torch.ops.mkldnn._linear_pointwise.binary(torch.ones(2, 3), torch.ones(2, 4), weight, None, "add")
        return torch.equal(product, torch.full((2, 4), 4.0))  # 1 + (1 + 1 + 1)
    except Exception:  # missing, or changed in this version: torch's own products do the work
        return False


USE_ONEDNN = onednn_available()  # the tests turn it off to compare the two kinds of product


class Products:
    """The loop's matrix products, each x (rows, n) times the transpose of a weight (m, n) as nn.Linear stores
    it: by oneDNN for float32 on a CPU (the docstring above says why), else by torch. `laid_out` rearranges a
    weight once per pass for the many products of B rows that read it (oneDNN's blocked layout; torch needs none)."""

    def __init__(self, like):
        self.onednn = USE_ONEDNN and like.device.type == "cpu" and like.dtype == torch.float32
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
    """masks: L tensors (T, B, H) of dropout's multipliers (0 or 1 / (1 - p)), or None; token_part P (T, B, H);
    W_c (H, C), then W_1, b_1, ..., W_{L-1}, b_{L-1}, W_o (C, H), b_o (C) -> h_{L-1} at every position.

    Every per-position tensor (the h_l, the dropout masks, and in backward the multipliers D_l and the dz_l)
    is kept one per layer, (T, B, H), not as one (L, T, B, H) block: at the default sizes such a block is
    32 MiB, the size from which glibc stops keeping freed memory for reuse (cli.py, reuse_freed_memory), so
    every step would page all four in again: a tenth of the step or more (README, Speed)."""

    @staticmethod
    def forward(ctx, masks, token_part, context_weight, *weights):
        with torch.autocast(token_part.device.type, enabled=False):  # the context is summed: never in bfloat16
            return ContextLoop.loop(ctx, masks, token_part, context_weight, *weights)

    @staticmethod
    def loop(ctx, masks, token_part, context_weight, *weights):
        layers, (out_weight, out_bias) = list(zip(weights[:-2:2], weights[1:-2:2])), weights[-2:]
        T, B, H = token_part.shape
        products = Products(token_part)
        hidden = [token_part.new_empty(T, B, H) for _ in range(len(layers) + 1)]  # h_l after dropout: for backward
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
            context = products.plus_linear(context, h, loop_weights[-1], out_bias)  # c_t = c_{t-1} + W_o h + b_o
        ctx.layers = len(hidden)
        ctx.save_for_backward(*hidden, contexts, context_weight, out_weight, *weights[:-2:2], *(masks or ()))
        return hidden[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the loop's own products are not differentiated again
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return ContextLoop.loop_backward(ctx, grad_out)

    @staticmethod
    def loop_backward(ctx, grad_out):
        saved, L, (T, B, _) = ctx.saved_tensors, ctx.layers, grad_out.shape
        hidden, (contexts, context_weight, out_weight) = saved[:L], saved[L:L + 3]
        layer_weights, masks = saved[L + 3:2 * L + 2], saved[2 * L + 2:]  # masks: () without dropout
        products = Products(grad_out)
        multiplier = [h.sign() for h in hidden]  # D_l at every position (dz = dh * D): h_l >= 0, so 1 where h_l > 0
        for d, mask in zip(multiplier, masks):
            d.mul_(mask)
        # going backwards multiplies by W rather than W^T: each weight transposed (and laid out) once, here;
        # back_weights[l] is W_l^T (0: W_c^T, L: W_o^T)
        back_weights = [products.laid_out(w.T) for w in (context_weight, *layer_weights, out_weight)]
        C = context_weight.size(1)
        grad_z = [torch.empty_like(h) for h in hidden]  # dL/dz_l at every position
        grad_c = grad_out.new_empty(T, B, C)  # dL/dc_t at every position
        dc = grad_out.new_zeros(B, C)  # dL/dc_t: nothing after the last position
        for t in reversed(range(T)):
            grad_c[t] = dc
            g = products.plus_linear(grad_out[t], dc, back_weights[-1])  # dL/dh_{L-1}: the output, and through c_t
            for l in reversed(range(1, L)):
                dz = torch.mul(g, multiplier[l][t], out=grad_z[l][t])
                g = products.linear(dz, back_weights[l])  # dL/dh_{l-1}
            dz0 = torch.mul(g, multiplier[0][t], out=grad_z[0][t])
            dc = products.plus_linear(dc, dz0, back_weights[0])  # dL/dc_{t-1} = dL/dc_t (the identity path) + dz_0 W_c
        # the weight gradients: sums over all positions, one large product each
        flat = lambda x: x.reshape(-1, x.size(-1))  # noqa: E731  (T, B, n) -> (T*B, n)
        summed = lambda a, b: products.linear(flat(a).T, flat(b).T)  # noqa: E731  sum_t a_t^T b_t (x = a^T, W = b^T)
        grads = []
        for l in range(1, L):
            grads += [summed(grad_z[l], hidden[l - 1]), grad_z[l].sum((0, 1))]
        grads += [summed(grad_c, hidden[-1]), grad_c.sum((0, 1))]
        return None, grad_z[0], summed(grad_z[0], contexts), *grads


@torch.compiler.disable  # torch.compile would unroll the loop over positions, and cannot lower oneDNN's ops
def context_loop(masks, token_part, context_weight, *weights):
    """ContextLoop.apply, left out of compiled graphs: the loop runs as written here, compiled or not."""
    return ContextLoop.apply(masks, token_part, context_weight, *weights)
