"""The (gated) delta rule: a fixed-size "context matrix" memory updated by error correction.

DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025).
Per batch row and head, at each position t:

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T      (S_0 = 0)
    o_t = S_t q_t

k_t is L2-normalised by the caller, beta_t in (0, 1) is how strongly to write, alpha_t = exp(log_alpha_t)
in (0, 1] is how much of the old memory to keep (no gate: alpha_t = 1). Reading S k_t gives what the memory
currently stores under k_t; the update replaces (a beta_t fraction of) it by v_t instead of adding on top.

Glossary: B batch rows, nh heads, T positions, dk key/query width, dv value width, Q = CHUNK positions
per chunk, n = ceil(T / Q) chunks. S is (dv, dk) per batch row and head.

delta_rule_loop is the definition (one position at a time, via delta_rule_step, also used for generation);
delta_rule_chunked computes the same thing a chunk at a time, with its backward pass written out
(ChunkedDeltaRule), and is what training runs (stack.py's matrix mixer). test_delta_rule.py checks that
they agree, values and gradients:

    python -m pytest -q test_delta_rule.py
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


CHUNK = 32  # positions per chunk of the training form: the fastest of 16 to 128 on a CPU (README, Speed)


def at_least_float32(x):
    """float32 for bfloat16 and float16 inputs (autocast), float64 stays float64 (the tests' reference):
    bfloat16 has no solve_triangular kernel, and a recurrence summed in it drifts."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _upcast(*xs):
    return [None if x is None else at_least_float32(x) for x in xs]


def delta_rule_step(S, q, k, v, beta, log_alpha=None):
    """One position. S: (B, nh, dv, dk); q, k: (B, nh, dk); v: (B, nh, dv); beta, log_alpha: (B, nh).
    Returns (o: (B, nh, dv) in v's dtype, S_new: (B, nh, dv, dk) in at least float32)."""
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        S, q, k, v, beta, log_alpha = _upcast(S, q, k, v, beta, log_alpha)
        if log_alpha is not None:
            S = log_alpha.exp()[..., None, None] * S                 # forget: alpha_t S_{t-1}
        u = beta[..., None] * (v - (S @ k[..., None]).squeeze(-1))  # (B, nh, dv) new value minus what S says for k
        S = S + u[..., None] * k[..., None, :]                      # (B, nh, dv, dk) S + u k^T
        o = (S @ q[..., None]).squeeze(-1)                          # (B, nh, dv) read with the query
    return o.to(out_dtype), S


def delta_rule_loop(q, k, v, beta, log_alpha=None):
    """The definition, one position at a time. q, k: (B, nh, T, dk); v: (B, nh, T, dv); beta, log_alpha:
    (B, nh, T). Returns o: (B, nh, T, dv)."""
    B, nh, T, dk = k.shape
    S = torch.zeros(B, nh, v.shape[-1], dk, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
    outs = []
    for t in range(T):
        la = None if log_alpha is None else log_alpha[:, :, t]
        o, S = delta_rule_step(S, q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], la)
        outs.append(o)
    return torch.stack(outs, dim=2)                                 # (B, nh, T, dv)


@torch.compiler.disable  # torch.compile would unroll the loop over chunks into its graph: minutes to compile
def delta_rule_chunked(q, k, v, beta, log_alpha=None, chunk=CHUNK):
    """The same result as delta_rule_loop, a chunk of positions at a time.

    Rewrite the update as S_t = alpha_t S_{t-1} + u_t k_t^T with u_t = beta_t (v_t - alpha_t S_{t-1} k_t).
    Take a chunk of Q positions and S_0, the state carried into it from the chunks before. Let g_t = cumsum
    of log_alpha inside the chunk, gamma_t = exp(g_t), and decay[t, i] = exp(g_t - g_i) for i <= t, else 0
    (the memory's decay from position i to t). Then
        S_t = gamma_t S_0 + sum_{i<=t} decay[t, i] u_i k_i^T
        u_t + beta_t sum_{i<t} decay[t, i] (k_t . k_i) u_i = beta_t (v_t - gamma_t S_0 k_t)
    i.e. (I + A) U = diag(beta) V - diag(beta gamma) K S_0^T, A[t, i] = beta_t decay[t, i] (k_t . k_i) for i < t.
    With M = (I + A)^{-1} (the inverse of a unit lower-triangular matrix) and R the chunk's queries (rows of
    R, K, V, U0, U, W, O are positions):
        W = M diag(beta gamma) K,   U0 = M diag(beta) V                     all chunks at once
        U = U0 - W S_0^T,   S_end = gamma_Q S_0 + U^T D K,   D = diag(exp(g_Q - g))   chunk after chunk
        O = diag(gamma) R S_0^T + P U,   P = (R K^T) * decay                all chunks at once
    Only the middle line runs chunk after chunk: a loop of two small products per chunk.
    """
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):              # float32 (or float64) even under bf16 autocast
        q, k, v, beta, log_alpha = _upcast(q, k, v, beta, log_alpha)
        if log_alpha is None:
            log_alpha = torch.zeros_like(beta)                      # no gate: alpha = 1
        o = ChunkedDeltaRule.apply(q, k, v, beta, log_alpha, min(chunk, k.shape[2]))
    return o.to(out_dtype)


