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
z_l > 0 and the unit is kept), so nothing else is stored.

test_models.py checks values and every gradient against autograd on newllm.py's literal loop.
"""

import torch


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
        hidden = [token_part.new_empty(T, B, H) for _ in range(len(layers) + 1)]  # h_l after dropout: for backward
        contexts = token_part.new_empty(T, B, context_weight.size(1))  # c_{t-1} at every position
        context = token_part.new_zeros(B, context_weight.size(1))  # c_0 = 0
        for t in range(T):
            contexts[t] = context
            # relu(z_0) into hidden[0][t]; its dropout mask is applied in place just before the next layer reads it
            h = torch.addmm(token_part[t], context, context_weight.T, out=hidden[0][t]).relu_()
            for l, (weight, bias) in enumerate(layers):
                if masks is not None:
                    h.mul_(masks[l][t])
                h = torch.addmm(bias, h, weight.T, out=hidden[l + 1][t]).relu_()  # h_{l+1}
            if masks is not None:
                h.mul_(masks[-1][t])
            context = torch.addmm(context + out_bias, h, out_weight.T)  # c_t = c_{t-1} + W_o h + b_o
        ctx.layers = len(hidden)
        ctx.save_for_backward(*hidden, contexts, context_weight, out_weight, *weights[:-2:2], *(masks or ()))
        return hidden[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return ContextLoop.loop_backward(ctx, grad_out)

    @staticmethod
    def loop_backward(ctx, grad_out):
        saved, L, (T, B, _) = ctx.saved_tensors, ctx.layers, grad_out.shape
        hidden, (contexts, context_weight, out_weight) = saved[:L], saved[L:L + 3]
        layer_weights, masks = saved[L + 3:2 * L + 2], saved[2 * L + 2:]  # masks: () without dropout
        multiplier = [(h > 0).to(h.dtype) for h in hidden]  # D_l at every position: dz = dh * D
        for d, mask in zip(multiplier, masks):
            d.mul_(mask)
        grad_z = [torch.empty_like(h) for h in hidden]  # dL/dz_l at every position
        grad_c = grad_out.new_empty(T, B, out_weight.size(0))  # dL/dc_t at every position
        dc = grad_out.new_zeros(B, out_weight.size(0))  # dL/dc_t: nothing after the last position
        for t in reversed(range(T)):
            grad_c[t] = dc
            g = torch.addmm(grad_out[t], dc, out_weight)  # dL/dh_{L-1}: the output, and through c_t
            for l in reversed(range(1, L)):
                dz = torch.mul(g, multiplier[l][t], out=grad_z[l][t])
                g = dz @ layer_weights[l - 1]  # dL/dh_{l-1}
            dz0 = torch.mul(g, multiplier[0][t], out=grad_z[0][t])
            dc = torch.addmm(dc, dz0, context_weight)  # dL/dc_{t-1} = dL/dc_t (the identity path) + W_c^T dz_0
        # the weight gradients: sums over all positions, one large product each
        flat = lambda x: x.reshape(-1, x.size(-1))  # noqa: E731  (T, B, n) -> (T*B, n)
        grads = []
        for l in range(1, L):
            grads += [flat(grad_z[l]).T @ flat(hidden[l - 1]), grad_z[l].sum((0, 1))]
        grads += [flat(grad_c).T @ flat(hidden[-1]), grad_c.sum((0, 1))]
        grad_context_weight = flat(grad_z[0]).T @ flat(contexts)
        return None, grad_z[0], grad_context_weight, *grads
