"""
The engine (fast.py) against the lesson: every piece gives the definition's values and gradients
(float64, odd shapes), each model picks up exactly the pieces meant for it, and --no-fast runs
none of them.

    python -m pytest -q test_fast.py
"""

import math

import pytest
import torch

import fast
from models import build_model
from test_models import TINY, V, T, VARIANTS, assert_same_loss_and_gradients, loss_and_gradients, tiny


@pytest.mark.parametrize("name,overrides", [(name, {}) for name in VARIANTS] + [
    ("stack+norm+timescales+conv", dict(hidden_dim=20)), ("transformer", dict(hidden_dim=20))])  # MLPs padded to 32
def test_engine_equals_lesson(name, overrides):
    """A model with every piece of the engine gives the lesson's loss and gradients, in float64, in training
    (where the widths are padded) and in evaluation."""
    model = tiny(name, **overrides).double().train()
    idx = torch.randint(V, (2, T))
    results = []
    for switch in (fast.lesson_only, fast.accelerate):
        switch(model)
        results.append(loss_and_gradients(model, model, idx))
    assert_same_loss_and_gradients(*results)
    if overrides:
        assert type(model.blocks[0].mlp.fast).__name__ == "function"
    with torch.no_grad():
        assert torch.allclose(model.eval()(idx)[0], fast.lesson_only(model)(idx)[0], rtol=1e-12, atol=1e-12)


def pieces_in(model):
    return sorted({type(m).__name__ for m in model.modules() if getattr(m, "fast", None) is not None})


def test_each_model_gets_its_pieces_and_no_fast_gets_none():
    """The report's own update takes the written-out loop (a gated one has none); the matrix its delta rule; Mamba
    its scan; the Transformer and the hybrid their fused attention; fast=False (--no-fast) leaves every model as
    written."""
    expected = {"seed": ["ContextCell"], "seed+norm+gate": [], "stack+norm+timescales+conv": [],
                "matrix": ["MatrixMixer"], "hybrid": ["LocalAttention"], "transformer": ["CausalSelfAttention"],
                "mamba": ["MambaMixer"], "lstm": []}
    for name, pieces in expected.items():
        arch, config = VARIANTS[name]
        assert pieces_in(build_model(arch, **config)) == pieces
        assert pieces_in(build_model(arch, fast=False, **config)) == []


def test_report_loop_with_dropout_equals_autograd():
    """fast.report_loop's hand-written backward pass, with dropout on, gives autograd's gradients through
    newllm.py's equations with the same masks."""
    torch.manual_seed(0)
    model = build_model("newllm", **dict(TINY, layers=3, dropout=0.3)).double().train()
    cell, idx = model.cell, torch.randint(V, (2, T))
    masks = fast.dropout_masks(torch.empty(T, 2, TINY["hidden_dim"], dtype=torch.float64), 0.3, 3)
    weights = torch.randn(2, T, TINY["hidden_dim"], dtype=torch.float64)

    def autograd_loop(x):  # newllm.py's equations, written out, with the masks above
        context, hiddens = torch.zeros(2, TINY["context_dim"], dtype=torch.float64), []
        for t in range(T):
            h = torch.relu(cell.fnn[0](torch.cat([x[:, t], context], dim=-1))) * masks[0][t]
            for l, layer in enumerate(cell.fnn[1:], start=1):
                h = torch.relu(layer(h)) * masks[l][t]
            context = context + cell.to_context(h)
            hiddens.append(h)
        return torch.stack(hiddens, dim=1)

    results = []
    for forward in (lambda x: fast.report_loop(cell, x, masks), autograd_loop):
        x = model.embed(idx).detach().requires_grad_()
        model.zero_grad()
        (forward(x) * weights).sum().backward()
        results.append([x.grad] + [p.grad.clone() for p in cell.parameters()])
    for got, expected in zip(*results):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["seed", "seed+norm+gate", "stack+norm+timescales+conv", "matrix", "hybrid",
                                  "transformer", "lstm", "mamba"])
def test_every_architecture_trains_in_half_precision(name, dtype):
    """A model cast to bfloat16 or float16 runs forward and backward, the engine included (the report's loop sums
    in float32 and hands gradients back in the model's dtype), with a finite loss close to float32's."""
    model = tiny(name).train()
    idx = torch.randint(V, (2, T))
    reference = model(idx, idx)[1].item()
    model.to(dtype)
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert loss.item() == pytest.approx(reference, rel=0.05)


