"""
Behaviour of the models and the data against references: the future never leaks
into the past, the recurrent step (the definition) equals the full forward pass (the
parallel form, with and without the engine), parameter counts equal the formulas and the
seed report's numbers, tokenizers and checkpoints round-trip. test_fast.py checks the
engine piece by piece.

    python -m pytest -q
"""

import math
import random

import pytest
import torch

import data
from cli import UserError
from data import (BOS, EOS, IGNORE, PAD, CharTokenizer, RecallTask, SentenceSet, WordTokenizer, load_dataset,
                  read_text_file)
from models import build_model, count_params, model_from_checkpoint, state_size, state_tensors
from run_folder import load_checkpoint, save_checkpoint
from sample import generate
from scan import MIN_KEEP, chunked_scan, sequential_scan
from stack import gate_floors

V, T = 23, 24
TINY = dict(vocab_size=V, block_size=T, embed_dim=16, context_dim=12, hidden_dim=32, dropout=0.0)
STACK = dict(TINY, layers=2, gate=True, context_norm=False, short_conv=0)
MATRIX = dict(STACK, mixer="matrix", context_heads=3)  # 3 heads of 4 x 4

# every variant a test should cover: name -> (arch, config)
VARIANTS = {
    "seed": ("newllm", dict(TINY, layers=3)),
    "seed+norm+gate": ("newllm", dict(TINY, layers=2, context_norm=True, gate=True)),
    "stack": ("stack", STACK),
    "stack+norm+timescales+conv": ("stack", dict(STACK, context_norm=True, timescales=True, short_conv=3)),
    "stack additive (no gate)": ("stack", dict(STACK, gate=False)),
    "hybrid": ("stack", dict(STACK, short_conv=2, local_window=5, heads=2)),
    "matrix": ("stack", dict(MATRIX, short_conv=3, context_norm=True)),
    "matrix ungated": ("stack", dict(MATRIX, gate=False)),
    "matrix, wide keys": ("stack", dict(MATRIX, key_dim=6)),  # 3 heads of 4 x 6
    "transformer": ("transformer", dict(vocab_size=V, block_size=T, embed_dim=16, heads=4, layers=2, dropout=0.0)),
    "transformer post-norm": ("transformer", dict(vocab_size=V, block_size=T, embed_dim=16, heads=2, layers=2,
                                                  dropout=0.0, post_norm=True)),
    "lstm": ("lstm", dict(vocab_size=V, block_size=T, embed_dim=16, hidden_dim=32, layers=2, dropout=0.0)),
    "mamba": ("stack", dict(STACK, mixer="mamba", state_dim=4, short_conv=3, context_norm=True)),
}


def tiny(name, fast=True, **overrides):
    torch.manual_seed(0)
    arch, config = VARIANTS[name]
    return build_model(arch, fast=fast, **dict(config, **overrides)).eval()


# -----------------------------------------------------------------------------
# the models


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = tiny(name)
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(V, (2, T - 10))
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-3)  # the future does matter later


@pytest.mark.parametrize("fast", [True, False], ids=["engine", "lesson"])
@pytest.mark.parametrize("name", VARIANTS)
def test_step_equals_forward(name, fast):
    """Generation's recurrent step (context vector, context matrix or KV cache) gives the forward pass's logits,
    over several chunks of the scan (16) and of the delta rule (32) where the model has no position table."""
    arch, config = VARIANTS[name]
    length = T if arch != "stack" else 77
    model = tiny(name, fast, block_size=length)
    idx = torch.randint(V, (3, length))
    with torch.no_grad():
        logits, _ = model(idx)
    state = model.init_state(3, "cpu")
    stepped = []
    for t in range(length):
        step_logits, state = model.step(idx[:, t], state)
        stepped.append(step_logits)
    assert torch.allclose(torch.stack(stepped, dim=1), logits, atol=1e-5)


CARRIES = ["stack+norm+timescales+conv", "stack additive (no gate)", "matrix", "matrix ungated", "mamba"]


