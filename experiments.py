"""
The project's experiments: one command each, writing results/<study>.md, .json and .png.

    python experiments.py seed [--budget quick|full] [--data PATH]          # the seed report's table, on real text
    python experiments.py improvements [--budget quick|full] [--data PATH]  # the report's fixes, one at a time
    python experiments.py recall [--budget quick|full]                      # associative recall against state size

Every row is an ordinary train.py run in runs/experiments/<study>-<budget>/<row>.
A finished row is never trained again and an interrupted one resumes, so
Ctrl-C and rerunning the same command loses nothing. `quick` fits a 2-core
CPU (budgets below); `full` is the schedule meant for a GPU.
"""

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

import train
from data import load_dataset
from lab import Parser, UserError, build_model, count_params, hardware, pick_device
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


def run_rows(study, budget, rows, common_flags):
    """Train every row (skipping finished ones, resuming interrupted ones); return their summaries."""
    study_dir = Path("runs/experiments") / f"{study}-{budget}"
    summaries = []
    bar = tqdm(rows, desc=f"{study} ({budget})", unit="run", dynamic_ncols=True)
    for row in bar:
        out = study_dir / slug(row.name)
        bar.set_postfix_str(row.name)
        summary_path = out / "summary.json"
        if summary_path.exists():
            summaries.append(json.loads(summary_path.read_text()))
            continue
        flags = [*common_flags, *row.flags, "--out-dir", str(out), "--sample-tokens", "0"]
        if (out / "last.pt").exists():
            flags.append("--resume")
        elif out.exists():
            flags.append("--overwrite")  # a run that died before its first checkpoint
        tqdm.write(f"\n=== {row.name}: python train.py {' '.join(flags)}")
        summary = train.main(flags)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        summary.update(name=row.name, note=row.note, group=row.group or row.name, extra=row.extra,
                       wall_s=log[-1]["time_s"], best_val_acc=max(r["val_acc"] for r in log),
                       command="python train.py " + " ".join(flags))
        summary_path.write_text(json.dumps(summary, indent=2))
        summaries.append(summary)
    return summaries


def header(study, budget, device, data, started, extra=""):
    """The lines that say how a table was made."""
    return (f"Measured {time.strftime('%Y-%m-%d', time.localtime(started))} on {hardware(device)}, "
            f"torch {torch.__version__}; budget `{budget}`; data `{data}`. {extra}\n"
            f"Command: `python experiments.py {study} --budget {budget}"
            + (f" --data {data}" if data != "shakespeare" else "") + "`.\n")


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
# study 1: the report's four improvements, added one at a time (README "Closing the gap")

IMPROVEMENT_SCALES = {
    # quick: nanoGPT's CPU scale (~0.8M parameters), 2,000 steps of 32 x 128 characters would be
    # too long for 2 cores and 11 rows, so every row gets 600 steps (2.46M tokens).
    "quick": dict(common=["--block-size", "128", "--batch-size", "32", "--max-iters", "600", "--lr", "2e-3",
                          "--eval-interval", "100", "--eval-iters", "10", "--dropout", "0.1"],
                  transformer=["--embed-dim", "128", "--heads", "4", "--layers", "4"],
                  width=128, stack_depth=4, window=16),
    # full: nanoGPT's Shakespeare model (~10.7M parameters), 5,000 steps of 64 x 256 characters.
    "full": dict(common=["--block-size", "256", "--batch-size", "64", "--max-iters", "5000", "--lr", "1e-3",
                         "--eval-interval", "250", "--eval-iters", "20", "--dropout", "0.2"],
                 transformer=["--embed-dim", "384", "--heads", "6", "--layers", "6"],
                 width=384, stack_depth=6, window=32),
}