def test_dropout_masks_keep_each_unit_with_probability_1_minus_p():
    torch.manual_seed(0)
    masks = fast.dropout_masks(torch.empty(64, 32, 128, dtype=torch.float64), 0.25, 2)
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])
    for mask in masks:
        assert set(mask.unique().tolist()) == {0.0, 1 / 0.75}
        assert (mask > 0).double().mean().item() == pytest.approx(0.75, abs=0.01)  # 262k units: 0.0008 std


@pytest.mark.skipif(not fast.ONEDNN_WORKS, reason="this build of PyTorch has no working oneDNN")
def test_onednn_products_equal_torchs(monkeypatch):
    """In float32 on a CPU the report's loop multiplies with oneDNN: the same loss and gradients as torch's own
    products, up to float32 rounding, with dropout on (the same masks); torch.backends.mkldnn.enabled = False
    turns oneDNN off."""
    model = build_model("newllm", **dict(TINY, layers=3, dropout=0.3)).train()
    idx = torch.randint(V, (4, T))
    results = []
    for onednn in (True, False):
        monkeypatch.setattr(fast, "ONEDNN_WORKS", onednn)
        assert fast.Products(idx.float()).onednn == onednn
        torch.manual_seed(1)
        results.append(loss_and_gradients(model, model, idx))
    (loss, grads), (torch_loss, torch_grads) = results
    assert loss == pytest.approx(torch_loss, rel=1e-5)
    for got, expected in zip(grads, torch_grads):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(fast, "ONEDNN_WORKS", True)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not fast.Products(idx.float()).onednn


def delta_rule_inputs():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    return q, torch.nn.functional.normalize(k, dim=-1), v, torch.rand(1, 2, 9, dtype=torch.float64), \
        -torch.rand(1, 2, 9, dtype=torch.float64)


def report_loop_inputs():
    H, C = 5, 3
    return [torch.randn(6, 2, H, dtype=torch.float64), torch.randn(H, C, dtype=torch.float64),
            torch.randn(H, H, dtype=torch.float64), torch.randn(H, dtype=torch.float64),
            torch.randn(C, H, dtype=torch.float64), torch.randn(C, dtype=torch.float64)]


def selective_scan_inputs(batch=3, T=37, C=5, N=4):
    """x, Delta (large enough that some decays sit at MIN_KEEP's floor), B, C, A_log, in float64."""
    x, B, C_read = torch.randn(batch, T, C), torch.randn(batch, T, N), torch.randn(batch, T, N)
    delta = torch.nn.functional.softplus(2 * torch.randn(batch, T, C))
    return [t.double() for t in (x, delta, B, C_read, torch.randn(C, N) + 1)]


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("tile,count", [(37 * 4 * 2, 9), (2 * 37 * 5 * 4, 2)])
def test_selective_scan_tile_by_tile_equals_the_lesson(monkeypatch, carried, tile, count):
    """fast.selective_scan_fast gives mamba.selective_scan's y, h_T and gradients (float64, some decays at the
    floor), over tiles that split the channels unevenly (1 sequence x 2 + 2 + 1 channels) or the sequences
    (2 + 1 sequences x all channels), with and without a carried-in h_0."""
    import mamba
    monkeypatch.setattr(fast, "TILE_ELEMENTS", tile)
    assert len(fast.tiles(3, 37, 5, 4)) == count
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in selective_scan_inputs()]
    assert (mamba.transition(*inputs[:3], inputs[4])[0] < math.log(mamba.MIN_KEEP) + 1e-3).any()
    h0 = torch.randn(3, 5, 4, dtype=torch.float64) if carried else None
    weights = torch.randn(3, 37, 5, dtype=torch.float64)
    results = []
    for scan in (mamba.selective_scan, fast.selective_scan_fast):
        y, h_end = scan(*inputs, h0)
        results.append([y, h_end, *torch.autograd.grad((y * weights).sum(), inputs)])
    for got, expected in zip(*results):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="initial state"):
        fast.selective_scan_fast(*inputs, torch.zeros(3, 5, 4, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("piece,inputs", [
    (lambda *x: fast.delta_rule_fast(*x, chunk=4)[0], delta_rule_inputs),
    (lambda *x: fast.context_loop(None, *x), report_loop_inputs),
    (lambda *x: fast.selective_scan_fast(*x)[0], selective_scan_inputs)], ids=["delta_rule", "report_loop", "selective_scan"])
def test_a_second_derivative_through_a_written_out_backward_is_refused(piece, inputs):
    """The written-out backward passes are not themselves differentiable: asking for a second derivative must fail
    loudly, not return a wrong number."""
    args = [x.requires_grad_() for x in inputs()]
    grads = torch.autograd.grad(piece(*args).pow(2).sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(g.sum() for g in grads).backward()
