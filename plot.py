"""
Loss curves of finished (or running) runs: validation loss as solid lines,
training loss dashed, against steps (left) and wall-clock time (right); one
colour per run, labelled with its name, architecture and parameter count.

    python plot.py runs/newllm runs/transformer -o curves.png
    python plot.py runs/newllm runs/transformer -o curves.png --table   # and a markdown table
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no window needed
import matplotlib.pyplot as plt

from run_folder import read_json, read_log
from cli import Parser, UserError, run_script


def read_run(run_dir):
    """config.json and log.jsonl of one run directory."""
    run_dir = Path(run_dir)
    config_path, log_path = run_dir / "config.json", run_dir / "log.jsonl"
    if not config_path.is_file() or not log_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (it needs config.json and log.jsonl)")
    config, log = read_json(config_path), read_log(log_path)
    if not log:
        raise UserError(f"{log_path} has no evaluations yet")
    if not all({"step", "time_s", "val_loss", "train_loss"} <= record.keys() for record in log) \
            or not {"arch", "params"} <= config.keys():
        raise UserError(f"{run_dir} was not written by train.py")
    return config, log


def check_image_path(path):
    """Refuse, before any work, an output image matplotlib cannot write or a folder that does not exist."""
    path = Path(path)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if path.suffix[1:].lower() not in formats:
        raise UserError(f"cannot write {path}: name it .png, .svg or .pdf (or another of {', '.join(sorted(formats))})")
    if not path.resolve().parent.is_dir():
        raise UserError(f"cannot write {path}: its folder does not exist")


def run_label(run_dir, config):
    name, arch = Path(run_dir).name, config["arch"]
    described = name if name == arch else f"{name} ({arch})"
    return f"{described}, {config['params'] / 1e6:.2f}M params"


def plot_runs(run_dirs, out_path, title=None, labels=None):
    """Draw the two panels for the given runs and save them to out_path."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lowest, final = [], []
    for i, run_dir in enumerate(run_dirs):
        config, log = read_run(run_dir)
        color = colors[i % len(colors)]
        label = labels[i] if labels else run_label(run_dir, config)
        steps = [r["step"] for r in log]
        minutes = [r["time_s"] / 60 for r in log]
        for ax, xs in ((by_step, steps), (by_time, minutes)):
            ax.plot(xs, [r["val_loss"] for r in log], color=color, lw=2, label=label)
            ax.plot(xs, [r["train_loss"] for r in log], color=color, lw=1, ls="--", alpha=0.6)
        lowest.append(min(min(r["val_loss"], r["train_loss"]) for r in log))
        final.append(log[-1]["val_loss"])
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock minutes (evaluation included)")
    by_step.set_ylabel("loss (nats/token): validation solid, training dashed")
    # the first evaluations (ln V at step 0) would flatten everything else; show the interesting
    # part, and at least where every run ends
    by_step.set_ylim(min(lowest) - 0.05, max(min(lowest) + 1.5, max(final) + 0.1))
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def markdown_table(run_dirs):
    """One row per run: what it is and how it ended, ready to paste into a README."""
    lines = ["| run | arch | params | steps | tokens | best val loss | wall time | hardware |",
             "|---|---|---|---|---|---|---|---|"]
    for run_dir in run_dirs:
        config, log = read_run(run_dir)
        last = log[-1]
        lines.append(f"| {Path(run_dir).name} | {config['arch']} | {config['params']:,} | {last['step']:,} | "
                     f"{last['tokens']:,} | {min(r['val_loss'] for r in log):.4f} | {last['time_s'] / 60:.1f} min | "
                     f"{config['hardware']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = Parser(prog="plot.py", description="Plot loss curves of runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories written by train.py")
    parser.add_argument("-o", "--out", default="curves.png", help="output image (PNG, SVG or PDF)")
    parser.add_argument("--title", help="a title over both panels")
    parser.add_argument("--table", action="store_true", help="also print a markdown table of the runs")
    args = parser.parse_args(argv)
    check_image_path(args.out)
    plot_runs(args.runs, args.out, args.title)
    print(f"wrote {args.out}")
    if args.table:
        print(markdown_table(args.runs))


if __name__ == "__main__":
    run_script(main)