def flat(x):
    """(..., m, p) -> (batch, m, p): the 3-d shape baddbmm takes. A view, never a copy (view fails loudly where
    reshape would copy), so that an in-place baddbmm_ on it writes into x itself."""
    return x.view(-1, *x.shape[-2:])


def to_chunks(x, n, Q):
    """(B, nh, T, ...) -> (n, B, nh, Q, ...), chunk first and contiguous, zero-padded to n * Q positions.
    Chunk first so that each chunk's slice is one block of memory: the loop over chunks then reads and
    writes its states and values in place, with no copies and no stacking afterwards."""
    pad = n * Q - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (n, Q)).movedim(2, 0).contiguous()


def from_chunks(x, T):
    """(n, B, nh, Q, ...) -> (B, nh, T, ...), laid out in memory as (B, T, nh, ...): the positions-first
    layout the caller transposes back to, so that its next step (in float32) needs no copy."""
    positions_first = x.movedim(0, 1).transpose(2, 3).contiguous()  # (B, n, Q, nh, ...)
    return positions_first.flatten(1, 2)[:, :T].transpose(1, 2)


class ChunkedDeltaRule(torch.autograd.Function):
    """delta_rule_chunked's computation (q, k, v, beta, log_alpha, Q -> o), with its backward pass written
    out. Autograd would record every step and keep every intermediate; here the forward pass keeps
    what the gradient needs, and the backward pass is the chain rule through the docstring's three lines,
    in reverse (the loop over chunks runs last chunk first). test_delta_rule.py checks it against autograd
    on delta_rule_loop. Shapes: chunked tensors are (n, B, nh, Q, ...), S_0 per chunk (n, B, nh, dv, dk)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, Q):
        B, nh, T, dk = k.shape
        dv = v.shape[-1]
        n = -(-T // Q)  # ceil(T / Q)
        # The zero padding is harmless: beta = 0 writes nothing, log_alpha = 0 forgets nothing, and it comes last.
        q, k, v, beta, log_alpha = (to_chunks(x, n, Q) for x in (q, k, v, beta, log_alpha))

        g = log_alpha.cumsum(-1)                                    # log of the decay since the chunk's start
        gamma = g.exp()                                             # gamma_t = exp(g_t) <= 1
        # decay[t, i] = exp(g_t - g_i) for i <= t; above the diagonal exp may overflow to inf, which tril_ zeroes
        decay = (g[..., :, None] - g[..., None, :]).exp_().tril_()  # (.., Q, Q)
        decayed_gram = (k @ k.mT).mul_(decay)                       # (.., Q, Q) exp(g_t - g_i) (k_t . k_i)
        eye = torch.eye(Q, dtype=q.dtype, device=q.device)
        lower = (beta[..., None] * decayed_gram).tril_(-1).add_(eye)  # I + A
        M = torch.linalg.solve_triangular(lower, eye.expand(lower.shape), upper=False, unitriangular=True)
        # formed once: two products with M cost less than two triangular solves on a CPU (README, Speed)
        scaled_k, scaled_v = (beta * gamma)[..., None] * k, beta[..., None] * v
        # (.., Q, dk) and (.., Q, dv): U holds U0 = M diag(beta) V until the loop below subtracts W S_0^T in place
        W, U = M @ scaled_k, M @ scaled_v
        to_end = (g[..., -1:] - g).exp()                            # exp(g_Q - g_t): the diagonal of D
        decayed_k = to_end[..., None] * k                           # D K
        last = gamma[..., -1, None, None]                           # (n, B, nh, 1, 1) gamma_Q

        # Across chunks: the state each chunk starts from, and the values it writes (U0 becomes U in place).
        S = q.new_empty(n, B, nh, dv, dk)
        S[0] = 0
        for c in range(n):
            flat(U[c]).baddbmm_(flat(W[c]), flat(S[c]).mT, alpha=-1)  # U = U0 - W S_0^T
            if c + 1 < n:                                           # the next chunk's S_0
                flat(torch.mul(S[c], last[c], out=S[c + 1])).baddbmm_(flat(U[c]).mT, flat(decayed_k[c]))

        read_old = q @ S.mT                                         # (.., Q, dv) R S_0^T
        P = (q @ k.mT).mul_(decay)                                  # (.., Q, Q)
        o = torch.addcmul(P @ U, gamma[..., None], read_old)
        ctx.save_for_backward(q, k, v, beta, gamma, to_end, decay, decayed_gram, M, scaled_k, scaled_v, W, S, U,
                              decayed_k, P, read_old)
        ctx.length = T
        return from_chunks(o, T)                                    # (B, nh, T, dv)

    @staticmethod
    @once_differentiable  # the forward pass records no graph: a second derivative through it would be wrong
    def backward(ctx, grad_o):
        (q, k, v, beta, gamma, to_end, decay, decayed_gram, M, scaled_k, scaled_v, W, S, U, decayed_k, P,
         read_old) = ctx.saved_tensors
        n, Q = q.shape[0], q.shape[3]
        dO = to_chunks(grad_o, n, Q)

        # O = diag(gamma) R S_0^T + P U,  P = (R K^T) * decay
        dP, dU = dO @ U.mT, P.mT @ dO
        gamma_dO = gamma[..., None] * dO
        dS = gamma_dO.mT @ q                                        # what each chunk's S_0 gets from its outputs
        dQK = dP * decay
        dq = torch.baddbmm(flat(dQK @ k), flat(gamma_dO), flat(S)).view_as(q)
        dgamma = (dO * read_old).sum(-1)

        # The loop, last chunk first. S_next = gamma_Q S_0 + U^T D K and U = U0 - W S_0^T, so with dS_next the
        # gradient reaching the next chunk's S_0: dU += D K dS_next^T, dS_0 += gamma_Q dS_next - dU^T W.
        # dS_ends[c] is the gradient of chunk c's end state, the next chunk's S_0; dU is updated in place.
        dS_ends = torch.empty_like(S)
        dS_ends[-1] = 0                                             # nothing after the last chunk
        last = gamma[..., -1, None, None]
        for c in reversed(range(n)):
            flat(dU[c]).baddbmm_(flat(decayed_k[c]), flat(dS_ends[c]).mT)
            if c > 0:
                flat(torch.addcmul(dS[c], last[c], dS_ends[c], out=dS_ends[c - 1])).baddbmm_(
                    flat(dU[c]).mT, flat(W[c]), alpha=-1)
        d_decayed_k = U @ dS_ends
        dgamma[..., -1] += (dS_ends * S).sum((-2, -1))              # gamma_Q, the carried state's decay

        # W = M (beta gamma K), U0 = M (beta V), U = U0 - W S_0^T: dU0 = dU, dW = -dU S_0 (kept with its sign flipped)
        minus_dW = dU @ S
        dM = torch.baddbmm(flat(dU @ scaled_v.mT), flat(minus_dW), flat(scaled_k.mT), alpha=-1).view_as(M)
        minus_d_scaled_k, d_scaled_v = M.mT @ minus_dW, M.mT @ dU
        # M = (I + A)^{-1}: dA = -M^T dM M^T, on A's strictly lower part. A = beta_t * decayed_gram.
        dA = -(M.mT @ dM @ M.mT).tril_(-1)
        dA_gram = dA * decayed_gram                                 # dA * A / beta_t
        dgram = dA.mul_(decay).mul_(beta[..., None])                # through k k^T
        dk = (dgram + dgram.mT) @ k + dQK.mT @ q
        minus_d_beta_gamma = (minus_d_scaled_k * k).sum(-1)
        dk.addcmul_((beta * gamma)[..., None], minus_d_scaled_k, value=-1).addcmul_(to_end[..., None], d_decayed_k)
        dv = beta[..., None] * d_scaled_v
        dbeta = dA_gram.sum(-1) - gamma * minus_d_beta_gamma + (d_scaled_v * v).sum(-1)
        dgamma -= beta * minus_d_beta_gamma

        # Everything that depends on g: decay = exp(g_t - g_i), gamma = exp(g), to_end = exp(g_Q - g).
        d_exponent = dP.mul_(P).add_(dA_gram.mul_(beta[..., None]))  # d(decay) * decay, through P and A
        d_to_end = (d_decayed_k * k).sum(-1) * to_end
        dg = d_exponent.sum(-1) - d_exponent.sum(-2) + dgamma * gamma - d_to_end
        dg[..., -1] += d_to_end.sum(-1)
        d_log_alpha = dg.flip(-1).cumsum(-1).flip(-1)               # g = cumsum(log_alpha)

        T = ctx.length
        return from_chunks(dq, T), from_chunks(dk, T), from_chunks(dv, T), from_chunks(dbeta, T), \
            from_chunks(d_log_alpha, T), None
