"""
Loss against position: does a model trained on 64 or 128 characters still predict well at
character 8,000? Run through experiments.py, after the context study has trained its models:

    python experiments.py context      # trains (and scores) the models
    python experiments.py length       # scores each one's best checkpoint position by position

Tiny Shakespeare's validation text is cut into sequences of 8,192 characters, each read from
its start; the loss is averaged over positions 1-16, 17-32, ... 4,097-8,192 (the first
character predicted is position 1). Each model reads two ways: everything from the sequence's
start (its state carried 64 to 128 times past its training length), and cut to its training
length (context.py's windows of the block size every half block, so every position reads half a
block to a block). The gap between the two, bucket by bucket, is what the state adds or costs
past the training length, separated from what the text at those positions is like. The
Transformer cannot read past its position table: it reads through windows of its table both ways.
"""

import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from context import kept_beside, position_losses
from data import load_dataset
from cli import UserError
from experiments import RESULTS, committed_results, hardware, header, slug, write_results

LONGEST = 8192
EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]  # bucket i: positions EDGES[i] + 1 .. EDGES[i + 1]


def losses_by_position(model, val):
    """Mean loss per position bucket (and twice its standard error over sequences), reading everything and reading
    cut to the training length."""
    rows = val[: len(val) // (LONGEST + 1) * (LONGEST + 1)].view(-1, LONGEST + 1)
    trained = model.config.block_size
    out, by_way = {"sequences": len(rows), "block_size": trained}, {}
    for way, cut in (("everything", model.max_len), ("training length", trained)):
        losses = position_losses(model, rows, cut)  # (S, LONGEST): position p + 1 predicts character p + 2
        by_way[way] = torch.stack([losses[:, a:b].mean(1) for a, b in zip(EDGES, EDGES[1:])])  # (buckets, S)
    by_way["gap"] = by_way["everything"] - by_way["training length"]  # paired sequence by sequence
    for way, x in by_way.items():
        out[way] = list(zip(x.mean(1).tolist(), (2 * x.std(1) / math.sqrt(x.size(1))).tolist()))
    return out


def study_length(args, device):
    started = time.time()
    dataset = load_dataset("shakespeare", "char", block_size=64)
    val = torch.as_tensor(dataset.splits["val"]).to(device)
    scored = committed_results("context").get("evaluated", [])
    if not scored:
        raise UserError("the length study scores the context study's models: run `python experiments.py context` first")
    measured_before = {(m["name"], m["recipe"]): m for m in committed_results("length").get("models", [])}
    measured = []
    for e in (e for e in scored if e["checkpoint"] == "best" and "(seed" not in e["name"]):
        study = "nanogpt-cpu" if e["recipe"].startswith("nanoGPT") else "context"
        path = Path("runs/experiments") / f"{study}-quick" / slug(e["name"]) / "ckpt.pt"
        if not path.exists():  # trained on another machine: its committed numbers, if it was ever measured
            if (e["name"], e["recipe"]) in measured_before:
                measured.append(measured_before[e["name"], e["recipe"]])
            else:
                print(f"{e['name']} ({e['recipe']}): its checkpoint is not on this machine and was never measured, left out")
            continue
        result = kept_beside(path, "length", [LONGEST, EDGES, "paired"], lambda model: losses_by_position(model, val), device)
        measured.append(dict(result, name=e["name"], recipe=e["recipe"], hardware=hardware(device)))
    write_length_page(measured, device, started)


def write_length_page(measured, device, started):
    buckets = [f"{a + 1:,}–{b:,}" for a, b in zip(EDGES, EDGES[1:])]
    lines = ["# Loss against position\n",
             header("length", "quick", device, "shakespeare", started, runs=measured, extra=
                    f"Tiny Shakespeare's validation text in {measured[0]['sequences']} sequences of {LONGEST:,} "
                    "characters, each read from its start; each model's best checkpoint of the context study "
                    "(first seeds). Loss in nats per character, averaged over the positions of each bucket.",
                    command="python experiments.py length"),
             "## Reading everything\n",
             "| model | recipe | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 2)]
    for m in measured:
        lines.append(f"| {m['name']} | {m['recipe']} | " + " | ".join(f"{x:.3f}" for x, _ in m["everything"]) + " |")
    lines += ["\n## What reading past the training length adds\n",
              "Reading everything minus reading cut to the training length (half a block to a block), bucket by "
              "bucket: negative where the state carried from further back helps, positive where it hurts (± twice the "
              "standard error over sequences where above 0.001). The Transformer reads through its table both ways.\n",
              "| model | trained at | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 2)]
    for m in measured:
        cells = [f"{round(gap, 4) + 0.0:+.4f}" + (f" ± {spread:.4f}" if spread > 0.001 else "")
                 for gap, spread in m["gap"]]
        lines.append(f"| {m['name']} | {m['block_size']} | " + " | ".join(cells) + " |")
    figure = RESULTS / "length.png"
    plot_positions(measured, figure)
    lines.append("\n![loss against position](length.png)\n")
    write_results("length", "\n".join(lines) + "\n", {"started": started, "edges": EDGES, "models": measured},
                  [figure])


def plot_positions(measured, figure):
    """Per recipe, a column: on top the loss against position (log axis) reading everything, below the gap to
    reading cut to the training length (dashed line: the training length); one colour per model."""
    order = ["nanoGPT", "CPU preset", "lever", "equal time"]  # as the context study trains them
    recipes = sorted({m["recipe"] for m in measured}, key=lambda r: [r.startswith(o) for o in order].index(True))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    centres = [math.sqrt((a + 1) * b) for a, b in zip(EDGES, EDGES[1:])]  # geometric middle of each bucket
    fig, axes = plt.subplots(2, len(recipes), figsize=(6.5 * len(recipes), 8), sharex=True, squeeze=False)
    for column, recipe in enumerate(recipes):
        loss_ax, gap_ax = axes[0][column], axes[1][column]
        for i, m in enumerate(m for m in measured if m["recipe"] == recipe):
            color = colors[i % len(colors)]
            loss_ax.plot(centres, [x for x, _ in m["everything"]], marker="o", color=color, label=m["name"])
            gap_ax.errorbar(centres, [x for x, _ in m["gap"]], yerr=[e for _, e in m["gap"]], marker="o", color=color,
                            capsize=2, label=m["name"])
        for ax in (loss_ax, gap_ax):
            for block in {m["block_size"] for m in measured if m["recipe"] == recipe}:  # the training lengths
                ax.axvline(block, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        gap_ax.axhline(0, color="black", linewidth=0.8)
        loss_ax.set_title(f"{recipe} (the Transformer through windows of its table)", fontsize=10)
        loss_ax.set_ylabel("loss, reading everything (nats)")
        gap_ax.set_ylabel("everything minus cut to the block (nats)")
        gap_ax.set_xlabel("position in the sequence (characters)")
        loss_ax.legend(fontsize=8)
    fig.suptitle("Loss against position, to 8,192 characters")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
