"""
Does the attention-free lead hold when every model is tuned, trained longer and made larger?
Two studies, run through experiments.py:

    python experiments.py lr-sweep    # each model at 3+ learning rates (the quick budget); each one's best
    python experiments.py scaling     # the best rates, trained to 20M tokens (two seeds, a second text),
                                      # and the two families at ~3M parameters to 6M tokens

Both keep every finished run's numbers and validation curve in results/<study>.json as soon as
it lands, and read them back: a study spread over several sittings, on different machines,
never trains a finished run again (an interrupted run resumes from runs/ on the machine that
has it).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import train
from run_folder import load_checkpoint
from cli import UserError
from data import load_dataset
from experiments import (IMPROVEMENT_SCALES, RESULTS, Row, committed_results, field_rows, header, improvement_rows,
                         kept_rows, mean_spread, results_name, run_rows, write_results)
from models import model_from_checkpoint

# The models compared, by the improvements study's row that defines each (same flags, same parameters).
COMPARED = {"Transformer": "Transformer", "seed New-LLM": "seed New-LLM", "vector stack": "+ short conv",
            "context matrix": "context matrix"}
SWEEP_RATES = {"quick": [1e-3, 2e-3, 4e-3], "full": [5e-4, 1e-3, 2e-3]}
MOST_RATES = 6  # a model's grid grows past an edge at most this far
SECOND_SEED = 2  # after the sweep, the best rates again with this seed


def compared_models(scale, vocab_size, also=(), field=False):
    """name -> train.py flags of each compared model (and of the improvements rows named in `also`; with field,
    the LSTM and Mamba last), parameters matched to the scale's Transformer."""
    rows, target = improvement_rows(scale, vocab_size)
    by_name = {row.name: row for row in rows}
    field_models = {row.name: row.flags for row in field_rows(scale, target, vocab_size)  # each matched: slow
                    if row.name == row.group} if field else {}
    return {**{name: by_name[row].flags for name, row in COMPARED.items()},
            **{name: by_name[name].flags for name in also}, **field_models}, target


# -----------------------------------------------------------------------------
# the learning-rate sweep


def study_lr_sweep(args, device):
    scale = IMPROVEMENT_SCALES[args.budget]
    dataset = load_dataset(args.data, "char", block_size=int(scale["common"][1]))
    many_heads = f"context matrix, {scale['matrix_many_heads']} heads"
    models, target = compared_models(scale, dataset.tokenizer.vocab_size, also=[many_heads], field=True)
    many_heads_flags = models.pop(many_heads)
    common = [*scale["common"], "--data", args.data, "--device", args.device]
    study = results_name("lr-sweep", args.data)  # another text's sweep never replaces Tiny Shakespeare's
    kept, started = kept_rows(study)
    grid = {model: sorted({*SWEEP_RATES[args.budget], *(s["extra"]["lr"] for s in swept(kept)
                                                         if s["extra"]["model"] == model)})
            for model in models}  # rates beyond the grid run in an earlier sitting are part of it from the start

    def seconds(summaries):
        return second_seed_rows(models, best_rates(summaries), many_heads, many_heads_flags)

    def write(summaries):  # with the second seeds finished so far, which the grid's partial writes lack
        done = {s["name"] for s in summaries}
        more = [s for s in run_rows(study, args.budget, seconds(summaries), common, kept, train_new=False)
                if s["name"] not in done]
        write_sweep(study, summaries + more, grid, args, device, target, started)

    while True:  # a model whose best rate is at an edge of its grid gets the next rate beyond that edge
        rows = [Row(f"{model}, lr {lr:g}", [*flags, "--lr", f"{lr:g}"], group=model, extra={"model": model, "lr": lr})
                for model, flags in models.items() for lr in grid[model]]
        summaries = run_rows(study, args.budget, rows, common, kept, write, may_diverge=True)
        widened = False
        for model, best in best_rates(summaries).items():
            rates = grid[model]
            if len(rates) < MOST_RATES and best == rates[0]:
                rates.insert(0, best / 2)
                widened = True
            elif len(rates) < MOST_RATES and best == rates[-1]:
                rates.append(best * 2)
                widened = True
        if not widened:
            break
    write(run_rows(study, args.budget, rows + seconds(summaries), common, kept, write))


