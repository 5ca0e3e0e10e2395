"""
The project's experiments: one command each, writing results/<study>.md, .json and .png
(results/<study>-<text>.* when --data names another text).

    python experiments.py seed [--budget quick|full] [--data PATH]          # the seed report's table, on real text
    python experiments.py improvements [--budget quick|full] [--data PATH]  # the report's fixes, one at a time
    python experiments.py seed-sentences                                    # the same on the report's own 30 sentences
    python experiments.py recall [--budget quick|full]                      # associative recall against state size (recall.py)
    python experiments.py lr-sweep [--budget quick|full] [--data PATH]      # each model's best learning rate (scaling.py)
    python experiments.py scaling [--second-data PATH]                      # longer training, larger size (scaling.py)
    python experiments.py nanogpt-cpu                                       # every model at nanoGPT's CPU recipe (field.py)
    python experiments.py context                                           # how far back each model reads (context.py)
    python experiments.py length                                            # loss against position, to 8,192 (length.py)
    python experiments.py regularisation [--second-data PATH]               # dropout, weight decay on a small text

Every row is an ordinary train.py run in runs/experiments/<study>-<budget>/<row>.
A finished row is never trained again and an interrupted one resumes, so
Ctrl-C and rerunning the same command loses nothing. `quick` fits a 2-core
CPU (budgets below); `full` is the schedule meant for a GPU.
"""

import importlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

import train
from run_folder import read_json, read_log
from cli import Parser, UserError, hardware, pick_device, run_script
from data import load_dataset
from models import build_model, count_params
from plot import plot_runs

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    name: str                 # shown in the table
    flags: list               # train.py flags of this row (beside the study's common flags)
    note: str = ""            # what changes, in words
    group: str = ""           # rows with the same group are seeds of one configuration
    extra: dict = field(default_factory=dict)  # study-specific values carried into the table


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_rows(study, budget, rows, common_flags, kept=None, after_each=None, may_diverge=False, train_new=True):
    """Train every row (skipping finished ones, resuming interrupted ones); return their summaries.

    kept: summaries of finished rows from results/<study>.json (committed), reused when a row's flags are
    unchanged, so a study spread over several machines never trains a finished row again. after_each(summaries)
    runs after every newly finished row (to write partial results). may_diverge: a run whose loss stops being
    finite is recorded as diverged (a learning-rate sweep's too-high rates) instead of stopping the study.
    train_new=False trains nothing: the summaries of the rows finished already."""
    study_dir = Path("runs/experiments") / f"{study}-{budget}"
    kept = {s["name"]: s for s in kept or []}

    def flags_of(row):
        return [*common_flags, *row.flags, "--out-dir", str(study_dir / slug(row.name)), "--sample-tokens", "0"]

    def command_of(row):
        return "python train.py " + " ".join(flags_of(row))

    def labels_of(row):
        return dict(name=row.name, note=row.note, group=row.group or row.name, extra=row.extra)

    def trained_here(row):
        """The summary of the row's run in study_dir, or None; a run with other flags (a row that depends on
        earlier results, such as the hybrid, can change) does not count."""
        summary_path = study_dir / slug(row.name) / "summary.json"
        summary = read_json(summary_path) if summary_path.exists() else None
        same = summary and same_run(summary.get("command", "").split()) == same_run(command_of(row).split())
        return summary if same else None

    def finished(row):
        """The row's summary if it was trained already (here, or on another machine, on any device), else None;
        its numbers are kept, its labels come from today's rows."""
        saved = kept.get(row.name, {})
        if here := trained_here(row):  # a run folder from before runs recorded their machine: the committed one
            return {**({"hardware": saved["hardware"]} if "hardware" in saved else {}), **here, **labels_of(row)}
        saved_flags = saved.get("flags") or saved.get("command", "").split()[2:]  # "python train.py <flags>"
        if same_run(saved_flags) == same_run(flags_of(row)):
            return dict(saved, **labels_of(row))
        return None

    if not train_new:
        return [s for s in map(finished, rows) if s]
    summaries = []
    bar = tqdm(rows, desc=f"{study} ({budget})", unit="run", dynamic_ncols=True)
    for i, row in enumerate(bar):
        out, flags = study_dir / slug(row.name), flags_of(row)
        bar.set_postfix_str(row.name)
        done = finished(row)
        if done:
            summaries.append(done)
            continue
        if (out / "last.pt").exists() and not (out / "summary.json").exists():
            how = ["--resume"]
        else:  # --overwrite: a run that died before its first checkpoint, or one trained with other flags
            how = ["--overwrite"] if out.exists() else []
        tqdm.write(f"\n=== {row.name}: python train.py {' '.join(flags + how)}")
        try:
            summary = train.main(flags + how)
        except train.TrainingDiverged as error:
            if not may_diverge:
                raise
            summary = {"best_val_loss": None, "diverged": str(error), "out_dir": str(out)}
        log = read_log(out / "log.jsonl") if (out / "log.jsonl").exists() else []
        summary.update(labels_of(row), flags=flags, command=command_of(row),
                       hardware=read_json(out / "config.json")["hardware"], date=time.strftime("%Y-%m-%d"),
                       wall_s=log[-1]["time_s"] if log else 0.0,
                       best_val_acc=max((r["val_acc"] for r in log), default=None),
                       curve=[{k: r[k] for k in ("step", "tokens", "time_s", "train_time_s", "train_loss", "val_loss")}
                              for r in log])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        summaries.append(summary)
        if after_each:  # everything finished so far, including later rows trained in an earlier sitting
            after_each(summaries + [s for s in map(finished, rows[i + 1:]) if s])
    return summaries


