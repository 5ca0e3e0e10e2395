"""
The lab beside the field: nanoGPT's own CPU recipe as an outside yardstick, run through experiments.py.

    python experiments.py nanogpt-cpu     # the Transformer at nanoGPT's recipe, then every model at it

nanoGPT's README trains its character-level Shakespeare model on a CPU with
    --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    --lr_decay_iters=2000 --dropout=0.0   (its config otherwise: lr 1e-3 cosine to 1e-4,
    100 warmup steps, AdamW beta2 0.99, weight decay 0.1, gradient clipping 1.0)
and says the validation loss reaches about 1.88. The Transformer row runs exactly that recipe
here; every other model runs it too at the Transformer's parameter count, with two seeds each.
Two differences from nanoGPT remain, both in the model, not the recipe: nanoGPT ties the token
embedding to the output head and has no biases, this lab's Transformer does neither (about 1%
more parameters); and nanoGPT scores 20 random validation batches, this lab 100 fixed ones.
"""

import time
from pathlib import Path

from data import load_dataset
from experiments import (RESULTS, Row, corpus_label, header, kept_rows, matched_hidden, count_for, mean_spread,
                         run_rows, write_results)
from plot import plot_runs

NANOGPT_RECIPE = ["--block-size", "64", "--batch-size", "12", "--max-iters", "2000", "--lr", "1e-3",
                  "--lr-schedule", "cosine", "--warmup-iters", "100", "--beta2", "0.99", "--weight-decay", "0.1",
                  "--grad-clip", "1.0", "--dropout", "0", "--eval-interval", "250", "--eval-iters", "100"]
NANOGPT_PUBLISHED = 1.88  # nanoGPT's README: "validation loss ... 1.88" for this recipe on a CPU
SEEDS = (1337, 2)

# Every model at nanoGPT's width 128: the CPU presets' models (best-newllm-cpu, best-matrix-cpu,
# lstm-cpu, mamba-cpu), their MLP (or LSTM) width matched again to the Transformer at block 64.
STACK = ["--arch", "stack", "--embed-dim", "128", "--context-dim", "128", "--layers", "4", "--gate", "--short-conv",
         "4", "--context-norm", "--no-pos-embed"]
MODELS = {
    "Transformer": ["--arch", "transformer", "--embed-dim", "128", "--heads", "4", "--layers", "4"],
    "vector stack": [*STACK, "--mixer", "vector"],
    "context matrix": [*STACK, "--mixer", "matrix", "--context-heads", "2"],
    "LSTM": ["--arch", "lstm", "--embed-dim", "128", "--layers", "2"],
    "Mamba": [*STACK, "--mixer", "mamba", "--state-dim", "16"],
}


def nanogpt_rows(vocab_size):
    """Each model at the recipe, parameters matched to the Transformer's, seed by seed (all first seeds first)."""
    target = count_for([*NANOGPT_RECIPE, *MODELS["Transformer"]], vocab_size)
    flags = {name: model if name == "Transformer" else
             matched_hidden([*NANOGPT_RECIPE, *model], target, vocab_size)[len(NANOGPT_RECIPE):]
             for name, model in MODELS.items()}
    return [Row(name if seed == SEEDS[0] else f"{name} (seed {seed})", [*flags[name], "--seed", str(seed)],
                group=name, extra={"seed": seed}) for seed in SEEDS for name in MODELS], target


def study_nanogpt_cpu(args, device):
    dataset = load_dataset("shakespeare", "char", block_size=64)
    rows, target = nanogpt_rows(dataset.tokenizer.vocab_size)
    kept, started = kept_rows("nanogpt-cpu")

    def write(summaries):
        write_nanogpt_page(summaries, target, device, started)
    write(run_rows("nanogpt-cpu", "quick", rows, [*NANOGPT_RECIPE, "--device", args.device], kept, write))


def write_nanogpt_page(summaries, target, device, started):
    by_group = {}
    for s in summaries:
        by_group.setdefault(s["group"], []).append(s)
    transformer = [s["best_val_loss"] for s in by_group.get("Transformer", [])]
    reference = mean_spread(transformer)[0] if transformer else None
    lines = ["# nanoGPT's CPU recipe, every model\n",
             header("nanogpt-cpu", "quick", device, "shakespeare", started,
                    f"Every run: nanoGPT's recipe (block 64, batch 12, 2,000 steps, lr 1e-3, dropout 0; "
                    f"{summaries[0]['tokens']:,} training tokens), parameters matched to the Transformer's "
                    f"{target:,} within 1%. Seeds {SEEDS[0]} and {SEEDS[1]}; loss in nats per character, the "
                    f"best of 9 evaluations on 100 fixed validation batches.",
                    command="python experiments.py nanogpt-cpu"),
             "| model | params | best val loss (mean ± half-range) | per seed | vs Transformer | wall time |",
             "|---|---|---|---|---|---|"]
    for group, runs in by_group.items():
        losses = [s["best_val_loss"] for s in runs]
        mean, spread = mean_spread(losses)
        gap = f"{100 * (mean - reference) / reference:+.1f}%" if reference and group != "Transformer" else "—"
        lines.append(f"| {group} | {runs[0]['params']:,} | {mean:.4f} ± {spread:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in losses)} | {gap} | "
                     f"{sum(s['wall_s'] for s in runs) / len(runs) / 60:.1f} min |")
    lines.append("\nWall time is the mean over seeds, on a machine that was not kept quiet: a rough guide only "
                 "(docs/speed.md has the speeds measured for that purpose).")
    if transformer:
        mean, spread = mean_spread(transformer)
        lines.append(f"\nnanoGPT's README gives {NANOGPT_PUBLISHED} for this recipe; this lab's Transformer reaches "
                     f"{mean:.4f} ± {spread:.4f} over {len(transformer)} seed(s), "
                     f"{100 * (mean - NANOGPT_PUBLISHED) / NANOGPT_PUBLISHED:+.1f}% from it. Its model is "
                     f"nanoGPT's but for an untied output head with biases (see field.py).")
    firsts = [s for s in summaries if s["extra"]["seed"] == SEEDS[0]]
    figure = RESULTS / "nanogpt-cpu.png"
    RESULTS.mkdir(exist_ok=True)
    plot_runs([Path(s["out_dir"]) for s in firsts], figure,
              title=f"nanoGPT's CPU recipe on {corpus_label('shakespeare')}, seed {SEEDS[0]}",
              labels=[f"{s['name']} ({s['best_val_loss']:.3f})" for s in firsts])
    lines.append("\n![curves](nanogpt-cpu.png)\n")
    write_results("nanogpt-cpu", "\n".join(lines) + "\n", {"started": started, "target_params": target,
                                                         "recipe": NANOGPT_RECIPE, "rows": summaries}, [figure])