def second_seed_rows(models, best, many_heads, many_heads_flags):
    """After the sweep, at each model's best rate: the models compared later (all but the report's) with a
    second seed, and the context matrix's parameters as more, smaller heads (at the matrix's rate, not swept
    for it), both seeds. Their extra carries the seed, which keeps them out of the grid and its best rates."""
    def row(name, flags, lr, seed):
        return Row(f"{name}, lr {lr:g}, seed {seed}", [*flags, "--lr", f"{lr:g}", "--seed", str(seed)],
                   group=name, extra={"model": name, "lr": lr, "seed": seed})
    compared = ("Transformer", "vector stack", "context matrix", "LSTM", "Mamba")
    rows = [row(name, models[name], best[name], SECOND_SEED) for name in compared if name in best]
    return rows + [row(many_heads, many_heads_flags, best["context matrix"], seed) for seed in (1337, SECOND_SEED)]


def best_rates(summaries):
    """model -> the learning rate with the lowest best validation loss (diverged runs never win), over the
    grid's runs (one seed; second_seed_rows' runs are not part of it)."""
    best = {}
    for s in swept(summaries):
        model, loss = s["extra"]["model"], s["best_val_loss"]
        if loss is not None and (model not in best or loss < best[model][1]):
            best[model] = (s["extra"]["lr"], loss)
    return {model: lr for model, (lr, _) in best.items()}


def swept(summaries):
    return [s for s in summaries if "seed" not in s["extra"]]