def same_run(flags):
    """A run's flags less `--device X` and `--seed 1337` (the default): neither where a row ran nor naming the
    default seed makes it another row."""
    flags = list(flags)
    for flag, value in (("--device", None), ("--seed", "1337")):
        at = flags.index(flag) if flag in flags else None
        if at is not None and value in (None, flags[at + 1]):
            flags = flags[:at] + flags[at + 2:]
    return flags


def results_name(study, data):
    """results/<study>.* for the project's own corpus, results/<study>-<corpus>.* for another one,
    so that a check on a second text neither reuses nor overwrites the first one's runs."""
    return study if data in ("shakespeare", "recall") else f"{study}-{slug(Path(data).stem)}"


def corpus_label(data):
    return "Tiny Shakespeare" if data == "shakespeare" else Path(data).name


def header(study, budget, device, data, started, extra="", command=None, runs=()):
    """The lines that say how a table was made (runs: the summaries it shows, which say where each one ran)."""
    data_flag = f" --data {data}" if data not in ("shakespeare", "recall") else ""
    command = command or f"python experiments.py {study} --budget {budget}{data_flag}"
    return (f"Measured from {time.strftime('%Y-%m-%d', time.localtime(started))} on {machines(runs, device)}, "
            f"torch {torch.__version__}; budget `{budget}`; data `{data}`. {extra}\n"
            f"Command: `{command}`.\n")


def machines(runs, device):
    """Where the runs were trained, each machine with its number of runs; the machine writing the page for runs
    that did not record theirs (and for a page of no runs)."""
    here = hardware(device)
    counts = Counter(run.get("hardware", here) for run in runs) or Counter({here: 0})
    if len(counts) == 1:
        return next(iter(counts))
    return " and ".join(f"{machine} ({n} run{'s' * (n != 1)})" for machine, n in counts.items())


def write_results(study, markdown, payload, figure_paths):
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{study}.md").write_text(markdown)
    (RESULTS / f"{study}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / (study + '.md')}, {study}.json, " + ", ".join(str(p.name) for p in figure_paths))


def mean_spread(values):
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


# -----------------------------------------------------------------------------
# matching parameter counts


def count_for(flags, vocab_size):
    """Parameters of the model train.py would build from these flags, without building data."""
    args = train.parse_args(flags)
    return count_params(build_model(args.arch, **train.model_config_from_args(args, vocab_size)))


def matched_hidden(flags, target, vocab_size):
    """The --hidden-dim that brings a New-LLM row closest to `target` parameters."""
    low, high = 8, 8192
    while high - low > 1:  # parameters grow with the hidden width: bisect
        mid = (low + high) // 2
        low, high = (mid, high) if count_for([*flags, "--hidden-dim", str(mid)], vocab_size) <= target else (low, mid)
    best = min((low, high), key=lambda h: abs(count_for([*flags, "--hidden-dim", str(h)], vocab_size) - target))
    return [*flags, "--hidden-dim", str(best)]