@pytest.mark.parametrize("fast", [True, False], ids=["engine", "lesson"])
@pytest.mark.parametrize("name", CARRIES)
def test_a_carried_state_reads_on(name, fast):
    """forward with a state (--carry-state) reads on from where the window before ended: two windows, the
    state carried between them, give the logits of one forward over both and of the step, and end in the
    step's state (memory and conv window)."""
    model = tiny(name, fast, short_conv=3)
    idx = torch.randint(V, (3, 53))
    with torch.no_grad():
        whole, _ = model(idx)
        state = model.init_state(3, "cpu")
        windows = [model(idx[:, :37], state=state)[0], model(idx[:, 37:39], state=state)[0],  # a window shorter
                   model(idx[:, 39:], state=state)[0]]                                        # than the conv's
    assert torch.allclose(torch.cat(windows, dim=1), whole, atol=1e-5)
    stepped = model.init_state(3, "cpu")
    for t in range(53):
        _, stepped = model.step(idx[:, t], stepped)
    assert state["position"] == stepped["position"] == 53
    for carried, step in zip(state["blocks"], stepped["blocks"]):
        assert torch.allclose(carried["memory"], step["memory"], atol=1e-5)
        assert torch.allclose(carried["recent"], step["recent"], atol=1e-5)


def test_a_carried_state_takes_no_gradient():
    """Training cuts the gradient at the window: the state a window leaves is detached."""
    model = tiny("matrix", short_conv=3).train()
    state = model.init_state(2, "cpu")
    model(torch.randint(V, (2, 9)), state=state)
    assert all(not tensor.requires_grad for block in state["blocks"] for tensor in (block["memory"], block["recent"]))


def loss_and_gradients(model, forward, idx):
    model.zero_grad()
    _, loss = forward(idx, idx)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def assert_same_loss_and_gradients(expected, got):
    """Equal in float64 up to summation order."""
    assert expected[0] == pytest.approx(got[0], rel=1e-12)
    for g_expected, g_got in zip(expected[1], got[1]):
        assert torch.allclose(g_expected, g_got, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["stack+norm+timescales+conv", "matrix", "seed"])
def test_compiled_model_equals_eager(name):
    """torch.compile traces the stacks (the vector scan whole, the delta rule around its loop over chunks, which
    stays eager) and the report's model around its loop over positions (eager too), and changes no number.
    The "eager" backend runs dynamo's tracing without generating code, so this stays fast."""
    model = tiny(name).double()
    # 77 positions: 5 chunks of the scan, the joins between them traced (the delta rule's stay eager)
    idx = torch.randint(V, (2, model.max_len or 77))
    assert_same_loss_and_gradients(loss_and_gradients(model, model, idx),
                                   loss_and_gradients(model, torch.compile(model, backend="eager"), idx))
    if name.startswith("stack"):  # nothing left out of the graph
        assert torch._dynamo.explain(model)(idx, idx).graph_break_count == 0


@pytest.mark.parametrize("gates", ["any", "at the floor"])
@pytest.mark.parametrize("dtype,tol,autocast", [(torch.float64, 1e-12, False), (torch.float32, 1e-5, False),
                                                (torch.float32, 1e-5, True)])
@pytest.mark.parametrize("initial", [None, "carried in"])
def test_chunked_scan_equals_the_loop(dtype, tol, autocast, gates, initial):
    """The chunked scan equals the loop in value and gradient,
    over many chunks, for any keep gate the models can produce (MIN_KEEP .. 1) and with every gate forgetting
    as fast as it can, from c_0 = 0 or a c_0 carried in; relative to the largest value, 1e-5 in float32, also
    under bfloat16 autocast (the scan's sums must not drop to bfloat16: they would be ~5e-2 off)."""
    torch.manual_seed(0)
    keep = torch.rand(2, 300, 8, dtype=dtype) if gates == "any" else torch.ones(2, 300, 8, dtype=dtype)
    log_a = (keep * math.log(MIN_KEEP)).requires_grad_()
    b = torch.randn(2, 300, 8, dtype=dtype).requires_grad_()
    c0 = None if initial is None else 10 * torch.randn(2, 8, dtype=dtype)
    weights = torch.randn(2, 300, 8, dtype=dtype)
    outputs, grads = [], []
    for scan in (sequential_scan, chunked_scan):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and scan is not sequential_scan):
            c = scan(log_a, b, c0)
        (c * weights).sum().backward()
        outputs.append(c.detach())
        grads.append((log_a.grad.clone(), b.grad.clone()))
        log_a.grad, b.grad = None, None
    for loop, *chunked in [outputs] + list(zip(*grads)):
        for other in chunked:
            assert (loop - other).abs().max() <= tol * loop.abs().max()


