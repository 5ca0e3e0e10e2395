"""
The studies and the benchmark as their pages depend on them: rows matched in parameters, finished rows never
trained twice, each study's readings, the bench's pairing and its arithmetic (tried on tiny runs, in seconds).

    python -m pytest -q test_studies.py
"""

import json
import shutil
import time

import pytest
import torch

import train
from test_train import TINY, assert_one_line_error, corpus, read_log, run  # noqa: F401  (corpus: a fixture)



def test_improvement_rows_match_the_transformer_within_5_percent():
    import experiments
    scale = experiments.IMPROVEMENT_SCALES["quick"]
    rows, target = experiments.improvement_rows(scale, vocab_size=65)
    assert rows[0].name == "Transformer" and len(rows) == 9
    assert [row.extra["mixer"] for row in rows[-2:]] == ["matrix", "matrix"]  # few large heads, many small ones
    field = experiments.field_rows(scale, target, 65)
    assert [row.name for row in field] == ["LSTM", "LSTM (seed 2)", "Mamba", "Mamba (seed 2)"]
    assert field[1].flags == [*field[0].flags, "--seed", "2"] and field[3].flags == [*field[2].flags, "--seed", "2"]
    for row in rows[1:] + field:
        params = experiments.count_for([*scale["common"], *row.flags], 65)
        assert abs(params - target) / target < 0.05, (row.name, params, target)


def test_recall_page_names_the_smallest_state_past_each_bar_in_every_seed():
    import recall
    budget = dict(recall.RECALL_BUDGETS["quick"], pairs=[16], longer=[])

    def run(model, state, shape, accuracy):
        return {"extra": {"model": model, "size": shape, "shape": shape}, "state_floats": state, "params": 1,
                "accuracy": {16: accuracy}, "longer": {}}
    runs = [run("Transformer", 16384, "—", 1.0),
            run("matrix", 1000, "2 x 8x8", 0.995), run("matrix", 1000, "2 x 8x8", 0.95),  # 99% in one seed of two
            run("matrix", 2000, "2 x 8x16", 0.991), run("matrix", 2000, "2 x 8x16", 0.999),  # 99% in both
            run("matrix", 3000, "1 x 16x16", 0.992)]  # larger, one seed
    lines = recall.recall_table(runs, budget, "quick", torch.device("cpu"), time.time())
    assert "- matrix, 90%: 1,000 numbers (0.06 of the KV cache, 2 x 8x8) in both seeds" in lines
    assert "- matrix, 99%: 2,000 numbers (0.12 of the KV cache, 2 x 8x16) in both seeds; 1,000 (0.06) in 1 of 2 " \
           "seeds" in lines
    assert "- Transformer, 99%: 16,384 numbers (1.00 of the KV cache) in its one seed" in lines


def test_recall_gives_each_shape_its_best_learning_rate():
    """Runs of one shape at several rates ("model, lr X" beside "model") are one line with the best of them; a
    shape trained at one rate only, or another seed, is not merged in."""
    import recall
    budget = dict(recall.RECALL_BUDGETS["quick"], pairs=[16])

    def run(model, size, state, accuracy):
        return {"extra": {"model": model, "size": size}, "state_floats": state, "accuracy": {16: accuracy}}
    runs = [run("LSTM", "hidden 64", 1000, 0.20), run("LSTM, lr 4e-3", "hidden 64", 1000, 0.55),
            run("LSTM, lr 8e-3", "hidden 64", 1000, 0.40), run("LSTM", "hidden 32", 500, 0.1),
            run("Mamba", "N 4 (seed 2)", 700, 0.3), run("Mamba, lr 8e-3", "N 4", 700, 0.6)]
    lines = recall.best_rate_table(runs, budget)
    assert "| LSTM | hidden 64 | 1,000 | 2e-3: 20.0%, 4e-3: 55.0%, 8e-3: 40.0% | 55.0% (4e-3) |" in lines
    assert not any("hidden 32" in line or "Mamba" in line for line in lines)


def test_field_recall_rows_build_and_name_their_rates():
    """The LSTM and Mamba rows of the recall study are real train.py runs; the budget's own rate keeps the plain
    name, the others carry theirs."""
    import recall
    budget = recall.RECALL_BUDGETS["quick"]
    for lr in budget["field"]["rates"]:
        for row in recall.field_recall_rows(budget, lr):
            assert train.main(["--data", "recall", "--recall-vocab", "64", "--block-size", "64", *row.flags,
                               "--dry-run"])["params"] > 0
            assert row.name.startswith(("LSTM", "Mamba")) and (f", lr {lr}" in row.name) == (lr != budget["lr"])