# -----------------------------------------------------------------------------
# study 1: the report's four improvements, added one at a time, then the context matrix

IMPROVEMENT_SCALES = {
    # quick: nanoGPT's CPU scale (~0.8M parameters); every row 400 steps of 32 x 128 characters
    # (1.6M tokens), 3 to 5 minutes on 2 cores. matrix_many_heads: the same matrix parameters as more,
    # smaller heads (a smaller state).
    "quick": dict(common=["--block-size", "128", "--batch-size", "32", "--max-iters", "400", "--lr", "2e-3",
                          "--eval-interval", "100", "--eval-iters", "10", "--dropout", "0.1"],
                  transformer=["--embed-dim", "128", "--heads", "4", "--layers", "4"],
                  width=128, stack_depth=4, window=16, matrix_heads=2, matrix_many_heads=8),
    # full: nanoGPT's Shakespeare model (~10.7M parameters), 5,000 steps of 64 x 256 characters.
    "full": dict(common=["--block-size", "256", "--batch-size", "64", "--max-iters", "5000", "--lr", "1e-3",
                         "--eval-interval", "250", "--eval-iters", "20", "--dropout", "0.2"],
                 transformer=["--embed-dim", "384", "--heads", "6", "--layers", "6"],
                 width=384, stack_depth=6, window=32, matrix_heads=6, matrix_many_heads=24),
}


def improvement_rows(scale, vocab_size):
    """The Transformer, then the report's improvements added one at a time, each matched in parameters;
    last, the context matrix in place of the best vector stack's context vectors."""
    width, depth = str(scale["width"]), str(scale["stack_depth"])
    transformer = ["--arch", "transformer", *scale["transformer"]]
    target = count_for([*scale["common"], *transformer], vocab_size)
    seed = ["--arch", "newllm", "--embed-dim", width, "--context-dim", width, "--layers", "8"]
    stack = ["--arch", "stack", "--embed-dim", width, "--context-dim", width, "--layers", depth, "--mixer", "vector",
             "--no-pos-embed", "--gate", "--context-norm", "--short-conv", "0"]
    conv = [*stack[:-1], "4"]
    matrix = ["matrix" if flag == "vector" else flag for flag in conv]
    few, many = scale["matrix_heads"], scale["matrix_many_heads"]
    side = scale["width"] // many  # each of the many heads is side x side
    steps = [  # (row name, flags, what it adds), cumulative
        ("seed New-LLM", seed, "the report's model: one context, additive update, FNN of 8 layers"),
        ("+ context norm", [*seed, "--context-norm"], "LayerNorm on the context after every update"),
        ("+ gate", [*seed, "--context-norm", "--gate"], "c = a*c + (1-a)*v instead of c + delta"),
        ("+ several contexts (stack)", stack,
         f"{depth} residual blocks, one context each; gates read the input only, so the parallel scan trains it"),
        ("+ short conv", conv, "each context reads the last 4 inputs (token shift)"),
        ("+ timescales", [*conv, "--timescales"], "per-channel gate floors: fast and slow memories"),
        ("context matrix", [*matrix, "--context-heads", str(few)],
         f"the short-conv stack with {few} delta-rule context matrices per block in place of its vector"),
        (f"context matrix, {many} heads", [*matrix, "--context-heads", str(many)],
         f"the same with {many} smaller matrices ({side}x{side}) per block: the same parameters, "
         f"{many // few} times less state"),
    ]
    rows = [Row("Transformer", transformer, "GPT-style decoder, the baseline", group="Transformer")]
    for name, flags, note in steps:
        matched = matched_hidden([*scale["common"], *flags], target, vocab_size)[len(scale["common"]):]
        mixer = flags[flags.index("--mixer") + 1] if "--mixer" in flags else None
        rows.append(Row(name, matched, note, group=name, extra={"mixer": mixer}))
    return rows, target