def improvement_rows(scale, vocab_size):
    width, depth = str(scale["width"]), str(scale["stack_depth"])
    transformer = ["--arch", "transformer", *scale["transformer"]]
    target = count_for([*scale["common"], *transformer], vocab_size)
    seed = ["--arch", "newllm", "--embed-dim", width, "--context-dim", width, "--layers", "8"]
    stack = ["--arch", "newllm", "--embed-dim", width, "--context-dim", width, "--num-contexts", depth,
             "--no-pos-embed", "--gate", "--context-norm"]
    steps = [  # (row name, flags, what it adds), cumulative
        ("seed New-LLM", seed, "SEED.md's model: one context, additive update, FNN of 8 layers"),
        ("+ context norm", [*seed, "--context-norm"], "LayerNorm on the context after every update"),
        ("+ gate", [*seed, "--context-norm", "--gate"], "c = a*c + (1-a)*v instead of c + delta"),
        ("+ several contexts (stack)", stack,
         f"{depth} residual blocks, one context each; gates read the input only, so the parallel scan trains it"),
        ("+ timescales", [*stack, "--timescales"], "per-channel gate floors: fast and slow memories"),
        ("+ short conv", [*stack, "--timescales", "--short-conv", "4"], "each context reads the last 4 inputs"),
    ]
    rows = [Row("Transformer", transformer, "GPT-style decoder, the baseline", group="Transformer")]
    for name, flags, note in steps:
        rows.append(Row(name, matched_hidden([*scale["common"], *flags], target, vocab_size)[len(scale["common"]):], note))
    best = rows[-1]
    rows.append(Row("hybrid: + local attention", matched_hidden(
        [*scale["common"], *best.flags[:-2], "--local-window", str(scale["window"]), "--heads", "4"], target,
        vocab_size)[len(scale["common"]):], f"sliding-window attention over the last {scale['window']} positions "
                                            "(not attention-free)"))
    # the two rows the claim rests on get a second seed
    rows.append(Row("Transformer (seed 2)", [*transformer, "--seed", "2"], "", group="Transformer"))
    best.group = "best attention-free"
    rows.append(Row(best.name + " (seed 2)", [*best.flags, "--seed", "2"], "", group="best attention-free"))
    return rows, target


def study_improvements(args, device):
    started = time.time()
    scale = IMPROVEMENT_SCALES[args.budget]
    dataset = load_dataset(args.data, "char", block_size=int(scale["common"][1]))
    rows, target = improvement_rows(scale, dataset.tokenizer.vocab_size)
    common = [*scale["common"], "--data", args.data, "--device", args.device]
    summaries = run_rows("improvements", args.budget, rows, common)
    by_group = {}
    for s in summaries:
        by_group.setdefault(s["group"], []).append(s["best_val_loss"])
    reference, _ = mean_spread(by_group["Transformer"])
    lines = [f"# Closing the gap: the report's improvements, one at a time ({args.budget})\n",
             header("improvements", args.budget, device, args.data, started,
                    f"Every row: {summaries[0]['tokens']:,} training tokens, parameters matched to the "
                    f"Transformer's {target:,} within 5%. Character-level; loss in nats per character."),
             "| row | params | best val loss | vs Transformer | train tokens/s | wall time | what it adds |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        gap = 100 * (s["best_val_loss"] - reference) / reference
        lines.append(f"| {s['name']} | {s['params']:,} | {s['best_val_loss']:.4f} | {gap:+.1f}% | "
                     f"{s['tokens_per_s']:,.0f} | {s['wall_s'] / 60:.1f} min | {s['note']} |")
    lines.append("\nSeeds (mean ± half-range over seeds 1337 and 2):\n")
    for group in ("Transformer", "best attention-free"):
        mean, spread = mean_spread(by_group[group])
        lines.append(f"- {group}: {mean:.4f} ± {spread:.4f}")
    best_mean, _ = mean_spread(by_group["best attention-free"])
    lines.append(f"- gap of the best attention-free row to the Transformer: {100 * (best_mean - reference) / reference:+.1f}%")
    figure = RESULTS / "improvements.png"
    RESULTS.mkdir(exist_ok=True)
    plot_runs([Path(s["out_dir"]) for s in summaries if "seed 2" not in s["name"]], figure,
              title=f"The report's improvements, one at a time ({args.budget} budget)",
              labels=[f"{s['name']} ({s['best_val_loss']:.3f})" for s in summaries if "seed 2" not in s["name"]])
    lines.append(f"\n![curves](improvements.png)\n")
    write_results("improvements", "\n".join(lines) + "\n", {"budget": args.budget, "target_params": target,
                                                             "rows": summaries}, [figure])


def main(argv=None):
    parser = Parser(prog="experiments.py", description="Run one of the project's studies.")
    parser.add_argument("study", choices=list(STUDIES), help="which study")
    parser.add_argument("--budget", default="quick", choices=["quick", "full"], help="quick: 2 CPU cores; full: a GPU")
    parser.add_argument("--data", default="shakespeare", help="corpus for the language-model studies")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    STUDIES[args.study](args, device)


STUDIES = {"improvements": study_improvements}

if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped; rerun the same command to carry on (finished rows are kept)", file=sys.stderr)
        sys.exit(130)
