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
from scan import MIN_KEEP, chunked_scan, sequential_scan
from stack import ShortConv
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
    """The report's own update takes the written-out loop (a gated one has none); the stacks their scans and
    convolutions; the Transformer its fused attention; fast=False (--no-fast) leaves every model as written."""
    expected = {"seed": ["ContextCell"], "seed+norm+gate": [], "stack+norm+timescales+conv": ["ShortConv", "VectorMixer"],
                "matrix": ["MatrixMixer", "ShortConv"], "hybrid": ["LocalAttention", "ShortConv", "VectorMixer"],
                "transformer": ["CausalSelfAttention"]}
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


@pytest.mark.parametrize("gates", ["any", "at the floor"])
@pytest.mark.parametrize("dtype,tol,autocast", [(torch.float64, 1e-12, False), (torch.float32, 1e-5, False),
                                                (torch.float32, 1e-5, True)])
def test_scans_equal_the_loop(dtype, tol, autocast, gates):
    """The lesson's chunked scan and the engine's (backward written out) equal the loop in value and gradient,
    over many chunks, for any keep gate the models can produce (MIN_KEEP .. 1) and with every gate forgetting
    as fast as it can; relative to the largest value, 1e-5 in float32, also under bfloat16 autocast (the
    scan's sums must not drop to bfloat16: they would be ~5e-2 off)."""
    torch.manual_seed(0)
    keep = torch.rand(2, 300, 8, dtype=dtype) if gates == "any" else torch.ones(2, 300, 8, dtype=dtype)
    log_a = (keep * math.log(MIN_KEEP)).requires_grad_()
    b = torch.randn(2, 300, 8, dtype=dtype).requires_grad_()
    weights = torch.randn(2, 300, 8, dtype=dtype)
    outputs, grads = [], []
    for scan in (sequential_scan, chunked_scan, fast.parallel_scan):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and scan is not sequential_scan):
            c = scan(log_a, b)
        (c * weights).sum().backward()
        outputs.append(c.detach())
        grads.append((log_a.grad.clone(), b.grad.clone()))
        log_a.grad, b.grad = None, None
    for loop, *chunked in [outputs] + list(zip(*grads)):
        for other in chunked:
            assert (loop - other).abs().max() <= tol * loop.abs().max()


@pytest.mark.parametrize("width,length", [(4, 9), (4, 2), (1, 5), (3, 3)])
def test_short_conv_equals_its_loop(width, length):
    """The short convolution's written-out backward (fast.CausalConv) gives the loop's values and gradients,
    also where taps look back past the first position (length < width) and with a single tap."""
    torch.manual_seed(0)
    conv = ShortConv(6, width).double()
    x = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, length, 6, dtype=torch.float64)
    results = []
    for piece in (None, fast.CausalConv.apply):
        conv.fast = piece
        u = conv(x)
        results.append([u.detach()] + list(torch.autograd.grad((u * weights).sum(), [x, *conv.parameters()])))
    for loop, written_out in zip(*results):
        assert torch.allclose(written_out, loop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("piece,inputs", [
    (fast.parallel_scan, lambda: (-torch.rand(1, 20, 3, dtype=torch.float64), torch.randn(1, 20, 3, dtype=torch.float64))),
    (fast.CausalConv.apply, lambda: (torch.randn(1, 5, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                                     torch.randn(3, dtype=torch.float64)))])
def test_a_second_derivative_through_a_written_out_backward_is_refused(piece, inputs):
    """The written-out backward passes are not themselves differentiable: asking for a second derivative must fail
    loudly, not return a wrong number."""
    args = [x.requires_grad_() for x in inputs()]
    grads = torch.autograd.grad(piece(*args).pow(2).sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(g.sum() for g in grads).backward()