def follow_up_rows(scale, summaries, rows, target, vocab_size):
    """Rows that depend on the results: the hybrid on top of the best attention-free row, and second seeds
    of the Transformer, the best vector stack and the context matrices."""
    stacks = [(s, r) for s, r in zip(summaries, rows) if r.extra.get("mixer")]
    best_summary, best = min(stacks, key=lambda pair: pair[0]["best_val_loss"])
    _, best_vector = min(((s, r) for s, r in stacks if r.extra["mixer"] == "vector"),
                         key=lambda pair: pair[0]["best_val_loss"])
    matrices = [r for r in rows if r.extra.get("mixer") == "matrix"]
    base = best.flags[: best.flags.index("--hidden-dim")]
    hybrid = matched_hidden([*scale["common"], *base, "--local-window", str(scale["window"]), "--heads", "4"],
                            target, vocab_size)[len(scale["common"]):]
    return [
        Row("hybrid: best + local attention", hybrid,
            f"{best.name.lstrip('+ ')} row plus sliding-window attention over the last {scale['window']} positions "
            "(not attention-free)"),
        Row("Transformer (seed 2)", [*rows[0].flags, "--seed", "2"], "", group="Transformer"),
        Row(f"{best_vector.name} (seed 2)", [*best_vector.flags, "--seed", "2"], "the best vector stack, second seed",
            group=best_vector.group),
        *(Row(f"{matrix.name} (seed 2)", [*matrix.flags, "--seed", "2"], "", group=matrix.group) for matrix in matrices),
    ], best_vector.group


def field_rows(scale, target, vocab_size):
    """The field's fixed states at the same budget and parameters, two seeds each: an LSTM (char-rnn's two
    layers) and Mamba in the short-conv stack (N = 16 state numbers per channel)."""
    width, depth = str(scale["width"]), str(scale["stack_depth"])
    lstm = ["--arch", "lstm", "--embed-dim", width, "--layers", "2"]
    mamba = ["--arch", "stack", "--embed-dim", width, "--context-dim", width, "--layers", depth, "--mixer", "mamba",
             "--state-dim", "16", "--no-pos-embed", "--gate", "--context-norm", "--short-conv", "4"]
    rows = []
    for name, flags, note in (("LSTM", lstm, "the classic fixed-state language model, 2 layers"),
                              ("Mamba", mamba, "the short-conv stack with Mamba's selective state space (N = 16)")):
        matched = matched_hidden([*scale["common"], *flags], target, vocab_size)[len(scale["common"]):]
        rows += [Row(name, matched, note, group=name), Row(f"{name} (seed 2)", [*matched, "--seed", "2"], "", group=name)]
    return rows


def study_improvements(args, device):
    scale = IMPROVEMENT_SCALES[args.budget]
    dataset = load_dataset(args.data, "char", block_size=int(scale["common"][1]))
    rows, target = improvement_rows(scale, dataset.tokenizer.vocab_size)
    common = [*scale["common"], "--data", args.data, "--device", args.device]
    name = results_name("improvements", args.data)
    kept, started = kept_rows(name)  # rows finished on another machine keep their committed numbers
    summaries = run_rows(name, args.budget, rows, common, kept)
    more, best_vector = follow_up_rows(scale, summaries, rows, target, dataset.tokenizer.vocab_size)
    summaries += run_rows(name, args.budget, more, common, kept)
    field = field_rows(scale, target, dataset.tokenizer.vocab_size)  # the slowest last, each written as it lands

    def write(field_summaries):
        write_improvements(args, device, name, started, target, rows, summaries + field_summaries, best_vector)

    write(run_rows(name, args.budget, field, common, kept, after_each=write))


