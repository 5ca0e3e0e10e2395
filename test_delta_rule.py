"""Tests for delta_rule.py: the chunked form equals the definition, and the delta rule overwrites memory."""
import pytest
import torch
import torch.nn.functional as F

import fast
import delta_rule
from delta_rule import delta_rule_chunked, delta_rule_loop, delta_rule_step

# the lesson's chunked form (autograd) and the engine's (backward written out): both must equal the loop
CHUNKED = pytest.mark.parametrize("chunked", [delta_rule.delta_rule_chunked, fast.delta_rule_fast],
                                  ids=["lesson", "fast"])


def make_inputs(B=2, H=3, T=37, dk=8, dv=6, gated=True, dtype=torch.float64):
    """Inputs shaped like a model makes them: unit keys, beta = sigmoid, log_alpha = logsigmoid (mostly near 0)."""
    q = torch.randn(B, H, T, dk, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, dk, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, dv, dtype=dtype)
    beta = torch.sigmoid(torch.randn(B, H, T, dtype=dtype))
    log_alpha = F.logsigmoid(torch.randn(B, H, T, dtype=dtype) + 2) if gated else None
    return [x if x is None else x.requires_grad_() for x in (q, k, v, beta, log_alpha)]


def output_and_grads(fn, inputs, w):
    """fn's output o (of o and the last state) and the gradients of sum(o * w) w.r.t. every input given."""
    o, _ = fn(*inputs)
    leaves = [x for x in inputs if x is not None]
    return o, torch.autograd.grad((o * w).sum(), leaves)


def rel_err(a, b):
    """Max abs difference relative to the largest magnitude of the reference."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T", [37, 32, 5])  # padded to 3 chunks of 16, exactly 2, one short chunk
@pytest.mark.parametrize("gated", [True, False])
@CHUNKED
def test_chunked_equals_loop(dtype, tol, T, gated, chunked):
    """Chunked == loop in values and in gradients w.r.t. q, k, v, beta, log_alpha."""
    torch.manual_seed(0)
    inputs = make_inputs(T=T, gated=gated, dtype=dtype)
    w = torch.randn(2, 3, T, 6, dtype=dtype)
    o_ref, g_ref = output_and_grads(delta_rule_loop, inputs, w)
    o, g = output_and_grads(lambda *x: chunked(*x, chunk=16), inputs, w)
    assert o.dtype == dtype
    assert rel_err(o, o_ref) <= tol
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= tol


@CHUNKED
def test_chunked_takes_heads_first_views(chunked):
    """The matrix mixer passes heads-first views of positions-first tensors (a transpose, not a copy):
    the chunked form gives the loop's values and gradients for those too, over several chunks."""
    torch.manual_seed(0)
    inputs = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in make_inputs(T=37)]
    assert not inputs[0].is_contiguous()
    w = torch.randn(2, 3, 37, 6, dtype=torch.float64)
    o_ref, g_ref = output_and_grads(delta_rule_loop, inputs, w)
    o, g = output_and_grads(lambda *x: chunked(*x, chunk=16), inputs, w)
    assert rel_err(o, o_ref) <= 1e-10
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= 1e-10


