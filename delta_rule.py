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
delta_rule_chunked computes the same thing a chunk at a time and is what training runs (stack.py's
matrix mixer). test_delta_rule.py checks that they agree, values and gradients:

    python -m pytest -q test_delta_rule.py
"""
import torch
import torch.nn.functional as F


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


class UnitLowerInverse(torch.autograd.Function):
    """M = (I + A)^{-1} for a strictly lower triangular A (batched), with its gradient written out.

    Forming M once and multiplying by it is cheaper here than solving with it: this machine's triangular
    solve runs at a fraction of a batched product's speed, and autograd's backward of a solve solves again.
    With M explicit the backward is two products: from dM = -M dA M,  dL/dA = -(M^T G M^T), strictly lower.
    """

    @staticmethod
    def forward(ctx, A):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        M = torch.linalg.solve_triangular(eye + A, eye.expand(A.shape), upper=False, unitriangular=True)
        ctx.save_for_backward(M)
        return M

    @staticmethod
    def backward(ctx, grad_M):
        M, = ctx.saved_tensors
        return -(M.mT @ grad_M @ M.mT).tril(-1)


@torch.compiler.disable  # as scan.parallel_scan: torch.compile would unroll the loop over chunks
def delta_rule_chunked(q, k, v, beta, log_alpha=None, chunk=CHUNK):
    """The same result as delta_rule_loop, a chunk of positions at a time.

    Rewrite the update as S_t = alpha_t S_{t-1} + u_t k_t^T with u_t = beta_t (v_t - alpha_t S_{t-1} k_t).
    In a chunk of Q positions starting from state S_0, let g_t = cumsum of log_alpha inside the chunk and
    gamma_t = exp(g_t). Then
        S_t = gamma_t S_0 + sum_{i<=t} exp(g_t - g_i) u_i k_i^T
        u_t + beta_t sum_{i<t} exp(g_t - g_i) (k_t . k_i) u_i = beta_t (v_t - gamma_t S_0 k_t)
    i.e. (I + A) U = diag(beta) V - diag(beta gamma) K S_0^T, A[t, i] = beta_t exp(g_t - g_i) (k_t . k_i) for i < t.
    With M = (I + A)^{-1} (the inverse of a unit lower-triangular matrix; rows of K, V, U, W, O are positions):
        W = M diag(beta gamma) K,   U0 = M diag(beta) V                     all chunks at once
        U = U0 - W S_0^T,   S_end = gamma_Q S_0 + U^T D K,   D = diag(exp(g_Q - g))   chunk after chunk
        O = diag(gamma) Q S_0^T + ((Q K^T) * causal mask (i <= t) * exp(g_t - g_i)) U   all chunks at once
    Only the middle line needs the previous chunk's state: a loop of two small products per chunk.
    """
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):              # float32 (or float64) even under bf16 autocast
        q, k, v, beta, log_alpha = _upcast(q, k, v, beta, log_alpha)
        if log_alpha is None:
            log_alpha = torch.zeros_like(beta)                      # no gate: alpha = 1
        B, nh, T, dk = k.shape
        dv = v.shape[-1]
        Q = min(chunk, T)
        n = -(-T // Q)  # ceil(T / Q)
        # Zero padding is harmless: beta = 0 writes nothing, log_alpha = 0 forgets nothing, and it comes last.
        pad = n * Q - T
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            beta, log_alpha = (F.pad(x, (0, pad)) for x in (beta, log_alpha))
        # contiguous once here, not inside every product below (the heads-first inputs are transposed views)
        q, k, v = (x.reshape(B, nh, n, Q, -1).contiguous() for x in (q, k, v))  # (B, nh, n, Q, dk or dv)
        beta, log_alpha = (x.reshape(B, nh, n, Q) for x in (beta, log_alpha))  # (B, nh, n, Q)

        g = log_alpha.cumsum(-1)                                    # (B, nh, n, Q) log of decay since chunk start
        gamma = g.exp()                                             # (B, nh, n, Q) gamma_t = exp(g_t) <= 1
        causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()  # (Q, Q) i <= t
        diff = g[..., :, None] - g[..., None, :]                    # (B, nh, n, Q, Q) g_t - g_i
        decay = diff.masked_fill(~causal, float("-inf")).exp()      # (B, nh, n, Q, Q) mask BEFORE exp: only exp(<= 0)

        # Within each chunk, all chunks at once.
        A = (beta[..., None] * decay * (k @ k.mT)).tril(-1)         # (B, nh, n, Q, Q) strictly lower triangular
        M = UnitLowerInverse.apply(A)                               # (B, nh, n, Q, Q) (I + A)^{-1}
        W = M @ ((beta * gamma)[..., None] * k)                     # (B, nh, n, Q, dk)
        U0 = M @ (beta[..., None] * v)                              # (B, nh, n, Q, dv)
        decayed_k = (g[..., -1:] - g).exp()[..., None] * k          # (B, nh, n, Q, dk) D K, exponent <= 0

        # Across chunks: the state each chunk starts from, and the values it actually writes. unbind, not
        # indexing: its backward is one stack, where n index steps would each fill a whole zero tensor.
        S = q.new_zeros(B, nh, dv, dk)
        starts, writes = [], []
        for W_c, U0_c, k_c, last_c in zip(W.unbind(2), U0.unbind(2), decayed_k.unbind(2), gamma[..., -1].unbind(2)):
            starts.append(S)
            writes.append(U0_c - W_c @ S.mT)                        # (B, nh, Q, dv) U = U0 - W S_0^T
            if len(writes) < n:
                S = last_c[..., None, None] * S + writes[-1].mT @ k_c  # the next chunk's S_0
        S, U = torch.stack(starts, dim=2), torch.stack(writes, dim=2)  # (B, nh, n, dv, dk), (B, nh, n, Q, dv)

        # All chunks at once again: what each position reads, from the old state and from this chunk.
        o = gamma[..., None] * (q @ S.mT) + ((q @ k.mT) * decay) @ U  # (B, nh, n, Q, dv)
        o = o.reshape(B, nh, n * Q, dv)[:, :, :T]                   # (B, nh, T, dv) cut the padding
    return o.to(out_dtype)