def write_improvements(args, device, name, started, target, rows, summaries, best_vector):
    by_group = {}
    for s in summaries:
        by_group.setdefault(s["group"], []).append(s["best_val_loss"])
    reference, _ = mean_spread(by_group["Transformer"])
    lines = [f"# Closing the gap: the report's improvements, one at a time ({args.budget})\n",
             header("improvements", args.budget, device, args.data, started, runs=summaries, extra=
                    f"Every row: {summaries[0]['tokens']:,} training tokens, parameters matched to the "
                    f"Transformer's {target:,} within 5%. Character-level; loss in nats per character."),
             "| row | params | best val loss | vs Transformer | train tokens/s | wall time | what it adds |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        gap = 100 * (s["best_val_loss"] - reference) / reference
        lines.append(f"| {s['name']} | {s['params']:,} | {s['best_val_loss']:.4f} | {gap:+.1f}% | "
                     f"{s['tokens_per_s']:,.0f} | {s['wall_s'] / 60:.1f} min | {s['note']} |")
    lines.append("\nThe gap is to the mean of the two Transformer seeds. The best vector stack and the context "
                 "matrices are trained again with a second seed; the hybrid is built on the best attention-free row; "
                 "the LSTM and Mamba, last, are the field's fixed states at the same budget.\n")
    lines.append("Seeds (mean ± half-range over seeds 1337 and 2):\n")
    for group in ("Transformer", best_vector, *(r.group for r in rows if r.extra.get("mixer") == "matrix"),
                  *(g for g in ("LSTM", "Mamba") if g in by_group)):
        mean, spread = mean_spread(by_group[group])
        gap = "" if group == "Transformer" else f" ({100 * (mean - reference) / reference:+.1f}% vs the Transformer)"
        lines.append(f"- {group}: {mean:.4f} ± {spread:.4f}{gap}")
    figure, firsts = RESULTS / f"{name}.png", [s for s in summaries if "seed 2" not in s["name"]]
    here = [s for s in firsts if (Path(s["out_dir"]) / "log.jsonl").exists()]  # curves are read from run folders
    RESULTS.mkdir(exist_ok=True)
    if len(here) == len(firsts) or (here and not figure.exists()):
        plot_runs([Path(s["out_dir"]) for s in here], figure,
                  title=f"The report's improvements, one at a time ({args.budget} budget, {corpus_label(args.data)})",
                  labels=[f"{s['name']} ({s['best_val_loss']:.3f})" for s in here])
    elif here:  # the figure drawn where the earlier rows ran stays
        lines.append("\nThe figure was drawn where the earlier rows ran; " + ", ".join(s["name"] for s in here)
                     + " (trained since) in the table only.")
    lines.append(f"\n![curves]({name}.png)\n")
    write_results(name, "\n".join(lines) + "\n", {"budget": args.budget, "target_params": target, "started": started,
                                                   "rows": summaries}, [figure])


# -----------------------------------------------------------------------------
# study 2: the seed report's table on real text

SEED_REPORT = {  # the report's own numbers (REPORT.md), for comparison
    "seed-baseline": ("baseline", "context_dim 256, hidden 512, layers 8", 5.6358),
    "seed-exp1": ("exp 1", "context_dim 256 -> 512", 5.6572),
    "seed-exp2": ("exp 2", "hidden 512 -> 1024, layers 8 -> 10 (context 512)", 5.7088),
    "seed-exp3": ("exp 3", "exp 2, epochs x 3", 5.7121),
    "seed-transformer": ("Transformer", "6 blocks, 4 heads, embed 256, FFN 1024", 4.8379),
}
# quick: a fifth of an epoch (three fifths for exp 3, keeping the report's 1:3), evaluated every 50 steps;
# full: the report's 50 and 150 epochs, evaluated once per epoch.
SEED_BUDGETS = {"quick": dict(epochs=0.2, eval=["--eval-interval", "50", "--eval-iters", "20"]),
                "full": dict(epochs=50, eval=["--eval-interval", "0", "--eval-iters", "100"])}


def study_seed(args, device):
    started = time.time()
    budget = SEED_BUDGETS[args.budget]
    rows = []
    for preset, (row_name, change, _) in SEED_REPORT.items():
        epochs = budget["epochs"] * (3 if preset == "seed-exp3" else 1)
        rows.append(Row(row_name, ["--preset", preset, "--epochs", str(epochs)], change, extra={"preset": preset,
                                                                                             "epochs": epochs}))
    name = results_name("seed", args.data)
    summaries = run_rows(name, args.budget, rows, ["--data", args.data, "--device", args.device, *budget["eval"]])
    reference = next(s for s in summaries if s["name"] == "Transformer")["best_val_loss"]
    lines = [f"# The seed report's table, rerun on real text ({args.budget})\n",
             header("seed", args.budget, device, args.data, started,
                    "Word level (1,000 tokens), one line per sequence, the report's models and optimiser; "
                    f"{budget['epochs']:g} epoch(s) ({3 * budget['epochs']:g} for exp 3) instead of 50 (150)."
                    if args.budget == "quick" else "The report's schedule: 50 epochs (150 for exp 3)."),
             "| run | change | parameters | best val loss | vs Transformer | report's val loss | report's gap "
             "| train tokens/s | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        _, _, report_loss = SEED_REPORT[s["extra"]["preset"]]
        gap = 100 * (s["best_val_loss"] - reference) / reference
        report_gap = 100 * (report_loss - 4.8379) / 4.8379
        is_reference = s["name"] == "Transformer"
        lines.append(f"| {s['name']} | {s['note']} | {s['params']:,} | {s['best_val_loss']:.4f} | "
                     f"{'—' if is_reference else f'{gap:+.1f}%'} | {report_loss:.4f} | "
                     f"{'—' if is_reference else f'{report_gap:+.1f}%'} | {s['tokens_per_s']:,.0f} | "
                     f"{s['wall_s'] / 60:.1f} min |")
    lines.append(f"\nTokens/s counts every position of the padded 32-token sequences.\n\n![curves]({name}.png)\n")
    figure = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    plot_runs([Path(s["out_dir"]) for s in summaries], figure,
              title=f"The seed report's runs on the lines of {corpus_label(args.data)} ({args.budget})",
              labels=[f"{s['name']} ({s['params'] / 1e6:.1f}M)" for s in summaries])
    write_results(name, "\n".join(lines) + "\n", {"budget": args.budget, "rows": summaries}, [figure])


# -----------------------------------------------------------------------------
# study 2b: the seed report's table on the seed report's own 30 sentences

SENTENCE_SEEDS = [1, 2, 3, 4, 5]


def study_seed_sentences(args, device):
    """The report's five rows with its own settings and data, five seeds each, beside its numbers."""
    rows = [Row(f"{row_name}, seed {seed}", ["--preset", preset, "--seed", str(seed)], change, group=row_name,
                extra={"preset": preset, "seed": seed})
            for preset, (row_name, change, _) in SEED_REPORT.items() for seed in SENTENCE_SEEDS]
    kept, started = kept_rows("seed-sentences")

    def write(summaries):  # after every finished run: a study cut short keeps what it measured
        write_seed_sentences(summaries, device, started)

    write(run_rows("seed-sentences", "report", rows, ["--data", "seed-sentences", "--device", args.device], kept,
                   write))


def write_seed_sentences(summaries, device, started):
    by_row = {}
    for s in summaries:
        by_row.setdefault(s["group"], {})[s["extra"]["seed"]] = s["best_val_loss"]
    report = {row_name: loss for row_name, _, loss in SEED_REPORT.values()}
    notes = {row_name: change for row_name, change, _ in SEED_REPORT.values()}
    params = {s["group"]: s["params"] for s in summaries}
    lines = ["# The seed report's table on the seed report's own data\n",
             header("seed-sentences", "the report's", device, "seed-sentences", started,
                    "The report's 30 sentences split its way (24 train, 6 validation, vocabulary from the training "
                    "lines, 1,000 entries), its models and settings: word level, batch 16, Adam at 1e-4, 50 epochs "
                    "(150 for exp 3), padding unscored, the best validation loss over the epochs. Seeds "
                    f"{SENTENCE_SEEDS}.", command="python experiments.py seed-sentences"),
             "| run | change | parameters | best val loss: mean ± half-range | min – max | seeds | the report's |",
             "|---|---|---|---|---|---|---|"]
    for row_name, losses in by_row.items():
        mean, spread = mean_spread(list(losses.values()))
        lines.append(f"| {row_name} | {notes[row_name]} | {params[row_name]:,} | {mean:.4f} ± {spread:.4f} | "
                     f"{min(losses.values()):.4f} – {max(losses.values()):.4f} | {len(losses)} | "
                     f"{report[row_name]:.4f} |")
    lines += ["\nThe report's orderings, seed by seed (each seed trains every row, so they pair up):\n"]
    names = list(by_row)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            lower, higher = sorted((first, second), key=lambda n: report[n])
            seeds = [seed for seed in by_row[lower] if seed in by_row[higher]]
            holds = sum(by_row[lower][seed] < by_row[higher][seed] for seed in seeds)
            ties = sum(by_row[lower][seed] == by_row[higher][seed] for seed in seeds)
            verdict = ("equal in every seed (the best epoch comes before the shorter run ends)" if ties == len(seeds)
                       else "survives the seed noise" if holds == len(seeds)
                       else "reversed in every seed" if holds + ties == 0 else "does not survive the seed noise")
            lines.append(f"- {lower} below {higher} (report: {report[lower]:.4f} < {report[higher]:.4f}): "
                         f"in {holds} of {len(seeds)} seeds; {verdict}")
    best_epochs = {row_name: sorted(min(s["curve"], key=lambda p: p["val_loss"])["step"] // 2 for s in summaries
                                    if s["group"] == row_name and s.get("curve")) for row_name in by_row}
    lines.append("\nThe epoch of each seed's best validation loss: " + "; ".join(
        f"{row_name} {', '.join(map(str, epochs))}" for row_name, epochs in best_epochs.items() if epochs) + ".")
    lines.append("\nAn epoch here is ceil(24 / 16) = 2 steps of 16 lines (the second takes 8 lines from the next "
                 "shuffle), where the report's loader gave 16 + 8; validation reads all 6 lines once per epoch.\n")
    lines.append("![seeds](seed-sentences.png)\n")
    figure = RESULTS / "seed-sentences.png"
    RESULTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for x, (row_name, losses) in enumerate(by_row.items()):
        ax.plot([x] * len(losses), list(losses.values()), "o", color="C0", alpha=0.6,
                label="this project, one seed each" if x == 0 else None)
        ax.plot([x], [report[row_name]], "x", color="C3", markersize=10, mew=2,
                label="the report (one run)" if x == 0 else None)
    ax.set_xticks(range(len(by_row)), list(by_row))
    ax.set_ylabel("best validation loss (nats per word)")
    ax.set_title("The report's five runs on its own 30 sentences")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    write_results("seed-sentences", "\n".join(lines) + "\n",
                  {"started": started, "seeds": SENTENCE_SEEDS, "rows": summaries}, [figure])


def committed_results(study):
    """What results/<study>.json holds ({} when the study has not been run)."""
    path = RESULTS / f"{study}.json"
    return read_json(path) if path.exists() else {}


def kept_rows(study):
    """The finished rows committed in results/<study>.json, if any, and when the study started (now if new)."""
    saved = committed_results(study)
    return saved.get("rows", []), saved.get("started", time.time())


def main(argv=None):
    parser = Parser(prog="experiments.py", description="Run one of the project's studies.")
    parser.add_argument("study", choices=list(STUDIES), help="which study")
    parser.add_argument("--budget", default="quick", choices=["quick", "full"], help="quick: 2 CPU cores; full: a GPU")
    parser.add_argument("--data", default="shakespeare", help="corpus for the language-model studies")
    parser.add_argument("--second-data", default="data/lcet10.txt",
                        help="scaling: the second text; regularisation: the small text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    for flag, default in (("data", "shakespeare"), ("budget", "quick")):
        if flag in FIXED_SETTINGS.get(args.study, ()) and getattr(args, flag) != default:
            raise UserError(f"the {args.study} study fixes its own --{flag}: run it without --{flag}")
    device = pick_device(args.device)
    STUDIES[args.study](args, device)


# what a study decides for itself: asked for anything else, it would silently run its own setting
FIXED_SETTINGS = {"seed-sentences": ("data", "budget"), "recall": ("data",), "scaling": ("data", "budget"),
                  "nanogpt-cpu": ("data", "budget"), "context": ("data", "budget"), "length": ("data", "budget"),
                  "regularisation": ("data", "budget")}


def elsewhere(module, name):
    """A study of its own file (recall.py, scaling.py), which builds on this file's rows: imported when run."""
    def study(args, device):
        return getattr(importlib.import_module(module), name)(args, device)
    return study


STUDIES = {"seed": study_seed, "seed-sentences": study_seed_sentences, "improvements": study_improvements,
           "recall": elsewhere("recall", "study_recall"),
           "lr-sweep": elsewhere("scaling", "study_lr_sweep"), "scaling": elsewhere("scaling", "study_scaling"),
           "nanogpt-cpu": elsewhere("field", "study_nanogpt_cpu"), "context": elsewhere("context", "study_context"),
           "length": elsewhere("length", "study_length"),
           "regularisation": elsewhere("regularisation", "study_regularisation")}

if __name__ == "__main__":
    try:
        run_script(main)
    except KeyboardInterrupt:
        print("stopped; rerun the same command to carry on (finished rows are kept)", file=sys.stderr)
        sys.exit(130)
