"""
Does the Transformer win on a small text only because every model was regularised alike? Run through
experiments.py:

    python experiments.py regularisation     # lcet10 (--second-data), 3 models x 4 settings, then second seeds

On lcet10 (384k training characters) the scaling study's attention-free models lead early, then
learn the text by heart, and the Transformer ends 4% below them; all three ran at dropout 0.1 and
weight decay 0.1, tuned in the learning rate only. Here each model (the scaling study's three, at
their best learning rates on Tiny Shakespeare, results/lr-sweep.json) is trained a little past where
those curves crossed (6.6M to 6.8M tokens), to 8.2M tokens, at dropout 0.1, 0.2 and 0.3 and at one
larger weight decay; then each model's best setting again with a second seed. The question: at each
model's own best regularisation, does the Transformer still win?
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from data import load_dataset
from experiments import (IMPROVEMENT_SCALES, RESULTS, Row, header, kept_rows, mean_spread, results_name, run_rows,
                         write_results)
from scaling import compared_models, second_text, tuned_rates

MODELS = ("Transformer", "vector stack", "context matrix")
SETTINGS = {  # name -> (dropout, weight decay); the first is the improvements, lr-sweep and scaling studies' own
    "dropout 0.1": (0.1, 0.1), "dropout 0.2": (0.2, 0.1), "dropout 0.3": (0.3, 0.1),
    "weight decay 0.5": (0.1, 0.5)}
STEPS, EVAL_EVERY, EVAL_ITERS = 2000, 250, 40  # 2,000 steps of 32 x 128 = 8.2M tokens, as the scaling study's batches
SEEDS = (1337, 2)


def regularisation_rows(models, best_lr, data, settings=SETTINGS, seed=SEEDS[0]):
    """Every model at every setting, at its best learning rate; settings: name -> (dropout, weight decay)."""
    return [Row(f"{model}, {setting}, seed {seed}",
                [*models[model], "--lr", f"{best_lr[model]:g}", "--max-iters", str(STEPS), "--eval-interval",
                 str(EVAL_EVERY), "--data", data, "--dropout", f"{dropout:g}", "--weight-decay", f"{decay:g}",
                 "--seed", str(seed)],
                group=f"{model}, {setting}", extra={"model": model, "setting": setting, "seed": seed})
            for model in models for setting, (dropout, decay) in settings.items()]


def best_settings(summaries):
    """model -> its setting with the lowest best validation loss, over the first seed's runs, for the models
    whose every setting has run (until then a model has no best)."""
    best, done = {}, {}
    for s in summaries:
        model, loss = s["extra"]["model"], s["best_val_loss"]
        if s["extra"]["seed"] == SEEDS[0]:
            done[model] = done.get(model, 0) + 1
            if model not in best or loss < best[model][1]:
                best[model] = (s["extra"]["setting"], loss)
    return {model: setting for model, (setting, _) in best.items() if done[model] == len(SETTINGS)}


def study_regularisation(args, device):
    data = second_text(args, "regularisation")
    best_lr = tuned_rates()
    vocab = load_dataset(data, "char", block_size=128).tokenizer.vocab_size
    all_models, _ = compared_models(IMPROVEMENT_SCALES["quick"], vocab)
    models = {name: all_models[name] for name in MODELS}
    name = "regularisation" if Path(data).name == "lcet10.txt" else results_name("regularisation", data)
    kept, started = kept_rows(name)
    common = ["--block-size", "128", "--batch-size", "32", "--eval-iters", str(EVAL_ITERS), "--device", args.device]
    rows = regularisation_rows(models, best_lr, data)

    def write(summaries):
        write_regularisation(name, summaries, best_lr, data, device, started)

    summaries = run_rows(name, "quick", rows, common, kept, write)
    best = best_settings(summaries)  # then each model's best setting with the second seed
    rows += [row for model, setting in best.items()
             for row in regularisation_rows({model: models[model]}, best_lr, data, {setting: SETTINGS[setting]},
                                            seed=SEEDS[1])]
    write(run_rows(name, "quick", rows, common, kept, write))


def write_regularisation(name, summaries, best_lr, data, device, started):
    cell = {(s["extra"]["model"], s["extra"]["setting"], s["extra"]["seed"]): s for s in summaries}
    best = best_settings(summaries)
    tokens = max(s["tokens"] for s in summaries)
    command = "python experiments.py regularisation" + ("" if name == "regularisation" else f" --second-data {data}")
    lines = ["# Regularisation on a small text: each model at its own best\n",
             header(name, "quick", device, data, started, command=command,
                    extra=f"Every run: {tokens:,} training tokens ({STEPS:,} steps of 32 x 128), each model at its "
                          "best learning rate on Tiny Shakespeare (results/lr-sweep.md: "
                          + ", ".join(f"{m} {best_lr[m]:g}" for m in MODELS) + "), cosine decay over the run, "
                          f"validation on {EVAL_ITERS} fixed batches every {EVAL_EVERY} steps; only dropout and "
                          "weight decay change (the first column is the improvements, lr-sweep and scaling "
                          "studies' setting). Best validation loss, and in brackets the training loss at the end; "
                          "bold: each model's best, once all its settings have run. In the scaling study's "
                          "20M-token run on this text the Transformer's best came later (14.3M tokens): the "
                          "verdict below is at 8.2M."),
             "| model | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for model in MODELS:
        cells = []
        for setting in SETTINGS:
            s = cell.get((model, setting, SEEDS[0]))
            text = f"{s['best_val_loss']:.4f} ({s['curve'][-1]['train_loss']:.2f})" if s else "not run yet"
            cells.append(f"**{text}**" if s and best.get(model) == setting else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += verdict(cell, best)
    figure = RESULTS / f"{name}.png"
    plot_regularisation(cell, best, figure)
    lines.append(f"\n![regularisation]({name}.png)\n")
    write_results(name, "\n".join(lines) + "\n",
                  {"started": started, "best_lr": best_lr, "data": data, "rows": summaries}, [figure])


def verdict(cell, best):
    """Each model at its best setting, both seeds, against the Transformer at its own best."""
    if not best:
        return ["\nEach model's best setting again with a second seed: once its four settings have run."]
    lines = [f"\nEach model's best setting, seeds {SEEDS[0]} and {SEEDS[1]} (mean ± half-range):\n",
             "| model | best setting | per seed | mean | vs Transformer |", "|---|---|---|---|---|"]
    means = {}
    for model, setting in best.items():
        losses = [cell[(model, setting, seed)]["best_val_loss"] for seed in SEEDS if (model, setting, seed) in cell]
        means[model] = mean_spread(losses)
    reference = means.get("Transformer")
    for model, (mean, spread) in means.items():
        seeds = " / ".join(f"{cell[(model, best[model], s)]['best_val_loss']:.4f}" for s in SEEDS
                           if (model, best[model], s) in cell)
        gap = f"{100 * (mean - reference[0]) / reference[0]:+.1f}%" if reference and model != "Transformer" else ""
        lines.append(f"| {model} | {best[model]} | {seeds} | {mean:.4f} ± {spread:.4f} | {gap} |")
    complete = all((m, best.get(m), s) in cell for m in MODELS for s in SEEDS)
    if not complete:
        return lines + ["\nNot every model has both seeds at its best setting yet: no verdict."]
    lowest = min(means, key=lambda m: means[m][0])
    rivals = [m for m in MODELS if m != lowest]
    apart = all(means[m][0] - means[m][1] > means[lowest][0] + means[lowest][1] for m in rivals)
    if not apart:
        return lines + [f"\nAt each model's own best regularisation no model is clear of the others: the lowest "
                        f"mean, the {lowest}'s ({means[lowest][0]:.4f}), is within the seed spread of another's."]
    winner = "the Transformer still wins" if lowest == "Transformer" else "the Transformer no longer wins"
    return lines + [f"\nAt each model's own best regularisation {winner}: the lowest is the {lowest} "
                    f"({means[lowest][0]:.4f}), its seeds' range clear of every other model's."]


def plot_regularisation(cell, best, path):
    """Left: best validation loss at each setting, a line per model. Right: each model's validation curve at
    dropout 0.1 (dotted) and at its best setting (solid), first seed."""
    fig, (by_setting, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(MODELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    names = list(SETTINGS)
    for model in MODELS:
        points = [(i, cell[(model, s, SEEDS[0])]["best_val_loss"]) for i, s in enumerate(names)
                  if (model, s, SEEDS[0]) in cell]
        if points:
            by_setting.plot(*zip(*points), "o-", color=colors[model], label=model)
        styles = {names[0]: ":", **({best[model]: "-"} if model in best else {})}  # the best drawn once, solid
        for setting, style in styles.items():
            s = cell.get((model, setting, SEEDS[0]))
            if s:
                curve = [p for p in s["curve"] if p["tokens"] > 0]
                curves.plot([p["tokens"] / 1e6 for p in curve], [p["val_loss"] for p in curve], style,
                            color=colors[model], label=f"{model}, {setting}")
    by_setting.set_xticks(range(len(names)), names)
    by_setting.set_ylabel("best validation loss (nats/char)")
    curves.set_xlabel("training tokens (millions)")
    curves.set_ylabel("validation loss (nats/char)")
    for ax in (by_setting, curves):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Regularisation on a small text: does the Transformer still win when each model has its own?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