def test_naming_the_default_seed_or_a_device_is_the_same_run():
    import experiments
    assert experiments.same_run(["--lr", "1", "--seed", "1337", "--device", "cuda"]) == ["--lr", "1"]
    assert experiments.same_run(["--seed", "2", "--device", "cpu"]) == ["--seed", "2"]


def test_a_study_skips_finished_rows_and_keeps_other_corpora_apart(corpus, tmp_path, monkeypatch):
    import experiments
    monkeypatch.chdir(tmp_path)  # run_rows writes runs/experiments/ under the working folder
    name = experiments.results_name("improvements", str(corpus))
    assert name == "improvements-corpus" and experiments.results_name("improvements", "shakespeare") == "improvements"
    rows = [experiments.Row("tiny row", ["--arch", "newllm", *TINY])]
    common = ["--data", str(corpus), "--max-iters", "4", "--eval-interval", "2"]
    first = experiments.run_rows(name, "quick", rows, common)
    log = read_log(tmp_path / "runs/experiments/improvements-corpus-quick/tiny-row")
    assert first[0]["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in log))
    here = experiments.hardware(torch.device("cpu"))
    assert first[0]["hardware"] == here  # where each run was trained, for the page's header
    another = dict(first[0], hardware="2 threads of another CPU")
    assert experiments.machines([first[0]], torch.device("cpu")) == here
    assert experiments.machines([first[0], another, another], torch.device("cpu")) == (
        f"{here} (1 run) and 2 threads of another CPU (2 runs)")
    # a partial write after a new row shows every finished row, also those later in the list
    written = []
    new_first = [experiments.Row("new row", ["--arch", "newllm", *TINY, "--seed", "2"]), *rows]
    experiments.run_rows(name, "quick", new_first, common, after_each=lambda s: written.append([r["name"] for r in s]))
    assert written == [["new row", "tiny row"]]
    monkeypatch.setattr(train, "main", lambda flags: pytest.fail("a finished row was trained again"))
    assert experiments.run_rows(name, "quick", rows, common) == first
    unfinished = experiments.Row("unfinished row", ["--arch", "newllm", *TINY, "--seed", "3"])
    assert experiments.run_rows(name, "quick", [unfinished, *rows], common, train_new=False) == first
    # a row whose flags changed since its run (the hybrid follows the best row) is trained again, from scratch
    changed = [experiments.Row("tiny row", ["--arch", "newllm", *TINY, "--lr", "3e-3"])]
    calls = []
    monkeypatch.setattr(train, "main", lambda flags: calls.append(flags) or {"best_val_loss": 1.0})
    experiments.run_rows(name, "quick", changed, common)
    assert len(calls) == 1 and calls[0][-1] == "--overwrite" and "3e-3" in calls[0]
    monkeypatch.setattr(train, "main", lambda flags: pytest.fail("a finished row was trained again"))
    # on another machine (no runs/ folder), the summaries committed in results/ stand for the finished rows
    shutil.rmtree(tmp_path / "runs")
    assert experiments.run_rows(name, "quick", rows, common, kept=first) == first
    # where a row ran is not part of what it is: another --device does not make a finished row new
    assert experiments.run_rows(name, "quick", rows, [*common, "--device", "cpu"], kept=first) == first
    with pytest.raises(pytest.fail.Exception):  # other flags: the kept numbers do not stand for this row
        experiments.run_rows(name, "quick", changed, common, kept=first)


def test_a_study_refuses_the_settings_it_fixes_itself(corpus):
    """Asked for a text or a budget it does not use, a study would run its own and write over its results."""
    import experiments
    assert_one_line_error(run("experiments.py", "recall", "--data", corpus), "fixes its own --data")
    assert_one_line_error(run("experiments.py", "scaling", "--budget", "full"), "fixes its own --budget")
    for study in ("scaling", "regularisation"):
        assert_one_line_error(run("experiments.py", study, "--second-data", "no/such.txt"), "does not exist")
    assert experiments.results_name("lr-sweep", str(corpus)) == "lr-sweep-corpus"  # another text's sweep


def test_scaling_readings_say_where_each_seed_crosses_its_own_transformer():
    import experiments
    import scaling

    def row(model, seed):
        return experiments.Row(f"{model} {seed}", [], extra=dict(model=model, axis="length", data="shakespeare",
                                                                  seed=seed))

    def run(losses):
        return {"best_val_loss": min(losses),
                "curve": [{"tokens": (i + 1) * 10**6, "val_loss": loss} for i, loss in enumerate(losses)]}
    rows = [row(model, seed) for seed in (1337, 2) for model in ("Transformer", "context matrix")]
    losses = {"Transformer 1337": [3.0, 2.0, 1.0], "context matrix 1337": [2.0, 1.5, 1.2],  # -25% then +20%
              "Transformer 2": [3.0, 2.0, 1.0], "context matrix 2": [2.0, 1.5, 0.9]}  # below throughout
    done = {row.name: dict(run(losses[row.name]), extra=row.extra) for row in rows}  # as run_rows labels them
    line = next(line for line in scaling.scaling_readings(done, rows) if "context matrix" in line)
    assert line.endswith("cross near 2.6M tokens in seed 1337, never in seed 2")  # interpolated
    assert "best val loss 1.0500 ± 0.1500 (2), +5.0% vs the Transformer" in line


def test_lr_sweep_second_seeds_stay_out_of_the_grid_and_pair_with_its_best_rate():
    import scaling

    def run(model, lr, loss, **seed):
        return {"best_val_loss": loss, "extra": dict(model=model, lr=lr, **seed)}
    summaries = [run("vector stack", 1e-3, 2.0), run("vector stack", 2e-3, 1.9),
                 run("vector stack", 1e-3, 1.7, seed=2),  # a lucky second seed at another rate: not a grid cell
                 run("vector stack", 2e-3, 1.8, seed=2), run("8 heads", 2e-3, 1.85, seed=1337)]
    best = scaling.best_rates(summaries)
    assert best == {"vector stack": 2e-3}
    cell = {(s["extra"]["model"], s["extra"]["lr"]): s for s in scaling.swept(summaries)}
    assert cell[("vector stack", 1e-3)]["best_val_loss"] == 2.0
    table = scaling.second_seed_table([summaries[3], summaries[4]], cell, best)
    assert "| vector stack | 0.002 | 1.9000 | 1.8000 | 1.8500 ± 0.0500 |" in table  # seed 1337 from the grid
    assert "| 8 heads | 0.002 | 1.8500 | — | — |" in table


def test_lr_sweep_sweeps_the_field_as_the_improvements_study_runs_it():
    """The LSTM and Mamba join the sweep last, with the improvements study's matched flags, and get a second seed."""
    import experiments
    import scaling
    scale = experiments.IMPROVEMENT_SCALES["quick"]
    many_heads = f"context matrix, {scale['matrix_many_heads']} heads"
    models, target = scaling.compared_models(scale, 65, also=[many_heads], field=True)
    field = {row.name: row.flags for row in experiments.field_rows(scale, target, 65)}
    assert list(models)[-2:] == ["LSTM", "Mamba"] and all(models[name] == field[name] for name in ("LSTM", "Mamba"))
    assert "LSTM" not in scaling.compared_models(scale, 65)[0]  # the scaling study's models stay as they were
    many_heads_flags = models.pop(many_heads)
    best = dict.fromkeys(models, 2e-3)
    seconds = [row.name for row in scaling.second_seed_rows(models, best, many_heads, many_heads_flags)]
    assert {"LSTM, lr 0.002, seed 2", "Mamba, lr 0.002, seed 2"} <= set(seconds) and len(set(seconds)) == len(seconds)


def test_lr_sweep_widens_an_edge_then_runs_second_seeds_all_in_its_own_study(monkeypatch):
    """A best rate at the grid's edge adds the next rate; every pass trains and writes under the study's own
    name; the last page has the widened rate and the second seeds."""
    import argparse
    import scaling
    names = ["Transformer", "seed New-LLM", "vector stack", "context matrix", "context matrix, 8 heads", "LSTM", "Mamba"]
    monkeypatch.setattr(scaling, "compared_models", lambda *a, **k: ({n: ["--arch", n] for n in names}, 1))
    monkeypatch.setattr(scaling, "kept_rows", lambda study: ([], 0))
    studies, pages = [], []

    def run_rows(study, budget, rows, common, kept=None, after_each=None, may_diverge=False, train_new=True):
        studies.append(study)  # every row "finished", its loss lowest at lr 0.008
        return [{"name": r.name, "best_val_loss": abs(r.extra["lr"] - 8e-3), "extra": r.extra} for r in rows]
    monkeypatch.setattr(scaling, "run_rows", run_rows)
    monkeypatch.setattr(scaling, "write_sweep", lambda study, summaries, *a: pages.append((study, summaries)))
    scaling.study_lr_sweep(argparse.Namespace(budget="quick", data="shakespeare", device="cpu"), None)
    assert set(studies) == {"lr-sweep"} and {study for study, _ in pages} == {"lr-sweep"}
    last = {s["name"] for s in pages[-1][1]}
    assert {"LSTM, lr 0.008", "Mamba, lr 0.016", "Mamba, lr 0.008, seed 2", "context matrix, 8 heads, lr 0.008, seed 2"} <= last


def test_scaling_adds_the_fields_models_once_their_sweep_has_finished(monkeypatch):
    """The LSTM and Mamba join the length axis (both seeds, Tiny Shakespeare, each at its swept rate) only once
    the sweep's second seed has run for them: a rate still being swept would be trained for 20M tokens."""
    import argparse
    import scaling
    sweep_rows = [{"extra": {"model": "LSTM", "lr": 0.032, "seed": 2}}, {"extra": {"model": "Mamba", "lr": 0.001}}]
    monkeypatch.setattr(scaling, "committed_results", lambda study: {"rows": sweep_rows})
    assert scaling.swept_models() == {"LSTM"}
    monkeypatch.setattr(scaling, "tuned_rates", lambda: {"Transformer": 8e-3, "vector stack": 0.016,
                                                         "context matrix": 8e-3, "LSTM": 0.032, "Mamba": 1e-3})
    monkeypatch.setattr(scaling, "kept_rows", lambda study: ([], 0))
    trained = []
    monkeypatch.setattr(scaling, "run_rows", lambda study, budget, rows, *a, **k: trained.extend(rows) or [])
    monkeypatch.setattr(scaling, "write_scaling", lambda *a: None)
    scaling.study_scaling(argparse.Namespace(second_data="data/tinyshakespeare.txt", device="cpu"), None)
    field = [row for row in trained if row.extra["model"] in ("LSTM", "Mamba")]
    assert [(r.extra["model"], r.extra["seed"], r.extra["data"]) for r in field] == [
        ("LSTM", 1337, "shakespeare"), ("LSTM", 2, "shakespeare")]
    args = train.parse_args(field[1].flags)
    assert args.arch == "lstm" and args.lr == 0.032 and args.max_iters == 5000 and args.seed == 2
    assert trained[-2:] == field  # after every other run: a finished study never reorders


def test_scaling_noise_rereads_each_runs_own_validation_batches(corpus, tmp_path, monkeypatch):
    """The batch-by-batch losses of each best checkpoint average to the loss its run recorded, so the paired
    difference is the gap the study reports, with a standard error beside it."""
    import experiments
    import scaling
    monkeypatch.chdir(tmp_path)
    small = ["--embed-dim", "16", "--layers", "2", "--block-size", "16", "--batch-size", "4", "--eval-iters", "2",
             "--seed", "3", "--no-progress"]
    rows = [experiments.Row(model, [*flags, *small, "--eval-iters", "5"],  # the last of a repeated flag counts
                            extra=dict(model=model, axis="length", data=str(corpus), seed=3))
            for model, flags in (("Transformer", ["--arch", "transformer", "--heads", "2"]),
                                 ("vector stack", ["--arch", "stack", "--context-dim", "16"]))]
    summaries = experiments.run_rows("noise", "quick", rows, ["--data", str(corpus), "--max-iters", "4"])
    done = {s["name"]: s for s in summaries}
    [noise] = scaling.evaluation_noise(done, rows, torch.device("cpu"), data=str(corpus))
    recorded = done["vector stack"]["best_val_loss"] - done["Transformer"]["best_val_loss"]
    assert noise["batches"] == 5 and noise["difference"] == pytest.approx(recorded, abs=1e-5)
    assert 0 < noise["difference_se"] < 1 and 0 < noise["transformer_se"] < 1
    shutil.rmtree(done["vector stack"]["out_dir"])  # results/ without the run folders: nothing to measure
    assert scaling.evaluation_noise(done, rows, torch.device("cpu"), data=str(corpus)) == []


def test_a_sweep_records_a_diverged_run_and_goes_on(corpus, tmp_path, monkeypatch):
    import experiments
    monkeypatch.chdir(tmp_path)
    rows = [experiments.Row("too high", ["--arch", "newllm", *TINY, "--lr", "1e6", "--grad-clip", "0"]),
            experiments.Row("fine", ["--arch", "newllm", *TINY])]
    common = ["--data", str(corpus), "--max-iters", "6", "--eval-interval", "2"]
    with pytest.raises(train.TrainingDiverged):
        experiments.run_rows("sweep", "quick", rows[:1], common)
    done = []
    summaries = experiments.run_rows("sweep2", "quick", rows, common, after_each=lambda s: done.append(len(s)),
                                     may_diverge=True)
    assert summaries[0]["best_val_loss"] is None and "diverged" in summaries[0]["diverged"]
    assert summaries[1]["best_val_loss"] < 10 and done == [1, 2]


def test_bench_states_are_the_real_ones_and_only_the_cache_grows():
    import bench
    cpu = torch.device("cpu")
    for name in ("transformer", "newllm-stack", "matrix-stack", "mamba-stack", "lstm"):
        model, _ = bench.make(name, 300, cpu)
        state, token = model.init_state(1, cpu), torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            for _ in range(12):
                _, state = model.step(token, state)
        assert bench.state_bytes(state) == bench.state_bytes(bench.state_at(model, 12, cpu)), name
        short, long = (bench.state_bytes(bench.state_at(model, n, cpu)) for n in (64, 256))
        assert (long == short) if name != "transformer" else (long > 3.9 * short), (name, short, long)


def test_bench_ratios_pair_the_measurements_of_each_round():
    """A slow round slows both models: the bench divides each round's numbers by each other, then takes
    the median, where the ratio of the two medians would mix rounds (here 3.0 instead of 2.5)."""
    import bench
    fast_model, baseline = [2.0, 10.0, 3.0], [1.0, 4.0, 1.0]  # the second round ran on a faster machine
    assert bench.paired_ratio(fast_model, baseline) == 2.5  # the rounds' ratios are 2, 2.5 and 3


def test_bench_products_only_are_the_report_models_arithmetic(monkeypatch):
    """The bench's ceiling for the first command replays every matrix product of the report's model's training
    step and nothing else: as many floating-point operations as the model's own forward and backward pass,
    counted by PyTorch, with dropout on and with a different number of layers. (PyTorch's counter does not see
    oneDNN's products, so both use torch's here; they are the same products either way: fast.Products.)"""
    import bench
    import fast
    monkeypatch.setattr(fast, "ONEDNN_WORKS", False)
    from models import build_model
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    for layers in (2, 4):
        model = build_model("newllm", vocab_size=11, block_size=12, embed_dim=8, context_dim=6, hidden_dim=10,
                            layers=layers, dropout=0.1)
        idx = torch.randint(11, (3, 12))
        with FlopCounterMode(display=False) as step:
            _, loss = model(idx, idx)
            loss.backward()
        with FlopCounterMode(display=False) as products:
            bench.step_products(model.config, 3, 12, torch.device("cpu"))()
        assert products.get_total_flops() == step.get_total_flops() > 0


def test_bench_alternates_which_model_goes_first():
    import bench
    models = {"transformer": 1, "newllm-stack": 2, "matrix-stack": 3}
    firsts = [next(iter(bench.in_turn(models, r)))[0] for r in range(4)]
    assert firsts == ["transformer", "matrix-stack", "transformer", "matrix-stack"]
    assert sorted(bench.in_turn(models, 1)) == sorted(models.items())


def test_bench_products_writes_every_way_it_timed(tmp_path):
    import fast
    result = run("bench.py", "--products", "--quick", "--json", tmp_path / "products.json")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "products.json").read_text())["products"]
    ways = ["torch"] + (["oneDNN", "oneDNN, weight laid out"] if fast.ONEDNN_WORKS else [])
    assert [way for way in found if way != "mask_ms_per_layer"] == ways
    assert all(value > 0 for way in ways for value in found[way].values())
    assert set(found["mask_ms_per_layer"]) == {"torch.rand", "bernoulli_"}
    assert_one_line_error(run("bench.py", "--products", "--plot", tmp_path / "x.png"), "drop one")
    assert_one_line_error(run("bench.py", "--products", "--compile"), "one at a time")