def test_seed_gate_is_the_reports_equation():
    """--gate on the report's model: c_t = a_t * c_{t-1} + (1 - a_t) * W_ctx h_t, a_t = sigmoid(W_a h_t), checked
    where the answer is known: a gate held shut keeps the context, held open takes the new value, and a gate of
    exactly 1/2 (zero weights) averages them."""
    cell = tiny("seed+norm+gate").cell
    cell.norm = None  # the gate alone
    h, context = torch.randn(4, 32), torch.randn(4, 12)
    value = cell.to_context(h)
    with torch.no_grad():
        cell.to_gate.weight.zero_()
        for bias, expected in ((50.0, context), (-50.0, value), (0.0, (context + value) / 2)):
            cell.to_gate.bias.fill_(bias)
            assert torch.allclose(cell.update(context, h), expected, atol=1e-6)


def test_mamba_parallel_form_equals_its_definition(monkeypatch):
    """The Mamba mixer trained through chunked_scan gives the loop's values and gradients (float64), over 5
    chunks, with step sizes large enough that some decays sit at the floor; and its state is C * N numbers per
    block (with the short convolution's last K - 1 inputs), whatever the length."""
    import mamba
    model = tiny("mamba", block_size=77).double()
    mixer = model.blocks[0].mixer
    with torch.no_grad():  # Delta ~ 3, A = -20 .. -80: exp(Delta A) far below MIN_KEEP, e^-6000 over a chunk
        mixer.A_log.add_(3.0)
        mixer.to_inputs.bias[2 * 12 : 3 * 12] = 3.0
    idx = torch.randint(V, (2, 77))
    parallel = loss_and_gradients(model, model, idx)
    monkeypatch.setattr(mamba, "chunked_scan", sequential_scan)
    assert_same_loss_and_gradients(loss_and_gradients(model, model, idx), parallel)
    state = model.init_state(1, "cpu")
    for t in range(30):
        _, state = model.step(torch.tensor([t % V]), state)
    assert state_size(state) == 2 * (12 * 4 + 2 * 16)


def test_timescale_floors_span_fast_to_slow():
    floors = gate_floors(64, timescales=True, longest=256)
    assert floors[0] == pytest.approx(MIN_KEEP) and floors[-1] > 0.99 and bool((floors.diff() >= 0).all())
    assert torch.equal(gate_floors(8, timescales=False, longest=256), torch.full((8,), MIN_KEEP))


@pytest.mark.parametrize("name", ["seed", "stack+norm+timescales+conv", "matrix", "transformer", "lstm", "mamba"])
def test_overfits_a_tiny_batch(name):
    """A model that cannot memorise 2 sequences cannot learn anything."""
    model = tiny(name).train()
    idx = torch.randint(V, (2, T))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("name", ["seed", "hybrid", "matrix", "transformer", "lstm", "mamba"])
