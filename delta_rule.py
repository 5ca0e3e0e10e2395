"""The (gated) delta rule: a fixed-size "context matrix" memory updated by error correction.

DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025).
Per batch row and head, at each position t:

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T      (S_0 = 0, or carried in)
    o_t = S_t q_t

k_t is L2-normalised by the caller, beta_t in (0, 1) is how strongly to write, alpha_t = exp(log_alpha_t)
in (0, 1] is how much of the old memory to keep (no gate: alpha_t = 1). Reading S k_t gives what the memory
currently stores under k_t; the update replaces (a beta_t fraction of) it by v_t instead of adding on top.

Glossary: B batch rows, nh heads, T positions, dk key/query width, dv value width, Q = DELTA_CHUNK
positions per chunk, n = ceil(T / Q) chunks. S is (dv, dk) per batch row and head.

    delta_rule_step      one position (generation uses it)
    delta_rule_loop      the definition: delta_rule_step at every position
    delta_rule_chunked   the same numbers a chunk at a time (the WY / UT form, Yang et al. 2024, section 3),
                         what training runs; autograd differentiates it. fast.py has it with its
                         backward pass written out.

    python -m pytest -q test_delta_rule.py     # the three agree, values and gradients
"""
import torch

DELTA_CHUNK = 32  # positions per chunk of the training form


def at_least_float32(x):
    """float32 for bfloat16 and float16 inputs (autocast), float64 stays float64 (the tests' reference):
    bfloat16 has no solve_triangular kernel, and a recurrence summed in it drifts."""
    return None if x is None else x.to(torch.promote_types(x.dtype, torch.float32))


def delta_rule_step(S, q, k, v, beta, log_alpha=None):
    """One position. S: (B, nh, dv, dk); q, k: (B, nh, dk); v: (B, nh, dv); beta, log_alpha: (B, nh).
    Returns (o: (B, nh, dv) in v's dtype, S_new: (B, nh, dv, dk) in at least float32)."""
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        S, q, k, v, beta, log_alpha = map(at_least_float32, (S, q, k, v, beta, log_alpha))
        if log_alpha is not None:
            S = log_alpha.exp()[..., None, None] * S                 # forget: alpha_t S_{t-1}
        u = beta[..., None] * (v - (S @ k[..., None]).squeeze(-1))  # (B, nh, dv) new value minus what S says for k
        S = S + u[..., None] * k[..., None, :]                      # (B, nh, dv, dk) S + u k^T
        o = (S @ q[..., None]).squeeze(-1)                          # (B, nh, dv) read with the query
    return o.to(out_dtype), S


def delta_rule_loop(q, k, v, beta, log_alpha=None, initial=None):
    """The definition, one position at a time. q, k: (B, nh, T, dk); v: (B, nh, T, dv); beta, log_alpha:
    (B, nh, T); S_0 = initial (B, nh, dv, dk) or 0. Returns o: (B, nh, T, dv) and S_T."""
    B, nh, T, dk = k.shape
    S = k.new_zeros(B, nh, v.shape[-1], dk) if initial is None else initial
    outs = []
    for t in range(T):
        la = None if log_alpha is None else log_alpha[:, :, t]
        o, S = delta_rule_step(S, q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], la)
        outs.append(o)
    return torch.stack(outs, dim=2), S                              # (B, nh, T, dv), (B, nh, dv, dk)


def delta_rule_chunked(q, k, v, beta, log_alpha=None, chunk=DELTA_CHUNK, initial=None):
    """The same result as delta_rule_loop (o and the last S), a chunk of positions at a time.

    Rewrite the update as S_t = alpha_t S_{t-1} + u_t k_t^T with u_t = beta_t (v_t - alpha_t S_{t-1} k_t).
    Take a chunk of Q positions and S_0, the state carried into it from the chunks before. Let g_t = cumsum
    of log_alpha inside the chunk, gamma_t = exp(g_t), and decay[t, i] = exp(g_t - g_i) for i <= t, else 0
    (the memory's decay from position i to t). Then
        S_t = gamma_t S_0 + sum_{i<=t} decay[t, i] u_i k_i^T
        u_t + beta_t sum_{i<t} decay[t, i] (k_t . k_i) u_i = beta_t (v_t - gamma_t S_0 k_t)
    i.e. (I + A) U = diag(beta) V - diag(beta gamma) K S_0^T, A[t, i] = beta_t decay[t, i] (k_t . k_i) for i < t.
    With M = (I + A)^{-1} (unit lower-triangular) and R the chunk's queries (rows are positions):
        W = M diag(beta gamma) K,   U0 = M diag(beta) V                     all chunks at once
        U = U0 - W S_0^T,   S_end = gamma_Q S_0 + U^T D K,   D = diag(exp(g_Q - g))   chunk after chunk
        O = diag(gamma) R S_0^T + P U,   P = (R K^T) * decay                all chunks at once
    Only the middle line runs chunk after chunk.
    """
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):              # float32 (or float64) even under bf16 autocast
        q, k, v, beta, log_alpha, S = map(at_least_float32, (q, k, v, beta, log_alpha, initial))
        if log_alpha is None:
            log_alpha = torch.zeros_like(beta)                      # no gate: alpha = 1
        B, nh, T, dk = k.shape
        Q = min(chunk, T)
        n = -(-T // Q)                                              # ceil(T / Q)
        # zero padding at the end is harmless: beta = 0 writes nothing, log_alpha = 0 forgets nothing
        q, k, v, beta, log_alpha = (in_chunks(x, n, Q) for x in (q, k, v, beta, log_alpha))  # (B, nh, n, Q, ...)

        g = log_alpha.cumsum(-1)                                    # (B, nh, n, Q)
        gamma = g.exp()
        below = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
        # above the diagonal g_t - g_i > 0 could overflow exp: masked to -inf first, so it is exp(-inf) = 0
        decay = (g[..., :, None] - g[..., None, :]).masked_fill(~below, float("-inf")).exp()  # (.., Q, Q)
        eye = torch.eye(Q, dtype=q.dtype, device=q.device)
        lower = eye + (beta[..., None] * (k @ k.mT) * decay).tril(-1)  # I + A
        W = torch.linalg.solve_triangular(lower, (beta * gamma)[..., None] * k, upper=False, unitriangular=True)
        U0 = torch.linalg.solve_triangular(lower, beta[..., None] * v, upper=False, unitriangular=True)
        decayed_k = (g[..., -1:] - g).exp()[..., None] * k          # D K: (.., Q, dk)
        P = (q @ k.mT) * decay                                      # (.., Q, Q)

        S = q.new_zeros(B, nh, v.shape[-1], dk) if S is None else S  # the state carried into the first chunk
        outs = []
        for c in range(n):
            U = U0[:, :, c] - W[:, :, c] @ S.mT                     # (B, nh, Q, dv)
            outs.append(gamma[:, :, c, :, None] * (q[:, :, c] @ S.mT) + P[:, :, c] @ U)  # (B, nh, Q, dv)
            S = gamma[:, :, c, -1, None, None] * S + U.mT @ decayed_k[:, :, c]  # (B, nh, dv, dk)
        o = torch.cat(outs, dim=2)[:, :, :T]                        # (B, nh, T, dv)
    return o.to(out_dtype), S


def in_chunks(x, n, Q):
    """(B, nh, T, ...) -> (B, nh, n, Q, ...), zero-padded to n * Q positions."""
    pad = n * Q - x.shape[2]
    x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (n, Q))