def test_bench_refuses_an_output_folder_that_does_not_exist_before_measuring(tmp_path):
    result = run("bench.py", "--quick", "--json", tmp_path / "missing" / "bench.json")
    assert_one_line_error(result, "its folder does not exist")


def test_gpu_check_dry_run_runs_every_step_and_writes_its_summary(tmp_path):
    """The GPU check's dry run (toy sizes, this CPU): every step runs, exits 0 and is listed with each training run's
    loss; run again, a finished run is resumed instead of refused. Without a GPU the real check stops in one line."""
    import gpu_check
    result = run("gpu_check.py", "--dry-run", "--out", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
    steps = [row[0] for row in rows[1:]]
    assert steps == ["tests", "bench"] + [f"run {p} seed 1337" for p in ("transformer-gpu", "best-newllm", "best-matrix")]
    assert all(row[1] == "0" for row in rows[1:]) and all(float(row[3]) > 0 for row in rows[3:])
    again = [command for name, command in gpu_check.steps("cpu", tmp_path, dry_run=True) if name.startswith("run")]
    assert all("--resume" in command for command in again)
    real = [name for name, _ in gpu_check.steps("cuda", tmp_path, dry_run=False)]
    assert real[:4] == ["tests", "bench", "compiled", "engine"] and len(real) == 4 + 3 * 2
    if not torch.cuda.is_available():
        assert_one_line_error(run("gpu_check.py", "--out", tmp_path / "real"), "no CUDA GPU")


@pytest.mark.parametrize("name", ["mamba", "transformer"])
def test_reading_cut_to_w_characters_is_the_model_reading_only_those(name):
    """context.py's windows, against the literal reading: the loss at position p with the reading cut to w is the
    model's loss on the text from p's window start (a multiple of w/2, between w/2 and w back; 0 in the first window)
    to p alone; with no cut, on everything from the start. The Transformer's cut stays within its table (24)."""
    import context
    from test_models import V, tiny
    model = tiny(name).double()
    tokens, other = torch.randint(V, (2, 41)), torch.randint(V, (2, 6))
    readings = [(8, None), (16, None)] if name == "transformer" else [(4, None), (8, None), (None, None), (4, other),
                                                                       (8, other), (None, other)]
    for cut, before in readings:  # before: other text each window is read after
        got = context.position_losses(model, tokens, cut, before)
        assert got.shape == (2, 40)
        for p in range(40):
            start = 0 if cut is None or p < cut else (p - cut // 2) // (cut // 2) * (cut // 2)
            read = tokens[:, start : p + 1] if before is None else torch.cat([before, tokens[:, start : p + 1]], 1)
            logits, _ = model(read)
            expected = torch.nn.functional.cross_entropy(logits[:, -1], tokens[:, p + 1], reduction="none")
            assert torch.allclose(got[:, p], expected, atol=1e-10), (cut, p, before is not None)


def test_the_cut_after_other_text_reads_each_scored_position_after_another_segments_start(monkeypatch):
    """context.after_other_text scores only the windows that reach the scored positions: the same losses as reading
    the whole segment in windows, each after the first characters of the segment half the segments away."""
    import context
    from test_models import V, tiny
    for constant, value in (("SEGMENT", 48), ("SCORED_FROM", 24), ("SEGMENTS", 4), ("OTHER_TEXT", 6),
                            ("OTHER_TEXT_CUTS", [4, 8])):
        monkeypatch.setattr(context, constant, value)
    model = tiny("mamba").double()
    val = torch.randint(V, (4 * 49 + 3,))
    got = context.after_other_text(model, val)
    segments = val[: 4 * 49].view(4, 49)
    reference = context.position_losses(model, segments)[:, 24:].mean(1)
    for cut in (4, 8):
        whole = context.position_losses(model, segments, cut, segments[[2, 3, 0, 1], :6])[:, 24:].mean(1)
        assert got["curve"][cut][0] == pytest.approx((whole - reference).mean().item(), rel=1e-9)
    assert context.after_other_text(tiny("transformer"), val) is None


def test_a_short_validation_text_is_read_in_as_many_segments_as_it_holds(monkeypatch):
    """lcet10's validation text holds 20 of the 32 segments: the curve reads those; and the second text's runs are
    the regularisation study's first seed at its first setting only."""
    import context
    from test_models import V, tiny
    for constant, value in (("SEGMENT", 48), ("SCORED_FROM", 24), ("SEGMENTS", 4), ("CUTS", [4, 8])):
        monkeypatch.setattr(context, constant, value)
    model = tiny("mamba").double()
    val = torch.randint(V, (3 * 49 + 10,))
    got = context.context_curve(model, val)
    reference = context.position_losses(model, val[: 3 * 49].view(3, 49))[:, 24:].mean(1)
    assert got["segments"] == 3 and got["loss"] == pytest.approx(reference.mean().item(), rel=1e-9)
    rows = [{"extra": {"setting": setting, "seed": seed}} for setting in context.SETTINGS for seed in (1337, 2)]
    assert [r["extra"] for r in context.second_text_runs(rows)] == [{"setting": "dropout 0.1", "seed": 1337}]


def test_the_context_studys_long_runs_are_the_scaling_studys_first_seed_runs_with_snapshots(tmp_path):
    import context
    import scaling
    second = tmp_path / "corpus.txt"
    second.write_text("".join(chr(33 + i % 50) for i in range(30000)))  # a small second text
    theirs, _ = scaling.scaling_rows(scaling.tuned_rates(), {"shakespeare": 65, str(second): 50}, str(second))
    ours = context.long_run_rows(str(second))
    models = scaling.SCALING["length"]["models"]
    assert [row.name for row in ours] == [f"{m}, 20.5M tokens" for m in models] + [
        f"{m}, 20.5M tokens, corpus" for m in models]
    assert [row.name for row in context.long_run_rows()] == [row.name for row in ours[:3]]
    for row, scaling_row in zip(ours, [r for r in theirs if r.extra["seed"] == 1337 and r.extra["axis"] == "length"]):
        got, expected = (vars(train.parse_args(flags)) for flags in (row.flags, [*scaling.scaling_common_flags(),
                                                                                 *scaling_row.flags]))
        assert got.pop("snapshots") == context.LONG_SNAPSHOTS and expected.pop("snapshots") == []
        assert got == expected and expected["max_iters"] == 5000 and expected["seed"] == 1337


def test_equal_time_steps_survive_a_new_machine_and_a_group_is_timed_on_one(tmp_path, monkeypatch):
    """The equal-time rows' steps come from the study folder, else from the committed results (a machine that
    lost its folders trains the same rows); a group with a model not yet timed is timed again whole."""
    import context
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(context, "TIMINGS", tmp_path / "runs" / "equal-time.json")
    timed = []

    def fake_timing(flags, minutes, device):
        timed.append(flags[flags.index("--block-size") + 1])
        return {"tokens_per_s": 1000.0 * minutes, "steps": minutes * 10 + len(timed)}

    monkeypatch.setattr(context, "time_training_step", fake_timing)
    timed_before = [name for name in context.EQUAL_TIME if not name.endswith("dropout 0")]  # all but one group
    committed = {name: {"tokens_per_s": 1.0, "steps": 7} for name in timed_before}
    monkeypatch.setattr(context, "committed_results", lambda study: {"equal_time": committed})
    rows = {row.name: row for row in context.equal_time_rows(torch.device("cpu"))}
    assert timed == ["1024", "1024", "128"]  # only the untimed group, all three of it
    assert all(rows[name].flags[rows[name].flags.index("--max-iters") + 1] == "7" for name in timed_before)
    transformer_128 = train.parse_args(rows["Transformer, block 128, dropout 0"].flags)
    assert (transformer_128.block_size * transformer_128.batch_size, transformer_128.dropout) == (4096, 0.0)
    assert json.loads(context.TIMINGS.read_text())["Transformer, block 128, dropout 0"]["steps"] == 63
    context.equal_time_rows(torch.device("cpu"))  # now every model is timed: nothing is timed again
    assert len(timed) == 3


def test_the_context_study_keeps_each_recipes_scores_of_a_run_trained_elsewhere():
    import context
    nanogpt = {"name": "Transformer", "recipe": "nanoGPT recipe, block 64", "checkpoint": "best", "loss": 1.80}
    preset = {"name": "Transformer", "recipe": "CPU preset, block 128", "checkpoint": "best", "loss": 1.63}
    kept = context.kept_scores([nanogpt, preset])
    assert kept["Transformer", "nanoGPT recipe, block 64", "best"] is nanogpt
    assert kept["Transformer", "CPU preset, block 128", "best"] is preset


def test_length_keeps_the_committed_numbers_of_a_checkpoint_not_on_this_machine(tmp_path, monkeypatch):
    import length
    monkeypatch.chdir(tmp_path)
    scored = [{"name": "vector stack", "recipe": "lever", "checkpoint": "best"},
              {"name": "Transformer", "recipe": "lever", "checkpoint": "best"}]
    measured_before = {"name": "vector stack", "recipe": "lever", "everything": [[1.5, 0.01]], "hardware": "elsewhere"}
    monkeypatch.setattr(length, "committed_results",
                        lambda study: {"evaluated": scored} if study == "context" else {"models": [measured_before]})
    monkeypatch.setattr(length, "load_dataset", lambda *args, **kwargs: type("D", (), {"splits": {"val": [0] * 10}}))
    pages = []
    monkeypatch.setattr(length, "write_length_page", lambda measured, device, started: pages.append(measured))
    length.study_length(None, torch.device("cpu"))
    assert pages == [[measured_before]]  # the Transformer was never measured: left out, not invented


def test_loss_by_position_buckets_and_the_gap_past_the_training_length(monkeypatch):
    """length.py: each bucket's loss is the mean of the per-position losses over its positions and the sequences;
    within the first training block the two readings are the same text, so the gap there is exactly 0."""
    import context
    import length
    from test_models import V, tiny
    monkeypatch.setattr(length, "LONGEST", 96)
    monkeypatch.setattr(length, "EDGES", [0, 16, 48, 96])
    model = tiny("mamba").double()  # block_size 24
    val = torch.randint(V, (3 * 97 + 5,))
    out = length.losses_by_position(model, val)
    rows = val[: 3 * 97].view(3, 97)
    for way, cut in (("everything", None), ("training length", 24)):
        losses = context.position_losses(model, rows, cut)
        for i, (a, b) in enumerate([(0, 16), (16, 48), (48, 96)]):
            assert out[way][i][0] == pytest.approx(losses[:, a:b].mean().item(), rel=1e-9)
    assert out["gap"][0] == (0.0, 0.0) and out["gap"][2][0] != 0.0


def test_regularisation_runs_a_grid_then_each_models_best_setting_with_a_second_seed(tmp_path, monkeypatch):
    """Every model at every setting (the last --dropout / --weight-decay counts), each model's best setting from
    the first seed only, and a verdict only once every best setting has both seeds."""
    import experiments
    import regularisation as reg
    models = {m: ["--arch", "transformer", "--dropout", "0.1"] for m in reg.MODELS}
    rows = reg.regularisation_rows(models, dict.fromkeys(reg.MODELS, 4e-3), "corpus.txt")
    assert len(rows) == len(reg.MODELS) * len(reg.SETTINGS)
    args = train.parse_args(rows[2].flags)  # the Transformer at dropout 0.3
    assert (args.dropout, args.weight_decay, args.lr, args.max_iters) == (0.3, 0.1, 4e-3, reg.STEPS)
    assert train.parse_args(rows[3].flags).weight_decay == 0.5

    def run(model, setting, loss, seed=1337):
        curve = [{"tokens": 0, "val_loss": 4.0, "train_loss": 4.0}, {"tokens": 100, "val_loss": loss, "train_loss": 0.5}]
        return {"name": f"{model}, {setting}, seed {seed}", "best_val_loss": loss, "tokens": 100, "curve": curve,
                "extra": {"model": model, "setting": setting, "seed": seed}}
    summaries = [run(m, s, 1.6 + 0.01 * i + (0.1 if m == "Transformer" else 0))
                 for m in reg.MODELS for i, s in enumerate(reg.SETTINGS)]
    summaries[1]["best_val_loss"] = 1.5  # the Transformer's best: dropout 0.2
    summaries.append(run("vector stack", "dropout 0.3", 1.0, seed=2))  # a second seed never picks the setting
    best = reg.best_settings(summaries)
    assert best == {"Transformer": "dropout 0.2", "vector stack": "dropout 0.1", "context matrix": "dropout 0.1"}
    assert reg.best_settings(summaries[1:]).keys() == {"vector stack", "context matrix"}  # a setting not run yet
    seconds = reg.regularisation_rows(models, dict.fromkeys(reg.MODELS, 4e-3), "corpus.txt",
                                      {"dropout 0.2": reg.SETTINGS["dropout 0.2"]}, seed=2)
    assert seconds[0].name == "Transformer, dropout 0.2, seed 2" and train.parse_args(seconds[0].flags).seed == 2
    monkeypatch.setattr(experiments, "RESULTS", tmp_path)
    monkeypatch.setattr(reg, "RESULTS", tmp_path)

    def page_of(summaries):
        reg.write_regularisation("regularisation", summaries, dict.fromkeys(reg.MODELS, 4e-3), "corpus.txt",
                                 torch.device("cpu"), 0)
        return (tmp_path / "regularisation.md").read_text()
    page = page_of(summaries[1:])  # the Transformer's first setting missing: no best for it yet
    assert "| Transformer | not run yet | 1.5000 (0.50) |" in page and "**" not in page.split("| Transformer")[1][:60]
    page = page_of(summaries)
    assert "| Transformer | 1.7000 (0.50) | **1.5000 (0.50)** |" in page and "no verdict" in page
    summaries += [run(m, best[m], loss, seed=2) for m, loss in (("Transformer", 1.52), ("vector stack", 1.62),
                                                                  ("context matrix", 1.63))]
    page = page_of(summaries)
    assert "| Transformer | dropout 0.2 | 1.5000 / 1.5200 | 1.5100 ± 0.0100 |  |" in page
    assert "the Transformer still wins" in page and "clear of every other model's" in page
    summaries[-2]["best_val_loss"] = 1.50  # the vector stack's second seed inside the Transformer's range
    assert "no model is clear of the others" in page_of(summaries)