def test_checkpoint_round_trip(name, tmp_path):
    model = tiny(name)
    path = tmp_path / "ckpt.pt"
    arch, _ = VARIANTS[name]
    save_checkpoint(path, {"arch": arch, "model_config": model.config.__dict__, "model": model.state_dict(),
                           "tokenizer": {"kind": "symbol", "vocab_size": V}})
    loaded = model_from_checkpoint(load_checkpoint(path)).eval()
    idx = torch.randint(V, (2, T))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_a_checkpoint_of_an_earlier_layout_is_refused_in_one_line(tmp_path):
    """Format 1 (both New-LLM models under arch "newllm", no format number) is no longer read: refused, named."""
    model = tiny("seed")
    torch.save({"arch": "newllm", "model_config": dict(model.config.__dict__, num_contexts=1), "model": model.state_dict(),
                "tokenizer": {"kind": "symbol", "vocab_size": V}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="earlier version of this lab .layout 1"):
        load_checkpoint(tmp_path / "old.pt")


def test_generation_outruns_the_position_table():
    """A model with learned positions keeps generating past its table by re-reading the last half-table: with
    top_k = 1 each token is the forward pass's choice after the text since the last re-read: none until the table
    is full; then the last T/2 tokens, read on until the table is full again (T/2 + 1 tokens per cycle)."""
    model = tiny("transformer")
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 3 * T, top_k=1)[0]
    assert out.shape == (3 * T + 1,)
    for j in range(1, len(out)):
        start = 0 if j <= T else (T // 2 + 1) * (1 + (j - T - 1) // (T // 2 + 1))
        with torch.no_grad():
            expected = model(out[None, start:j])[0][0, -1].argmax()
        assert out[j] == expected, j


def test_a_fixed_state_stays_the_size_the_formula_gives_and_the_kv_cache_grows():
    """Counted from the equations: the context matrix carries nh * dv * dk numbers per block and the short
    convolution's last K - 1 inputs, at every length; the Transformer's cache gains 2 * layers * E per token.
    The state's contents must change as tokens are read (a state that is never written would pass the size
    test too)."""
    matrix = build_model("stack", vocab_size=V, block_size=T, embed_dim=8, context_dim=8, hidden_dim=8, layers=1,
                         mixer="matrix", context_heads=2, short_conv=2).eval()
    transformer = tiny("transformer")
    for model, numbers_after in ((matrix, lambda t: 2 * 4 * 4 + 1 * 8), (transformer, lambda t: t * 2 * 2 * 16)):
        state, snapshots = model.init_state(1, "cpu"), {}
        with torch.inference_mode():
            for t in range(1, T + 1):
                _, state = model.step(torch.tensor([t % V]), state)
                if t in (1, T):
                    assert state_size(state) == numbers_after(t)
                    snapshots[t] = torch.cat([s.flatten() for s in state_tensors(state)])
        assert snapshots[1].shape != snapshots[T].shape or not torch.equal(snapshots[1], snapshots[T])


# -----------------------------------------------------------------------------
# parameter counts


def seed_params(V, T, E, C, H, L, gate=False, norm=False):
    """The seed model counted by hand: embeddings, FNN, token head, context head (+ gate, norm)."""
    return V * E + T * E + (E + C) * H + H + (L - 1) * (H * H + H) + H * V + V + H * C + C \
        + gate * (H * C + C) + norm * 2 * C


def transformer_params(V, T, E, L, H):
    block = 3 * E * E + 3 * E + E * E + E + E * H + H + H * E + E + 4 * E
    return V * E + T * E + L * block + 2 * E + E * V + V


def test_param_counts_equal_the_formulas():
    assert count_params(build_model("newllm", vocab_size=65, block_size=128)) == seed_params(65, 128, 256, 256, 512, 8)
    assert count_params(build_model("newllm", vocab_size=50, block_size=64, embed_dim=32, context_dim=48, hidden_dim=80,
                                    layers=3, gate=True, context_norm=True)) \
        == seed_params(50, 64, 32, 48, 80, 3, gate=True, norm=True)
    assert count_params(build_model("transformer", vocab_size=65, block_size=128)) \
        == transformer_params(65, 128, 256, 3, 1024)


def test_lstm_cpu_matches_the_transformer_cpu_within_1_percent():
    """Counted by hand from the LSTM's equations: per layer 4H (input + H) weights and two biases of 4H (PyTorch
    keeps b_ih and b_hh), then the embedding and the head; and within 1% of transformer-cpu's count."""
    from presets import model_settings
    counts = {}
    for preset in ("lstm-cpu", "transformer-cpu"):
        config = model_settings(preset)
        counts[preset] = count_params(build_model(config.pop("arch"), vocab_size=65, **config))
    E, H = 128, 238
    assert counts["lstm-cpu"] == 65 * E + 4 * H * (E + H) + 8 * H + 4 * H * (H + H) + 8 * H + H * 65 + 65
    assert abs(counts["lstm-cpu"] / counts["transformer-cpu"] - 1) < 0.01


def test_mamba_cpu_matches_the_transformer_cpu_within_1_percent():
    """Counted by hand from mamba.py's equations: one input projection to r, x, Delta (C each), B, C (N each), A_log
    (C x N), D (C), the answer's LayerNorm and W_o; and mamba-cpu within 1% of transformer-cpu's count."""
    from presets import model_settings
    models = {}
    for preset in ("mamba-cpu", "transformer-cpu"):
        config = model_settings(preset)
        models[preset] = build_model(config.pop("arch"), vocab_size=65, **config)
    E, C, N = 128, 128, 16
    mixer = models["mamba-cpu"].blocks[0].mixer
    assert count_params(mixer) == (E + 1) * (3 * C + 2 * N) + C * N + C + 2 * C + (C + 1) * E
    assert abs(count_params(models["mamba-cpu"]) / count_params(models["transformer-cpu"]) - 1) < 0.01


def test_seed_report_parameter_counts():
    """The report's table (REPORT.md) pins the architectures down: its five presets, built at vocabulary 1,000
    and length 32, have exactly the report's parameter counts."""
    from presets import model_settings
    for preset, count in (("seed-baseline", 3009768), ("seed-exp1", 3272168), ("seed-exp2", 12047848),
                          ("seed-transformer", 5260264)):
        config = model_settings(preset)
        arch = config.pop("arch")
        config.pop("epochs", None)
        assert count_params(build_model(arch, vocab_size=1000, block_size=32, **config)) == count, preset


# -----------------------------------------------------------------------------
# data


def test_char_tokenizer_round_trips():
    text = "First Citizen:\nBefore we proceed, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


def test_windows_line_endings_read_as_plain_newlines(tmp_path):
    path = tmp_path / "gutenberg.txt"
    path.write_bytes(b"It is a truth\r\nuniversally acknowledged.\r\n")
    assert read_text_file(path) == "It is a truth\nuniversally acknowledged.\n"


def test_word_tokenizer_round_trips_and_has_specials_first():
    text = "The king the KING and the queen\nof rome\n"
    tok = WordTokenizer.from_text(text, vocab_size=10)
    assert tok.tokens[:4] == ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
    assert tok.tokens[4] == "the"  # the most frequent word comes first
    assert tok.decode(tok.encode("the king and the queen")) == "the king and the queen"
    assert tok.encode("the unseen king") == [tok.index["the"], 1, tok.index["king"]]


def test_word_vocabulary_has_exactly_1000_entries(word_corpus):
    ds = load_dataset(str(word_corpus), "word", 1000, 32, sentences=True)
    assert ds.tokenizer.vocab_size == 1000
    assert ds.tokenizer.tokens[PAD] == "<PAD>" and ds.tokenizer.tokens[EOS] == "<EOS>"


def test_sentences_are_bos_words_eos_and_padding_is_not_scored(word_corpus):
    ds = load_dataset(str(word_corpus), "word", 1000, 32, sentences=True)
    assert isinstance(ds, SentenceSet)
    x, y = ds.get_batch(8)
    assert (x[:, 0] == BOS).all()
    lengths = (y != IGNORE).sum(dim=1)
    for row, n in enumerate(lengths.tolist()):
        assert y[row, n - 1] == EOS and (x[row, n:] == PAD).all() and (y[row, n:] == IGNORE).all()
    # whatever the model predicts at padded positions, the loss does not change
    model = build_model("newllm", vocab_size=1000, block_size=32, embed_dim=16, context_dim=8, hidden_dim=16, layers=2).eval()
    logits, loss = model(x, y)
    scored = y != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[scored], y[scored])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    x_changed = x.clone()
    x_changed[~scored] = 7  # other tokens on padded input positions: causal, so earlier scores stay
    assert model(x_changed, y)[1].item() == pytest.approx(loss.item(), rel=1e-6)