def write_sweep(name, summaries, grid, args, device, target, started):
    best = best_rates(summaries)
    rates = sorted({lr for lrs in grid.values() for lr in lrs})
    cell = {(s["extra"]["model"], s["extra"]["lr"]): s for s in swept(summaries)}
    lines = ["# Each model at its own best learning rate\n",
             header("lr-sweep", args.budget, device, args.data, started, runs=summaries, extra=
                    f"Every run: the improvements study's settings ({max(s.get('tokens', 0) for s in summaries):,} training "
                    f"tokens, parameters matched to the Transformer's {target:,}), only the peak learning rate "
                    "changes (warmup, then cosine decay to a tenth). Best validation loss; bold: each model's best."),
             "| model | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best rate |",
             "|---|" + "---|" * (len(rates) + 1)]
    for model in grid:
        cells = []
        for lr in rates:
            s = cell.get((model, lr))
            if s is None:
                cells.append("—")
            elif s["best_val_loss"] is None:
                cells.append("diverged")
            else:
                text = f"{s['best_val_loss']:.4f}"
                cells.append(f"**{text}**" if best.get(model) == lr else text)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {best.get(model, '—')} |")
    lines.append("\nThe grid starts at " + ", ".join(f"{lr:g}" for lr in SWEEP_RATES[args.budget]) +
                 " (a 4x span); a model whose best rate sits at an edge is also run one step (2x) beyond it, "
                 "so every best rate printed here has a worse rate on both sides unless the grid's limit "
                 f"of {MOST_RATES} rates was reached. One seed per cell (1337).\n")
    lines += second_seed_table(summaries, cell, best)
    lines.append(f"![sweep]({name}.png)\n")
    figure = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in grid:
        points = sorted((lr, cell[(model, lr)]["best_val_loss"]) for lr in grid[model]
                        if (model, lr) in cell and cell[(model, lr)]["best_val_loss"] is not None)
        if points:
            line, = ax.plot(*zip(*points), "o-", label=model)
            low = min(points, key=lambda p: p[1])
            ax.plot(*low, "*", markersize=16, color=line.get_color())  # the model's best rate
    rates = sorted({lr for model in grid for lr in grid[model]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate (star: each model's best)")
    ax.set_ylabel("best validation loss (nats/char)")
    ax.set_title(f"Learning-rate sweep ({args.budget} budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    write_results(name, "\n".join(lines) + "\n", {"budget": args.budget, "started": started,
                                                        "best_lr": best, "rows": summaries}, [figure])


def second_seed_table(summaries, cell, best):
    """Each model at its best rate in both seeds, with the mean and half-range (second_seed_rows)."""
    seeds = {}  # model -> {seed: summary}
    for s in summaries:
        if "seed" in s["extra"]:
            seeds.setdefault(s["extra"]["model"], {})[s["extra"]["seed"]] = s
    if not seeds:
        return []
    lines = ["At each model's best rate, a second seed; the context matrix's parameters as more, smaller heads "
             "run at the 2-head matrix's best rate (not swept for it):\n",
             "| model | lr | seed 1337 | seed 2 | mean ± half-range |", "|---|---|---|---|---|"]
    for model, by_seed in seeds.items():
        lr = next(iter(by_seed.values()))["extra"]["lr"]
        if best.get(model) == lr and 1337 not in by_seed and (model, lr) in cell:
            by_seed[1337] = cell[(model, lr)]  # the grid's own run at that rate
        losses = [by_seed[seed]["best_val_loss"] if seed in by_seed else None for seed in (1337, SECOND_SEED)]
        finished = [loss for loss in losses if loss is not None]
        mean = "{:.4f} ± {:.4f}".format(*mean_spread(finished)) if len(finished) == 2 else "—"
        lines.append(f"| {model} | {lr:g} | " + " | ".join("—" if loss is None else f"{loss:.4f}" for loss in losses)
                     + f" | {mean} |")
    return lines + [""]


def tuned_rates():
    """The sweep's best learning rate per model (results/lr-sweep.json)."""
    best = committed_results("lr-sweep").get("best_lr", {})
    if not all(name in best for name in ("Transformer", "vector stack", "context matrix")):
        raise UserError("the scaling study trains every model at its best learning rate: "
                        "run python experiments.py lr-sweep first")
    return best


def swept_models():
    """The models whose sweep has finished: its last step, the second seed at the best rate, has run."""
    return {s["extra"]["model"] for s in committed_results("lr-sweep").get("rows", [])
            if s["extra"].get("seed") == SECOND_SEED}


# -----------------------------------------------------------------------------
# training length and model size

SCALING = dict(
    # the length axis: the quick budget's models and batches, 5,000 steps = 20.5M tokens, evaluated every
    # 250 steps (1.02M tokens) on 40 fixed batches (164k tokens: all of Tiny Shakespeare's validation text)
    length=dict(steps=5000, eval_every=250, models=("Transformer", "vector stack", "context matrix"),
                field=("LSTM", "Mamba")),  # both seeds on Tiny Shakespeare, each once its sweep has finished
    # the size axis: width 256 (about 3.2M parameters), 1,500 steps = 6.1M tokens
    size=dict(steps=1500, eval_every=250, models=("Transformer", "vector stack"),
              scale=dict(IMPROVEMENT_SCALES["quick"], transformer=["--embed-dim", "256", "--heads", "4", "--layers", "4"],
                         width=256, stack_depth=4, matrix_heads=2)),
    eval_iters=40,
)


def scaling_rows(best_lr, vocab, second, field=()):
    """The runs, most telling first: one seed of each model on Tiny Shakespeare, the larger size, the
    second seed, the second text, then the field's models named in `field` (both seeds, Tiny Shakespeare)."""
    length, size = SCALING["length"], SCALING["size"]
    small, _ = compared_models(IMPROVEMENT_SCALES["quick"], vocab["shakespeare"])
    large, large_target = compared_models(size["scale"], vocab["shakespeare"])
    second_models, _ = compared_models(IMPROVEMENT_SCALES["quick"], vocab[second])
    row = lambda name, flags, data, seed, axis: scaling_row(name, flags, best_lr, data, seed, axis)  # noqa: E731
    rows = [row(m, small[m], "shakespeare", 1337, "length") for m in length["models"]]
    rows += [row(m, large[m], "shakespeare", 1337, "size") for m in size["models"]]
    rows += [row(m, small[m], "shakespeare", 2, "length") for m in length["models"]]
    rows += [row(m, second_models[m], second, 1337, "length") for m in length["models"]]
    if field:
        field_models, _ = compared_models(IMPROVEMENT_SCALES["quick"], vocab["shakespeare"], field=True)
        rows += [row(m, field_models[m], "shakespeare", seed, "length") for m in field for seed in (1337, SECOND_SEED)]
    return rows, large_target


def scaling_row(name, flags, best_lr, data, seed, axis):
    """One model's run on one axis (flags: the model's), at its swept rate; the study's common flags come apart."""
    label = f"{name}, {axis}, {'Tiny Shakespeare' if data == 'shakespeare' else Path(data).name}, seed {seed}"
    return Row(label, [*flags, "--lr", f"{best_lr[name]:g}", "--max-iters", str(SCALING[axis]["steps"]),
                       "--eval-interval", str(SCALING[axis]["eval_every"]), "--data", data, "--seed", str(seed)],
               group=f"{name}, {axis}, {data}", extra={"model": name, "axis": axis, "data": data, "seed": seed})


def scaling_common_flags():
    """The flags every run of the scaling study shares."""
    return ["--block-size", "128", "--batch-size", "32", "--dropout", "0.1", "--eval-iters", str(SCALING["eval_iters"])]


def second_text(args, study):
    """--second-data, checked: the small text of the scaling and regularisation studies."""
    if not Path(args.second_data).is_file():
        raise UserError(f"the {study} study's second text {args.second_data} does not exist: pass --second-data PATH "
                        "(the results used lcet10.txt from the Canterbury corpus: results/README.md says where to "
                        "get it)")
    return args.second_data


def study_scaling(args, device):
    second = second_text(args, "scaling")
    best_lr = tuned_rates()
    vocab = {data: load_dataset(data, "char", block_size=128).tokenizer.vocab_size for data in ("shakespeare", second)}
    field = [m for m in SCALING["length"]["field"] if m in swept_models()]
    rows, large_target = scaling_rows(best_lr, vocab, second, field)
    kept, started = kept_rows("scaling")
    common = [*scaling_common_flags(), "--device", args.device]

    def write(summaries):
        write_scaling(summaries, rows, best_lr, large_target, device, started, second)

    write(run_rows("scaling", "quick", rows, common, kept, write))


def gap_curve(attention_free, transformer):
    """(tokens, relative gap in %) where both runs were evaluated: negative = the attention-free model is lower."""
    theirs = {p["tokens"]: p["val_loss"] for p in transformer}
    return [(p["tokens"], 100 * (p["val_loss"] - theirs[p["tokens"]]) / theirs[p["tokens"]])
            for p in attention_free if p["tokens"] in theirs and p["tokens"] > 0]


def crossing(gaps):
    """Tokens where the gap first changes sign (the curves cross), interpolated between evaluations, or None."""
    for (t0, g0), (t1, g1) in zip(gaps, gaps[1:]):
        if g0 * g1 < 0:
            return t0 + (t1 - t0) * g0 / (g0 - g1)
    return None


def write_scaling(summaries, rows, best_lr, large_target, device, started, second):
    done = {s["name"]: s for s in summaries}
    lines = ["# Does the lead hold? Longer training and a larger size\n",
             header("scaling", "quick", device, "shakespeare", started, runs=summaries,
                    command="python experiments.py scaling", extra=(
                    f"Every model at its best learning rate from results/lr-sweep.md ("
                    + ", ".join(f"{m} {lr:g}" for m, lr in best_lr.items()) + "); batches of 32 x 128 characters, "
                    f"dropout 0.1, cosine decay over the whole run, validation on {SCALING['eval_iters']} fixed batches "
                    f"every {SCALING['length']['eval_every']} steps (1.02M tokens). Second text: `{second}`.")),
             "| run | params | tokens | best val loss | at tokens | last val loss | train loss at the end | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = done.get(row.name)
        if s is None:
            lines.append(f"| {row.name} | | not run yet | | | | | |")
            continue
        best = min(s["curve"], key=lambda p: p["val_loss"])
        lines.append(f"| {row.name} | {s['params']:,} | {s['tokens']:,} | {s['best_val_loss']:.4f} | "
                     f"{best['tokens'] / 1e6:.1f}M | {s['curve'][-1]['val_loss']:.4f} | "
                     f"{s['curve'][-1]['train_loss']:.4f} | {s['wall_s'] / 60:.0f} min |")
    lines += scaling_readings(done, rows)
    noise = evaluation_noise(done, rows, device) or committed_noise()
    lines += noise_readings(noise)
    figure = RESULTS / "scaling.png"
    plot_scaling(done, rows, figure)
    lines.append("\n![scaling](scaling.png)\n")
    write_results("scaling", "\n".join(lines) + "\n", {"started": started, "best_lr": best_lr,
                                                       "large_target_params": large_target, "rows": summaries,
                                                       "evaluation_noise": noise},
                  [figure])


def groups(done, rows):
    """(axis, data, model) -> the finished runs of that configuration (one per seed)."""
    out = {}
    for row in rows:
        if row.name in done:
            e = row.extra
            out.setdefault((e["axis"], e["data"], e["model"]), []).append(done[row.name])
    return out


def scaling_readings(done, rows):
    """What the finished runs say: best losses with their seed spread, the gap, and where the curves cross."""
    lines = ["\nMean ± half-range over the seeds that have finished (the number of seeds in brackets):\n"]
    by = groups(done, rows)
    for (axis, data, model), runs in by.items():
        mean, spread = mean_spread([s["best_val_loss"] for s in runs])
        reference = by.get((axis, data, "Transformer"))
        gap = ""
        if model != "Transformer" and reference:
            ref_mean, _ = mean_spread([s["best_val_loss"] for s in reference])
            gap = f", {100 * (mean - ref_mean) / ref_mean:+.1f}% vs the Transformer"
            cross = [crossing(gap_curve(a["curve"], t["curve"])) for a, t in zip(runs, reference)]
            gap += "; the validation curves (each against the same seed's Transformer) " + (
                "never cross" if not any(cross) else "cross " + ", ".join(
                    (f"near {c / 1e6:.1f}M tokens" if c else "never") + f" in seed {a['extra']['seed']}"
                    for c, a in zip(cross, runs)))
        label = "Tiny Shakespeare" if data == "shakespeare" else Path(data).name
        lines.append(f"- {axis} axis, {label}, {model}: best val loss {mean:.4f} ± {spread:.4f} ({len(runs)}){gap}")
    return lines


def evaluation_noise(done, rows, device, data="shakespeare"):
    """How large a gap the choice of validation batches alone could make. For each seed of the length axis on
    Tiny Shakespeare: every model's best checkpoint, batch by batch on that seed's fixed validation batches,
    read as a sample. Returns the standard error of the Transformer's mean loss and of each attention-free
    model's mean difference from it (both on the same batches), beside that difference; [] without the
    run folders (a checkout holding only results/)."""
    by, noise = groups(done, rows), []
    for model in SCALING["length"]["models"][1:]:
        for run, theirs in zip(by.get(("length", data, model), []), by.get(("length", data, "Transformer"), [])):
            paths = [Path(r["out_dir"]) / "ckpt.pt" for r in (theirs, run)]
            if not all(path.is_file() for path in paths):
                continue
            reference, attention_free = (batch_losses(path, r, device) for path, r in zip(paths, (theirs, run)))
            difference = attention_free - reference
            noise.append({"model": model, "seed": run["extra"]["seed"], "batches": len(reference),
                          "transformer_se": standard_error(reference), "difference_se": standard_error(difference),
                          "difference": difference.mean().item()})
    return noise


def batch_losses(path, run, device):
    """A checkpoint's validation loss on each of the fixed batches its run was evaluated on (train.py's)."""
    args = train.parse_args(run["flags"])  # the run's settings, read as train.py read them
    model = model_from_checkpoint(load_checkpoint(path)).to(device).eval()
    dataset = load_dataset(args.data, args.tokenizer, args.vocab_size, args.block_size, args.sentences, args.seed)
    batches = dataset.eval_batches("val", args.batch_size, args.eval_iters)
    with torch.no_grad():
        return torch.tensor([model(x.to(device), y.to(device))[1].item() for x, y in batches])


def standard_error(values):
    return (values.std() / len(values) ** 0.5).item()


def committed_noise():
    """The noise measured when the run folders were last at hand (results/scaling.json), if any."""
    return committed_results("scaling").get("evaluation_noise", [])


def noise_readings(noise):
    if not noise:
        return []
    lines = ["\nHow much the choice of validation batches could move a gap: each model's best checkpoint, "
             "batch by batch on its seed's fixed batches, read as a sample (standard errors):\n"]
    for n in noise:
        lines.append(f"- seed {n['seed']}, {n['model']}: the Transformer's mean loss ± {n['transformer_se']:.4f}; "
                     f"the {n['model']}'s difference from it {n['difference']:+.4f} ± {n['difference_se']:.4f} "
                     f"({n['batches']} batches)")
    return lines


def plot_scaling(done, rows, path):
    """Validation loss against tokens per configuration (seeds averaged), and each attention-free model's gap."""
    by = groups(done, rows)
    fig, (losses, gaps) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {("length", "shakespeare"): "-", ("size", "shakespeare"): ":"}
    models = list(dict.fromkeys(key[2] for key in by))
    for (axis, data, model), runs in by.items():
        style = styles.get((axis, data), "--")
        label = f"{model}, {'3M params' if axis == 'size' else '0.8M'}" + \
            ("" if data == "shakespeare" else f", {Path(data).stem}")
        color = colors[models.index(model) % len(colors)]
        tokens = [p["tokens"] / 1e6 for p in runs[0]["curve"] if p["tokens"] > 0]
        mean = [sum(r["curve"][i]["val_loss"] for r in runs) / len(runs) for i in range(1, len(tokens) + 1)]
        losses.plot(tokens, mean, style, color=color, label=label)
        reference = by.get((axis, data, "Transformer"))
        if model != "Transformer" and reference:
            for seed, (run, theirs) in enumerate(zip(runs, reference)):  # each seed against the same seed's
                gap = gap_curve(run["curve"], theirs["curve"])
                gaps.plot([t / 1e6 for t, _ in gap], [g for _, g in gap], style, color=color,
                          label=label if seed == 0 else None, alpha=1.0 if seed == 0 else 0.55)
    gaps.axhline(0, color="gray", lw=1)
    losses.set_ylabel("validation loss (nats/char)")
    gaps.set_ylabel("gap to the Transformer (%): below 0 = attention-free lower")
    for ax, title in ((losses, "validation loss as training grows (mean over seeds)"),
                      (gaps, "the gap, each seed against the same seed (paler: seed 2)")):
        ax.set_xlabel("training tokens (millions)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    low = min((min(p["val_loss"] for p in runs[0]["curve"]) for runs in by.values()), default=1.0)
    losses.set_ylim(low - 0.05, low + 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