@CHUNKED
def test_bfloat16_autocast(chunked):
    """Under bf16 autocast with bf16 inputs, chunked runs in float32 inside: bf16 out, finite, close to the loop."""
    torch.manual_seed(0)
    inputs = [x.detach().bfloat16().requires_grad_() if x is not None else None
              for x in make_inputs(T=37, dtype=torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = chunked(*inputs, chunk=16)
    o_ref, _ = delta_rule_loop(*[x.detach().float() for x in inputs])  # same bf16-rounded inputs, in float32
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    # 2**-8: the computation is float32, so only the final rounding of o to bf16 (<= 2**-9 relative) separates
    # them. Tighter than needed for accuracy on purpose: letting autocast run the matmuls in bf16 gives ~7e-3 here.
    assert rel_err(o.float(), o_ref) <= 2**-8
    o.float().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in inputs)


def one_hot(i, d=3):
    """Unit vector e_i in float64."""
    return F.one_hot(torch.tensor(i), d).double()


def run_loop(writes):
    """delta_rule_loop, no gate, on a list of (key, value, beta, query) for one batch row and head; o: (T, dv)."""
    k, v, beta, q = (torch.stack([torch.as_tensor(w[j], dtype=torch.float64) for w in writes])[None, None]
                     for j in range(4))
    return delta_rule_loop(q, k, v, beta)[0][0, 0]


def test_overwrite_and_idempotent_write():
    """beta = 1, orthonormal keys: a new value under a key replaces the old one, others stay; rewriting is a no-op."""
    e0, e1, e2 = one_hot(0), one_hot(1), one_hot(2)
    v1, v2, w = torch.tensor([1., 2.]), torch.tensor([-3., 5.]), torch.tensor([7., -1.])
    o = run_loop([(e0, v1, 1., e0),    # write v1 under e0, read it back
                  (e1, w, 1., e1),     # write w under e1
                  (e0, v2, 1., e0),    # write v2 under e0: reads v2 (overwrite; additive would give v1 + v2)
                  (e0, v2, 0., e1),    # beta = 0: read only; e1 still holds w
                  (e0, v2, 0., e2)])   # e2 was never written: empty
    # Small integers: the arithmetic is exact, so equality is exact.
    assert torch.equal(o, torch.stack([v1, w, v2, w, torch.zeros(2)]))

    o = run_loop([(e0, v1, 1., e0), (e0, v1, 1., e0),   # same (k, v) twice: still v1 (additive: 2 v1)
                  (e0, v1, 0., e1), (e0, v1, 0., e2)])  # and nothing else changed
    assert torch.equal(o, torch.stack([v1, v1, torch.zeros(2), torch.zeros(2)]))


def test_step_equals_chunked():
    """delta_rule_step applied one position at a time (as in generation) equals delta_rule_chunked."""
    torch.manual_seed(0)
    q, k, v, beta, log_alpha = (x.detach() for x in make_inputs(T=37))
    S = torch.zeros(2, 3, 6, 8, dtype=torch.float64)
    outs = []
    for t in range(37):
        o, S = delta_rule_step(S, q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], log_alpha[:, :, t])
        outs.append(o)
    o_chunked, S_chunked = delta_rule_chunked(q, k, v, beta, log_alpha, chunk=16)
    assert rel_err(torch.stack(outs, dim=2), o_chunked) <= 1e-10
    assert rel_err(S_chunked, S) <= 1e-10  # and the state it ends in, which --carry-state carries on


@pytest.mark.parametrize("T", [37, 5])  # the second window over several chunks, or inside one
@pytest.mark.parametrize("gated", [True, False])
@CHUNKED
def test_a_carried_state_reads_on(T, gated, chunked):
    """Reading a window from the state the window before ended in (--carry-state) gives the loop over both
    windows: the second window's outputs and their gradients (the carried state takes none), and the last state."""
    torch.manual_seed(0)
    inputs = make_inputs(T=20 + T, gated=gated)
    first = [x if x is None else x.detach()[:, :, :20] for x in inputs]
    second = [x if x is None else x.detach()[:, :, 20:].requires_grad_() for x in inputs]
    _, carried = delta_rule_loop(*first)
    w = torch.randn(2, 3, T, 6, dtype=torch.float64)
    o_ref, g_ref = output_and_grads(lambda *x: delta_rule_loop(*x, initial=carried), second, w)
    o, g = output_and_grads(lambda *x: chunked(*x, chunk=16, initial=carried), second, w)
    assert rel_err(o, o_ref) <= 1e-10
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= 1e-10
    o_whole, S_whole = delta_rule_loop(*[x if x is None else x.detach() for x in inputs])
    assert rel_err(o, o_whole[:, :, 20:]) <= 1e-10
    assert rel_err(chunked(*[x if x is None else x.detach() for x in second], chunk=16, initial=carried)[1],
                   S_whole) <= 1e-10