def test_report_sentences_are_split_and_counted_the_reports_way(monkeypatch):
    """--data seed-sentences: random.seed(42) shuffles the lines, the first 80% train, the vocabulary comes
    from the training lines only, and the small validation split is read whole, once per evaluation."""
    lines = [f"sentence {i} about word{i}" for i in range(30)]
    monkeypatch.setattr(data, "read_corpus", lambda source: "\n".join(lines) + "\n\n")
    ds = load_dataset("seed-sentences", "word", 1000, 32, sentences=True)
    expected = list(lines)
    random.seed(42)
    random.shuffle(expected)
    train, val = expected[:24], expected[24:]
    words = set(ds.tokenizer.tokens)
    assert ds.tokenizer.vocab_size == 1000  # the report's models have 1,000 rows of embedding and head
    assert all(line.split()[-1] in words for line in train) and not any(line.split()[-1] in words for line in val)
    batches = ds.eval_batches("val", 16, 50)
    assert len(batches) == 1 and [ds.tokenizer.decode(row[row != IGNORE].tolist()) for row in batches[0][1]] == \
        [" ".join(w if w in words else "<UNK>" for w in line.split()) + " <EOS>" for line in val]


def test_lanes_read_the_text_window_after_window(char_corpus):
    """--carry-state's batches: row r reads its own stretch of the training text, each window starting where
    the row's last one ended, and all rows start over together (fresh) after their last whole window."""
    ds = load_dataset(str(char_corpus), "char", block_size=16)
    train = ds.splits["train"]
    stretch = (len(train) - 1) // 4
    windows = stretch // 16
    batches = [ds.lane_batch(4, step) for step in range(windows + 1)]
    assert [fresh for _, _, fresh in batches] == [True] + [False] * (windows - 1) + [True]
    for row in range(4):
        read = torch.cat([x[row] for x, _, _ in batches[:windows]])
        assert torch.equal(read, train[row * stretch : row * stretch + windows * 16])
        assert torch.equal(torch.cat([y[row] for _, y, _ in batches[:windows]]),
                           train[row * stretch + 1 : row * stretch + windows * 16 + 1])
    assert torch.equal(batches[windows][0], batches[0][0])


