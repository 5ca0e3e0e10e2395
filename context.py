"""
How far back does each model read? Run through experiments.py:

    python experiments.py context

Each model is scored on validation text with its reading cut to the last w characters
(w = 8, 16, ..., 1,024: windows of w characters every w/2, each scoring its last w/2 positions,
so every scored position reads w/2 + 1 to w characters), and with no cut (the whole
2,048-character segment from its start). Positions 1,024 to 2,047 of 32 segments are scored,
well past every training length here. The curve is the loss above reading everything, against w;
a model's **memory horizon** is the smallest w such that reading the last w characters, or any longer cut,
costs at most 0.002 nats over reading everything (a cut that reads better counts too).
The Transformer cannot read past its position table: its curve ends there, and its "no cut" is
the window of its table.

A second probe asks whether the far past can matter at all: a 200-character validation passage,
the d characters that follow it in the text, then the same passage again (d = 64 ... 4,096),
against a control with an unrelated passage first. A model that keeps the passage reads the
repeat at a lower loss than the control.

A third reading separates a model that reads far back from one that only starts badly: the curve again with each
window read after 256 characters of unrelated validation text instead of from a zero state (models with a state,
best checkpoints of the presets, levers and equal-time runs).

The models: every model of the nanogpt-cpu study (1.5M tokens at block 64, two seeds), and the
CPU presets trained 1,500 steps at block 128 (6.1M tokens) with snapshots near 1.2M and 4.9M
tokens, the horizon along training; then the levers meant to make a fixed state carry more (a
state carried across batches, longer blocks, floors on the gates, no gate), and the Transformer
and the vector stack trained at block 1,024 for the same minutes each (at the presets' dropout,
then at dropout 0); on a second text, the regularisation study's lcet10 runs at the recipe every study
shares (8.2M tokens: best and last checkpoints), read on lcet10's validation text; last, the scaling study's
20.5M-token runs on Tiny Shakespeare and on lcet10 trained again with snapshots near 1M and 5M tokens. Runs the studies have
trained are reused; an evaluation is kept beside its checkpoint.
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from tqdm import tqdm

import bench
import field
import train
from data import load_dataset
from delta_rule import at_least_float32
from mamba import transition
from experiments import (IMPROVEMENT_SCALES, RESULTS, Row, committed_results, header, kept_rows, run_rows,
                         write_results)
from models import build_model, model_from_checkpoint
from regularisation import SEEDS, SETTINGS
from run_folder import load_checkpoint, read_json, write_json
from scaling import SCALING, compared_models, scaling_common_flags, scaling_row, tuned_rates

CUTS = [8, 16, 32, 64, 128, 256, 512, 1024]
SEGMENT, SCORED_FROM = 2048, 1024  # positions SCORED_FROM .. SEGMENT - 1 of each segment are scored
SEGMENTS = 32  # of the 54 in Tiny Shakespeare's validation text: enough for a spread of ~0.001 nats
HORIZON_TOLERANCE = 0.002  # nats: within this of no cut, the model has read all it uses
PASSAGE, GAPS, PASSAGES = 200, [64, 256, 1024, 4096], 32
OTHER_TEXT, OTHER_TEXT_CUTS = 256, CUTS[2:]  # the curve read after other text: its length, and the cuts read
TOKENS_PER_FORWARD = 16384  # evaluation batches stay this size (Mamba's state is 16 numbers per channel)
SNAPSHOTS = [300, 1200]  # of the presets' 1,500 steps of 4,096 tokens: 1.2M, 4.9M (and 6.1M at the end)

PRESET_ROWS = {"vector stack": "best-newllm-cpu", "context matrix": "best-matrix-cpu", "Transformer": "transformer-cpu",
               "LSTM": "lstm-cpu", "Mamba": "mamba-cpu"}
# the levers, on the best vector stack and the context matrix, at the presets' 6.1M tokens
LEVERS = [Row("vector stack, block 512", ["--preset", "best-newllm-cpu", "--block-size", "512", "--batch-size", "8"],
              "4x longer training windows, the same tokens per step", extra={"model": "vector stack"}),
          Row("vector stack, timescales", ["--preset", "best-newllm-cpu", "--timescales"],
              "per-channel floors on the keep gate, half-lives up to the block length", extra={"model": "vector stack"}),
          Row("context matrix, no gate", ["--preset", "best-matrix-cpu", "--no-gate"],
              "the delta rule without its keep gate: nothing decays unless overwritten",
              extra={"model": "context matrix"}),
          Row("context matrix, block 512", ["--preset", "best-matrix-cpu", "--block-size", "512", "--batch-size", "8"],
              "4x longer training windows, the same tokens per step", extra={"model": "context matrix"}),
          Row("vector stack, carried state", ["--preset", "best-newllm-cpu", "--carry-state"],
              "each batch row reads on from the state its last window ended in, gradient cut at the window",
              extra={"model": "vector stack"}),
          Row("context matrix, carried state", ["--preset", "best-matrix-cpu", "--carry-state"],
              "each batch row reads on from the state its last window ended in, gradient cut at the window",
              extra={"model": "context matrix"})]
# second seeds: the best lever, and the preset it is measured against
SECOND_SEEDS = [Row("vector stack, carried state (seed 2)", ["--preset", "best-newllm-cpu", "--carry-state", "--seed", "2"],
                    group="vector stack, carried state", extra={"model": "vector stack"}),
                Row("vector stack (seed 2)", ["--preset", "best-newllm-cpu", "--seed", "2"], group="vector stack",
                    extra={"model": "vector stack"})]
# training long at equal time: block 1,024 (4 sequences, the presets' 4,096 tokens a step), the same minutes each
# (at the presets' dropout 0.1 the Transformer's attention at this length runs 5x slower on a CPU than at dropout
# 0, so the pair runs twice: as the presets train, and at dropout 0, for 6 minutes each). The Transformer never
# leaves its plateau at block 1,024 in those minutes, so the dropout 0 group adds it at its own block, 128, and
# runs the vector stack and that Transformer again with a second seed.
EQUAL_TIME_MODELS = {"Transformer, block 1024": ("transformer-cpu", 1024), "vector stack, block 1024":
                     ("best-newllm-cpu", 1024), "Transformer, block 128": ("transformer-cpu", 128)}  # preset, block
EQUAL_TIME_GROUPS = {"": ([], 12, list(EQUAL_TIME_MODELS)[:2]),  # name suffix: (flags, minutes, models)
                    ", dropout 0": (["--dropout", "0"], 6, list(EQUAL_TIME_MODELS)),
                    ", dropout 0 (seed 2)": (["--dropout", "0", "--seed", "2"], 6, list(EQUAL_TIME_MODELS)[1:])}
EQUAL_TIME = [name + suffix for suffix, (_, _, models) in EQUAL_TIME_GROUPS.items() for name in models]
EQUAL_TIME_TOKENS = 4096  # a step's tokens, whatever the block
TIMINGS = Path("runs/experiments/context-quick/equal-time.json")
SECOND_TEXT_RECIPE = "lcet10, block 128"  # the regularisation study's runs, read on lcet10's validation text
LONG_RECIPE, LONG_SNAPSHOTS = "scaling recipe, block 128", [250, 1250]  # of 5,000 steps: 1.0M, 5.1M (20.5M at the end)
LONG_SECOND_RECIPE = "scaling recipe, lcet10"  # the same runs on the second text, read on its validation text


# -----------------------------------------------------------------------------
# scoring with the reading cut


@torch.no_grad()
def position_losses(model, tokens, cut=None, before=None):
    """tokens (S, L + 1) -> (S, L): the loss of predicting tokens[:, p + 1] at each position p, reading at most
    the last `cut` characters (cut/2 + 1 to cut of them: windows of `cut` every cut/2, each scoring its second
    half, the first window all of it); cut=None: everything from the start of the row. before (S, P): other text
    each window of its row is read after, in place of reading from a zero state."""
    S, L = tokens.size(0), tokens.size(1) - 1
    prefix = tokens.new_zeros(S, 0) if before is None else before
    if cut is None:
        return _losses(model, *(torch.cat([prefix, t], 1) for t in (tokens[:, :-1], tokens[:, 1:])))[:, prefix.size(1) :]
    if cut % 2:
        raise ValueError(f"the reading is cut to an even number of characters (got {cut})")
    half = cut // 2
    pad = max(cut, -(-L // half) * half) - L  # to a whole number of half-windows, at least one window
    x, y = (F.pad(t, (0, pad)) for t in (tokens[:, :-1], tokens[:, 1:]))
    n = x.unfold(1, cut, half).size(1)
    windows = lambda t: torch.cat([prefix[:, None].expand(-1, n, -1), t.unfold(1, cut, half)], 2).flatten(0, 1)  # noqa: E731
    losses = _losses(model, windows(x), windows(y))[:, prefix.size(1) :].unflatten(0, (S, -1))  # (S, n, cut)
    return torch.cat([losses[:, 0, :half], losses[:, :, half:].flatten(1)], dim=1)[:, :L]


def _losses(model, x, y):
    rows = max(1, TOKENS_PER_FORWARD // x.size(1))
    out = []
    for i in range(0, x.size(0), rows):
        logits, _ = model(x[i : i + rows])
        out.append(F.cross_entropy(at_least_float32(logits).transpose(1, 2), y[i : i + rows], reduction="none"))
    return torch.cat(out)


def context_curve(model, val):
    """Loss above no cut at each w (mean, and twice its standard error over segments), the loss at no cut, and
    the memory horizon."""
    segments = segments_of(val)
    longest = model.max_len  # the Transformer's table; None: no limit
    reference = position_losses(model, segments, longest)[:, SCORED_FROM:].mean(1)  # (S,)
    curve = {}
    for cut in (c for c in CUTS if longest is None or c < longest):
        excess = position_losses(model, segments, cut)[:, SCORED_FROM:].mean(1) - reference
        curve[cut] = (excess.mean().item(), 2 * excess.std().item() / math.sqrt(len(excess)))
    horizon = horizon_of(curve)
    return {"curve": curve, "loss": reference.mean().item(), "horizon": horizon or longest or SEGMENT,
            "reads_all": horizon is None, "segments": len(segments), "table": longest}


def segments_of(val):
    """The scored segments: SEGMENTS of them, or as many as a shorter validation text holds (lcet10's: 20)."""
    count = min(SEGMENTS, len(val) // (SEGMENT + 1))
    return val[: count * (SEGMENT + 1)].view(count, SEGMENT + 1)


def horizon_of(curve):
    """The smallest w such that this cut and every longer one cost at most the tolerance over no cut (one-sided: a
    cut that reads better counts too); None: no such w."""
    within = [cut for cut in curve if all(curve[c][0] <= HORIZON_TOLERANCE for c in curve if c >= cut)]
    return min(within) if within else None


def after_other_text(model, val):
    """The curve again, each window read after OTHER_TEXT characters of unrelated validation text (another
    segment's start) instead of from a zero state. A state trained to read on from where it was never starts
    from zero; read this way it does not either, so what is left above no cut is what the model takes from
    further back than w. None for the Transformer (its table is shorter than the other text)."""
    if model.max_len is not None:
        return None
    segments = segments_of(val)
    other = segments.roll(len(segments) // 2, 0)[:, :OTHER_TEXT]
    reference = position_losses(model, segments)[:, SCORED_FROM:].mean(1)
    curve = {}
    for cut in OTHER_TEXT_CUTS:  # only the windows that reach the scored positions
        losses = position_losses(model, segments[:, SCORED_FROM - cut :], cut, other)[:, cut:]
        excess = losses.mean(1) - reference
        curve[cut] = (excess.mean().item(), 2 * excess.std().item() / math.sqrt(len(excess)))
    return {"curve": curve, "horizon": horizon_of(curve)}


def repeat_probe(model, val):
    """At each d: the loss on a 200-character passage read after the d characters that follow it in the text,
    when the passage itself came before them (repeat) and when an unrelated passage did (control). The same
    characters at the same positions after the same d characters: only a model that kept the first copy reads
    the repeat lower. The Transformer reads through a window of its table."""
    starts = torch.linspace(0, len(val) - PASSAGE - max(GAPS) - 2, PASSAGES).long().tolist()  # the same for every d
    unrelated = [(s + len(val) // 2) % (len(val) - PASSAGE) for s in starts]  # half the text away
    out = {}
    for d in GAPS:
        def last_passage_loss(firsts):
            rows = torch.stack([torch.cat([val[f : f + PASSAGE], val[s + PASSAGE : s + PASSAGE + d], val[s : s + PASSAGE]])
                                for s, f in zip(starts, firsts)])
            return position_losses(model, rows, model.max_len)[:, PASSAGE + d :].mean().item()  # its characters 2..200
        repeat, control = last_passage_loss(starts), last_passage_loss(unrelated)
        out[d] = {"control": control, "repeat": repeat, "drop": 1 - repeat / control}
    return out


@torch.no_grad()
def gate_half_lives(model, val):
    """How long each of a stack's memories keeps what it holds: per state number, the half-life in characters of
    its keep gate (vector a_t, matrix alpha_t, Mamba exp(Delta_t A)) averaged in log space over 4,096 characters
    of validation text; their median, and the share beyond 64, 256 and 1,024 characters. None for other models."""
    if not hasattr(model, "blocks") or not hasattr(model.blocks[0], "mixer"):
        return None
    x, halves = model.embed(val[None, :4096]), []
    for block in model.blocks:
        u = block.ln_mix(x)
        u = block.conv(u) if block.conv is not None else u
        first, *rest = block.mixer.coefficients(u)
        if model.config.mixer == "vector":
            log_keep = None if first is None else first.log()  # a_t
        elif model.config.mixer == "matrix":
            log_keep = rest[3]  # log alpha_t
        else:  # Mamba: log a_t (exp(Delta_t A) with its floor), from Delta_t (transition also builds b_t)
            log_keep = transition(first, *rest[:2], block.mixer.A_log)[0]
        if log_keep is None:  # no keep gate: nothing fades unless overwritten
            return {"median": None, "beyond": {"64": 1.0, "256": 1.0, "1024": 1.0}}  # median None: no gate
        halves.append((math.log(0.5) / log_keep.mean(1)[0].clamp(max=-1e-12)).flatten())
        x = block(x)
    halves = torch.cat(halves)
    return {"median": halves.median().item(),
            "beyond": {str(n): (halves > n).float().mean().item() for n in (64, 256, 1024)}}


def evaluate(checkpoint_path, val, device):
    """The curve and the probe of one checkpoint (context-<name>.json beside it)."""
    return kept_beside(checkpoint_path, "context", [CUTS, SEGMENT, SCORED_FROM, SEGMENTS, PASSAGE, GAPS, PASSAGES],
                       lambda model: {**context_curve(model, val.to(device)), "probe": repeat_probe(model, val.to(device))},
                       device)


def kept_beside(checkpoint_path, name, settings, measure, device):
    """measure(model) of one checkpoint's model, with its step, kept beside it (<name>-<checkpoint>.json) for as
    long as neither the checkpoint nor the settings change."""
    kept = checkpoint_path.with_name(f"{name}-{checkpoint_path.stem}.json")
    stat = checkpoint_path.stat()
    key = json.loads(json.dumps({"checkpoint": [stat.st_size, stat.st_mtime_ns], "settings": settings}))
    if kept.exists() and (saved := read_json(kept)).get("key") == key:
        return saved
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint).to(device).eval()
    kept.write_text(json.dumps({**measure(model), "step": checkpoint["step"], "key": key}, indent=2))
    return read_json(kept)  # as it reads back: numbers keyed by strings


# -----------------------------------------------------------------------------
# the study


def study_context(args, device):
    dataset = load_dataset("shakespeare", "char", block_size=64)
    val = torch.as_tensor(dataset.splits["val"])
    nanogpt, _ = field.nanogpt_rows(dataset.tokenizer.vocab_size)
    presets = [Row(name, ["--preset", preset, "--snapshots", ",".join(map(str, SNAPSHOTS))], extra={"model": name})
               for name, preset in PRESET_ROWS.items()]
    kept, started = kept_rows("context")
    scored_before = kept_scores(committed_results("context").get("evaluated", []))
    evaluated, trained = [], []

    def score(summary, recipe, checkpoints, text=("Tiny Shakespeare", val)):
        """Each checkpoint's curve and probe on text (its name, its validation tokens); a run trained on another
        machine keeps its committed numbers."""
        text_name, text_val = text
        steps_read = set()
        for name, label in checkpoints:
            path = Path(summary["out_dir"]) / name
            if path.exists() and text_val is not None:
                result = evaluate(path, text_val, device)
                if result["step"] in steps_read:  # the last step was the best: one row
                    continue
                steps_read.add(result["step"])
                gates = kept_beside(path, "gates", [4096],
                                    lambda model: {"gates": gate_half_lives(model, text_val.to(device))}, device)["gates"]
                other = kept_beside(path, "other-text", [OTHER_TEXT_CUTS, SEGMENT, SCORED_FROM, SEGMENTS, OTHER_TEXT],
                                    lambda model: {"other": after_other_text(model, text_val.to(device))},
                                    device)["other"] if label == "best" and not recipe.startswith("nanoGPT") else None
                evaluated.append(dict(result, name=summary["name"], group=summary["group"], recipe=recipe, gates=gates,
                                      other_text=other, text=text_name,
                                      checkpoint=label, tokens=result["step"] * summary["tokens"] // summary["steps"]))
            elif (summary["name"], recipe, label) in scored_before:
                evaluated.append(scored_before[summary["name"], recipe, label])
            else:
                tqdm.write(f"{path} is not on this machine and was never scored: left out")

    def write():
        if evaluated:
            write_context_page(evaluated, trained, device, started)

    nanogpt_kept, _ = kept_rows("nanogpt-cpu")
    for summary in run_rows("nanogpt-cpu", "quick", nanogpt, [*field.NANOGPT_RECIPE, "--device", args.device],
                            nanogpt_kept):
        score(summary, "nanoGPT recipe, block 64", [("ckpt.pt", "best")])
    write()
    steps = [(f"step-{s}.pt", f"step {s}") for s in SNAPSHOTS] + [("ckpt.pt", "best")]
    for row in presets[:3] + LEVERS + SECOND_SEEDS + equal_time_rows(device) + presets[3:]:  # each written as it lands
        summary = run_rows("context", "quick", [row], ["--device", args.device], kept)[0]
        trained.append(summary)
        recipe = "CPU preset, block 128" if row in presets or row.group in PRESET_ROWS else \
            "equal time" if row.name in EQUAL_TIME else "lever"
        score(summary, recipe, steps if row in presets else steps[-1:])
        write()
    # the second text: the regularisation study's runs at the recipe every other study shares, best and last
    regularisation = committed_results("regularisation")
    data = regularisation.get("data", "")
    second_val = torch.as_tensor(load_dataset(data, "char", block_size=128).splits["val"]) if Path(data).is_file() \
        else None
    for summary in second_text_runs(regularisation.get("rows", [])):
        score(summary, SECOND_TEXT_RECIPE, [("ckpt.pt", "best"), ("last.pt", "end")], (Path(data).stem, second_val))
        write()
    # the horizon along 20.5M tokens: on Tiny Shakespeare, then on the second text where it is on this machine
    second = args.second_data if Path(args.second_data).is_file() else None
    if second is None:
        tqdm.write(f"{args.second_data} is not on this machine: the 20.5M-token runs on it are left out")
    long_val = {"shakespeare": ("Tiny Shakespeare", val)} | ({second: (Path(second).stem, torch.as_tensor(
        load_dataset(second, "char", block_size=128).splits["val"]))} if second else {})
    for row in long_run_rows(second):
        summary = run_rows("context", "quick", [row], ["--device", args.device], kept)[0]
        trained.append(summary)
        data = row.extra["data"]
        score(summary, LONG_RECIPE if data == "shakespeare" else LONG_SECOND_RECIPE,
              [(f"step-{s}.pt", f"step {s}") for s in LONG_SNAPSHOTS] + [("ckpt.pt", "best")], long_val[data])
        write()


def kept_scores(evaluated):
    """The committed scores by run, recipe and checkpoint: a name stands in several recipes ("Transformer" at
    nanoGPT's recipe and at the CPU preset), and a run trained elsewhere keeps each of its own."""
    return {(e["name"], e["recipe"], e["checkpoint"]): e for e in evaluated}


def long_run_rows(second=None):
    """The scaling study's first-seed runs (5,000 steps of 32 x 128, each model at its swept rate, cosine over the
    run) on Tiny Shakespeare, then on the second text if given, trained again with snapshots: the scaling study
    kept no checkpoints."""
    best_lr = tuned_rates()
    rows = []
    for data in ["shakespeare"] + ([second] if second else []):
        vocab = 65 if data == "shakespeare" else load_dataset(data, "char", block_size=128).tokenizer.vocab_size
        models, _ = compared_models(IMPROVEMENT_SCALES["quick"], vocab)
        text = "Tiny Shakespeare" if data == "shakespeare" else Path(data).stem
        rows += [Row(f"{name}, 20.5M tokens" + ("" if data == "shakespeare" else f", {text}"),
                     [*scaling_common_flags(), *scaling_row(name, models[name], best_lr, data, 1337, "length").flags,
                      "--snapshots", ",".join(map(str, LONG_SNAPSHOTS))],
                     f"the scaling study's run on {text}, seed 1337", extra={"model": name, "data": data})
                 for name in SCALING["length"]["models"]]
    return rows


def second_text_runs(regularisation_rows):
    """The regularisation study's finished first-seed runs at its first setting (dropout 0.1, weight decay 0.1:
    the scaling study's recipe, to 8.2M tokens on lcet10), one per model."""
    shared = next(iter(SETTINGS))
    return [s for s in regularisation_rows if s["extra"]["setting"] == shared and s["extra"]["seed"] == SEEDS[0]]


def equal_time_rows(device):
    """The equal-time rows: each group's models train for the same minutes of optimiser steps, the number of steps
    set from the model's median training step timed here as the study starts (bench.py's timing; nothing else may
    run then). The timings are kept in the study's folder and in its results, so that a resumed study, here or on
    another machine, trains the same rows; a group with a model not yet timed is timed again whole, on one machine."""
    timed = equal_time_timings()
    rows = []
    for suffix, (group_flags, minutes, models) in EQUAL_TIME_GROUPS.items():
        flags = {name + suffix: ["--preset", EQUAL_TIME_MODELS[name][0], "--block-size", str(EQUAL_TIME_MODELS[name][1]),
                                 "--batch-size", str(EQUAL_TIME_TOKENS // EQUAL_TIME_MODELS[name][1]), *group_flags]
                 for name in models}
        if any(name not in timed for name in flags):
            for name, row_flags in flags.items():
                timed[name] = time_training_step(row_flags, minutes, device)
            TIMINGS.parent.mkdir(parents=True, exist_ok=True)
            write_json(TIMINGS, timed)
        for name, row_flags in flags.items():
            steps = timed[name]["steps"]
            block = row_flags[row_flags.index("--block-size") + 1]
            rows.append(Row(name, [*row_flags, "--max-iters", str(steps), "--eval-interval", str(max(1, steps // 15))],
                            f"block {int(block):,} for {minutes} minutes of training steps here: {steps:,} steps "
                            f"(timed at {timed[name]['tokens_per_s']:,.0f} tokens/s)", group=name,
                            extra={"model": name.split(",")[0]}))
    return rows


def equal_time_timings():
    """Each equal-time row's timing: from this machine's study folder, else from the committed results."""
    return read_json(TIMINGS) if TIMINGS.exists() else committed_results("context").get("equal_time", {})


def time_training_step(flags, minutes, device):
    """The row's training tokens/s on this machine, and the steps that fill the minutes."""
    args = train.parse_args(flags)
    torch.manual_seed(0)
    model = build_model(args.arch, **train.model_config_from_args(args, 65)).to(device)
    tokens_per_s = bench.train_throughput(model, args.block_size, EQUAL_TIME_TOKENS, device, repeats=7)
    return {"tokens_per_s": tokens_per_s, "steps": round(minutes * 60 * tokens_per_s / EQUAL_TIME_TOKENS)}


def write_context_page(evaluated, trained, device, started):
    finals = [e for e in evaluated if e["checkpoint"] == "best"]
    lines = ["# How far back does each model read?\n",
             header("context", "quick", device, "shakespeare", started, runs=trained, extra=
                    f"Tiny Shakespeare's validation text in {evaluated[0]['segments']} segments of {SEGMENT:,} "
                    f"characters, positions {SCORED_FROM:,} to {SEGMENT - 1:,} scored. Loss in nats per character.",
                    command="python experiments.py context"),
             "## The context-use curve\n",
             "Loss above reading everything when the model reads only the last w characters (mean over segments; "
             "± twice its standard error, ± 0.001 or less unless shown). Memory horizon: the smallest w from which "
             f"on every cut costs at most {HORIZON_TOLERANCE} nats over no cut (a cut that reads better counts too; "
             "the Transformer's no cut is its table, its learned position table, as long as its training "
             "block; —: past the table, not read). Column w: each scored character reads the w/2 + 1 to w characters "
             "before it (w = 32: 17–32).\n",
             "| model | recipe | checkpoint | tokens | loss, no cut | " + " | ".join(f"w={c}" for c in CUTS)
             + " | horizon |", "|" + "---|" * (len(CUTS) + 6)]
    for e in evaluated:
        cells = [excess_cell(e["curve"].get(str(cut))) for cut in CUTS]
        lines.append(f"| {e['name']} | {e['recipe']} | {e['checkpoint']} | {e['tokens'] / 1e6:.1f}M | "
                     f"{e['loss']:.4f} | " + " | ".join(cells) + f" | {horizon_cell(e)} |")
    if any(e["recipe"] == LONG_RECIPE for e in evaluated):
        lines.append(f"\nThe {LONG_RECIPE} rows: the scaling study's first-seed runs on Tiny Shakespeare trained again "
                     "(5,000 steps of 32 x 128, each model at its swept rate, cosine over the run), read at snapshots "
                     "near 1.0M and 5.1M tokens and at their best checkpoint.")
    if any(e["recipe"] == LONG_SECOND_RECIPE for e in evaluated):
        lines.append(f"\nThe {LONG_SECOND_RECIPE} rows: the same runs on lcet10 (the scaling study's first seed there, "
                     "about 53 passes over its training text), read on lcet10's validation text at the same snapshots "
                     "and at their best checkpoint.")
    second = [e for e in evaluated if e["recipe"] == SECOND_TEXT_RECIPE]
    if second:
        lines.append(f"\nThe {SECOND_TEXT_RECIPE} rows: the regularisation study's runs at dropout 0.1 and weight decay "
                     "0.1 (the scaling study's recipe, each model at its swept rate, to 8.2M tokens, about 22 passes "
                     f"over the text), read on lcet10's validation text in its {second[0]['segments']} segments; "
                     "best: the lowest validation loss, end: the last step. Their repeated passages are lcet10's too.")
    lines += ["\n## The repeated passage\n",
              f"A {PASSAGE}-character validation passage, the d characters that follow it in the text, then the "
              f"passage again; as a control, an unrelated passage in place of the first copy ({PASSAGES} passages). "
              "The loss on the last passage, control → repeat: a model that kept the first copy reads the repeat "
              "lower (best checkpoints; the Transformer reads through a window of its table).\n",
              "| model | recipe | " + " | ".join(f"d={d:,}" for d in GAPS) + " |", "|" + "---|" * (len(GAPS) + 2)]
    for e in finals:
        lines.append(f"| {e['name']} | {e['recipe']} | " + " | ".join(
            f"{p['control']:.4f} → {p['repeat']:.4f} ({round(-100 * p['drop'], 2) + 0.0:+.2f}%)"
            for p in e["probe"].values()) + " |")
    gated = [e for e in evaluated if e.get("gates")]
    if gated:
        lines += ["\n## What the gates keep\n",
                  "Each stack's keep gates (vector a_t, matrix alpha_t, Mamba exp(Delta_t A)), per state number, as a "
                  "half-life in characters (the gate's log averaged over 4,096 characters of validation text): the "
                  "median over all state numbers, and the share whose half-life passes 64, 256 and 1,024.\n",
                  "| model | recipe | checkpoint | median half-life | beyond 64 | beyond 256 | beyond 1,024 |",
                  "|---|---|---|---|---|---|---|"]
        for e in gated:
            g = e["gates"]
            median = "no gate: forever" if g["median"] is None else f"{g['median']:.2f}"
            lines.append(f"| {e['name']} | {e['recipe']} | {e['checkpoint']} | {median} | "
                         + " | ".join(f"{100 * g['beyond'][n]:.1f}%" for n in ("64", "256", "1024")) + " |")
    lines += other_text_section(finals)
    lines += equal_time_section(finals, trained)
    figure = RESULTS / "context.png"
    plot_curves(finals, figure)
    lines.append("\n![context-use curves](context.png)\n")
    write_results("context", "\n".join(lines) + "\n", {"started": started, "rows": trained, "evaluated": evaluated,
                                                         "equal_time": equal_time_timings()},
                  [figure])


def excess_cell(point):
    """One point of a curve, (mean, spread) or None where the model was not read at that w."""
    if point is None:
        return "—"
    mean, spread = point
    return f"{round(mean, 4) + 0.0:+.4f}" + (f" ± {spread:.3f}" if spread > 0.001 else "")  # + 0.0: no "-0.0000"


def horizon_cell(e):
    """A row's memory horizon as the curve's table gives it."""
    if e["reads_all"] and not e["table"]:
        return f"> {CUTS[-1]:,}"
    return f"{e['horizon']:,}" + (" (its table)" if e["table"] and e["horizon"] == e["table"] else "")


def other_text_section(finals):
    """The curve read after other text beside the horizon read from a zero state, for the models with a state."""
    read = [e for e in finals if e.get("other_text")]
    if not read:
        return []
    lines = ["\n## The cut read after other text\n",
             f"The curve again, each window read after {OTHER_TEXT} characters of unrelated validation text instead of "
             "from a zero state: a model trained on a state carried across batches never starts from zero, and "
             "part of its loss at a cut from zero is that start. Either way nothing of the real text before the "
             "window is read, so a model that takes nothing from there is at 0 in both readings: the zero state adds "
             "the cost of starting, the other text the cost of a wrong past. Loss above reading everything; the "
             "horizon from a zero state (the curve above) beside the one after other text.\n",
             "| model | recipe | horizon from zero | " + " | ".join(f"w={c}" for c in OTHER_TEXT_CUTS)
             + " | horizon after other text |", "|" + "---|" * (len(OTHER_TEXT_CUTS) + 4)]
    for e in read:
        curve, horizon = e["other_text"]["curve"], e["other_text"]["horizon"]
        cells = [excess_cell(curve[str(c)]) for c in OTHER_TEXT_CUTS]
        lines.append(f"| {e['name']} | {e['recipe']} | {horizon_cell(e)} | " + " | ".join(cells)
                     + f" | {f'> {CUTS[-1]:,}' if horizon is None else f'{horizon:,}'} |")
    return lines


def equal_time_section(finals, trained):
    """The equal-time runs side by side: what each got from its minutes, its loss at its own length (validation
    windows of its block from a zero state) and reading everything, and its best validation loss within the shortest
    of its group's training times (the timing that sets the steps is not exact)."""
    if not any(s["name"] in EQUAL_TIME for s in trained):
        return []
    lines = ["\n## Training long at equal time\n",
             "4,096 tokens a step (block 1,024: batch 4; block 128: batch 32); the models of a group for the same "
             "minutes of training steps on one machine, the number of steps set from a timing of each model's step "
             "first (the row's note; the timing is not exact, so the table also gives each model's best validation "
             "loss within the shortest of its group's training times). Validation loss at its block: random windows of "
             "the model's block, each read from a zero state; the loss reading everything is the context-use curve's "
             f"(positions {SCORED_FROM:,} to {SEGMENT - 1:,} of segments of {SEGMENT:,}, the Transformer through its "
             "table): the same characters for every model.\n",
             "| model | steps | tokens | training time | validation loss at its block | the same, within the group's "
             "shortest time | loss reading everything | horizon |", "|---|---|---|---|---|---|---|---|"]
    for suffix, (_, _, models) in EQUAL_TIME_GROUPS.items():
        group = [s for s in trained if s["name"] in [name + suffix for name in models]]
        lines += equal_time_lines(group, finals)
    return lines


def equal_time_lines(runs, finals):
    """The table's lines for one group."""
    lines, shortest = [], min((s["train_time_s"] for s in runs), default=0)
    for s in runs:
        in_time = [r["val_loss"] for r in s.get("curve", [])  # the curve records training time at each evaluation
                   if r["train_time_s"] <= shortest * 1.02]  # 2%: evaluations fall between
        e = next((e for e in finals if e["name"] == s["name"]), None)
        within = f"{min(in_time):.4f}" if in_time else "—"
        reading = f"{e['loss']:.4f} | {e['horizon']:,}" if e else "— | —"
        lines.append(f"| {s['name']} | {s['steps']:,} | {s['tokens'] / 1e6:.1f}M | {s['train_time_s'] / 60:.1f} min | "
                     f"{s['best_val_loss']:.4f} | {within} ({shortest / 60:.1f} min) | {reading} |")
    return lines


def plot_curves(finals, figure):
    """A panel for nanoGPT's recipe, one for the CPU presets, one for the levers and the equal-time runs (with
    the vector and matrix presets again, for reference), one for the 20.5M-token runs, one for the second text's
    8.2M-token runs and one for its 20.5M-token runs (their models in their presets' colours); a colour per model, second seeds dashed; the Transformer's curve
    ends at 0 at its table."""
    preset = lambda e: e["recipe"] == "CPU preset, block 128"  # noqa: E731
    panels = [("nanoGPT recipe, block 64; second seeds dashed", lambda e: e["recipe"].startswith("nanoGPT")),
              ("CPU presets, block 128, 6.1M tokens", preset),
              ("levers and equal time (the presets again, thin)",
               lambda e: e["recipe"] in ("lever", "equal time") or preset(e) and e["name"] in ("vector stack",
                                                                                             "context matrix")),
              (f"{LONG_RECIPE}, 20.5M tokens", lambda e: e["recipe"] == LONG_RECIPE),
              (f"{SECOND_TEXT_RECIPE}, to 8.2M tokens", lambda e: e["recipe"] == SECOND_TEXT_RECIPE),
              (f"{LONG_SECOND_RECIPE}, 20.5M tokens", lambda e: e["recipe"] == LONG_SECOND_RECIPE)]
    panels = [(title, shown) for title, shown in panels if any(map(shown, finals))]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["black", "navy", "darkgreen", "maroon"]
    color_of = {}
    rows = 1 if len(panels) <= 3 else 2
    columns = -(-len(panels) // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, shown) in zip(axes.flat, panels):
        for e in filter(shown, finals):
            by_model = e["recipe"] in (LONG_RECIPE, SECOND_TEXT_RECIPE, LONG_SECOND_RECIPE)  # drawn in its preset's colour
            model = e["name"].split(",")[0] if by_model else None
            cuts = [int(c) for c in e["curve"]]
            values = [e["curve"][str(c)][0] for c in cuts]
            if e["table"]:
                cuts, values = cuts + [e["table"]], values + [0.0]
            color = color_of.setdefault(model or e["group"], colors[len(color_of) % len(colors)])
            second, thin = "(seed" in e["name"], preset(e) and title.startswith("levers")
            ax.plot(cuts, values, marker="o", color=color, linestyle="--" if second else "-",
                    markersize=3 if second or thin else 5, linewidth=0.8 if thin else 1.5,
                    label=None if second else f"{model or e['name']} ({e['loss']:.3f})")
        ax.axhline(HORIZON_TOLERANCE, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("characters read (w)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss above reading everything (nats)")
    fig.suptitle("How far back each model reads (the Transformer's curve ends at its table)")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