def test_stream_split_is_contiguous_90_10(char_corpus):
    ds = load_dataset(str(char_corpus), "char", block_size=16)
    text = char_corpus.read_text()
    n = len(text)
    assert len(ds.splits["train"]) == int(0.9 * n) and len(ds.splits["val"]) == n - int(0.9 * n)
    assert ds.tokenizer.decode(ds.splits["val"].tolist()) == text[int(0.9 * n):]


# -----------------------------------------------------------------------------
# the recall task


def test_recall_sequences_are_well_formed():
    task = RecallTask(vocab_size=64, pairs=6, num_queries=5, block_size=40, seed=3)
    x, y = task.get_batch(50)
    half = 32
    for row in range(50):
        keys, values = x[row, 0:12:2], x[row, 1:12:2]
        assert len(set(keys.tolist())) == 6 and keys.min() >= 1 and keys.max() < half  # distinct keys
        assert values.min() >= half
        answers = (y[row] != IGNORE).nonzero().flatten()
        assert len(answers) == 5 and answers.min() >= 12  # only the queries are scored
        for pos in answers.tolist():
            query = x[row, pos].item()
            assert query in keys.tolist()
            assert y[row, pos] == values[keys.tolist().index(query)]  # the value paired earlier


def test_recall_mixes_pair_counts_per_batch():
    task = RecallTask(vocab_size=64, pairs=[2, 8], num_queries=4, block_size=40, seed=0)
    fillers = set()
    for _ in range(20):
        x, _ = task.get_batch(4)
        fillers.add(int((x[0, :16] == 0).sum()))  # 8 pairs fill 16 positions; 2 pairs leave filler there
    assert 0 in fillers and max(fillers) >= 4


def test_recall_same_seed_same_data():
    a = RecallTask(64, 4, 4, 32, seed=7)
    b = RecallTask(64, 4, 4, 32, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.get_batch(16), b.get_batch(16)))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.eval_batches("val", 8, 2), b.eval_batches("val", 8, 2)))
    assert not torch.equal(RecallTask(64, 4, 4, 32, seed=8).get_batch(16)[0], a.get_batch(16)[0])


def test_transformer_learns_a_small_recall_instance():
    """4 pairs in 32 tokens: attention can look the answer up; a few hundred CPU steps suffice."""
    torch.manual_seed(0)
    task = RecallTask(vocab_size=32, pairs=4, num_queries=4, block_size=32, seed=0)
    model = build_model("transformer", vocab_size=32, block_size=32, embed_dim=64, heads=4, layers=2, dropout=0.0,
                        init="torch")  # GPT-2's init sits on a plateau for thousands of steps here
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(500):
        x, y = task.get_batch(64)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y = task.eval_batches("val", 256, 1)[0]
    with torch.no_grad():
        predictions = model(x)[0].argmax(-1)
    scored = y != IGNORE
    accuracy = (predictions[scored] == y[scored]).float().mean().item()
    assert accuracy > 0.9
