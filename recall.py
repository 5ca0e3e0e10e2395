"""
Can a fixed-size memory look a fact up? The associative-recall study, run through experiments.py:

    python experiments.py recall [--budget quick|full]      # results/recall.md, .json and .png

Sequences of key-value pairs, then queries of the keys (data.RecallTask): every model is trained on a mix of
pair counts, then asked fresh sequences with exactly each count, and its generation state is counted number
by number. The Transformer's KV cache is the yardstick; the report's model, the vector stack and the hybrid
run at growing context sizes, the context matrix with the same parameters split into fewer, larger heads
(a growing state), and with keys wider than its values; the field's fixed states beside them, an LSTM at
growing hidden sizes and Mamba at N = 4, 16, 64 state numbers per channel, each at three learning rates.
A model that has not left the task's first plateau says nothing about its memory, so the page also gives
each shape at its best learning rate (as Zoology reports its recall task).
"""

from contextlib import nullcontext
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

import train
from run_folder import load_checkpoint
from data import RecallTask
from experiments import RESULTS, Row, header, kept_rows, run_rows, write_results
from models import model_from_checkpoint, state_size


RECALL_BUDGETS = {
    # quick: sequences of 64 tokens holding 1-16 pairs, 1,500 steps of 32 sequences per model; afterwards the
    # models without a position table also answer longer sequences with more pairs than they were trained on
    "quick": dict(pairs=[1, 2, 4, 8, 16], block=64, vocab=64, steps=1500, lr="2e-3", width=64,
                  sizes=[32, 64, 128, 256, 512],
                  default_size=64, matrix_heads=[16, 8, 4, 2, 1], default_heads=2, window=8,
                  longer=[(128, 24), (256, 31)],
                  # the default matrix again with a second seed; one a little narrower (2 x 30x30), whose
                  # state with the conv windows (3,984 numbers) fits in a quarter of the KV cache (4,096); and
                  # keys wider than values (2 x 24x32: 3,456 numbers; 2 x 16x32: 2,432; 2 x 20x40: 3,584;
                  # 2 x 28x32: 3,968)
                  more_matrices=[dict(width=64, heads=2, seed=2), dict(width=60, heads=2, seed=1337),
                                 dict(width=48, heads=2, key=32, seed=1337), dict(width=32, heads=2, key=32, seed=1337),
                                 dict(width=48, heads=2, key=32, seed=2), dict(width=48, heads=2, key=32, seed=3),
                                 *(dict(width=40, heads=2, key=40, seed=seed) for seed in (1337, 2, 3)),
                                 *(dict(width=56, heads=2, key=32, seed=seed) for seed in (1337, 2, 3))],
                  # the same runs learn faster at a higher rate (every one above is still improving at its last
                  # step): each vector model at two sizes and the matrix series again at 4e-3 and 8e-3 (three rates
                  # in all), and the narrow shapes in three seeds
                  faster=[dict(lr="4e-3", sizes=[64, 512],
                               matrices=[*(dict(width=48, heads=2, key=32, seed=seed) for seed in (1337, 2, 3)),
                                         *(dict(width=64, heads=heads, seed=1337) for heads in (16, 8, 4, 2, 1))]),
                          dict(lr="8e-3", sizes=[64, 512],
                               matrices=[*(dict(width=64, heads=heads, seed=1337) for heads in (16, 8, 4, 2, 1)),
                                         *(dict(width=w, heads=2, key=32, seed=seed)
                                           for w in (16, 32, 48) for seed in (1337, 2, 3))])],
                  # the LSTM (hidden sizes) and Mamba (state numbers per channel, at the default width), each rate
                  field=dict(rates=["2e-3", "4e-3", "8e-3"], lstm_hidden=[32, 64, 128, 256], mamba_states=[4, 16, 64])),
    # full: 256 tokens holding 4-64 pairs; 5,000 steps
    "full": dict(pairs=[4, 8, 16, 32, 64], block=256, vocab=256, steps=5000, lr="2e-3", width=128,
                 sizes=[32, 64, 128, 256, 512, 1024], default_size=128, matrix_heads=[32, 16, 8, 4, 2], default_heads=4,
                 window=16, longer=[(512, 96), (1024, 127)], more_matrices=[dict(width=128, heads=4, seed=2)],
                 faster=[], field=dict(rates=["1e-3", "2e-3", "4e-3"], lstm_hidden=[64, 128, 256, 512],
                                       mamba_states=[4, 16, 64])),
}


def recall_rows(budget):
    """The Transformer; the report's model, the vector stack and the hybrid at growing context sizes; the
    context matrix at one width with fewer, larger heads (the same parameters, a growing state)."""
    common_model = ["--embed-dim", str(budget["width"]), "--dropout", "0.0"]
    rows = [Row("Transformer", ["--arch", "transformer", *common_model, "--heads", "4", "--layers", "2",
                                "--init", "torch"], extra={"model": "Transformer", "size": "—", "default": True})]
    for model, flags in vector_models(budget).items():
        rows += [vector_row(budget, model, flags, size) for size in budget["sizes"]]
    series = [dict(width=budget["width"], heads=heads, seed=1337) for heads in budget["matrix_heads"]]
    default = series[budget["matrix_heads"].index(budget["default_heads"])]
    return rows + [matrix_row(budget, "context matrix", m, m in series, m == default)
                   for m in series + budget["more_matrices"]]


def vector_models(budget):
    """The models whose state is one vector, by name: their flags but the context size."""
    return {"seed New-LLM": ["--arch", "newllm", "--embed-dim", str(budget["width"]), "--dropout", "0.0", "--layers",
                             "2", "--hidden-dim", str(2 * budget["width"])],
            "vector stack": stack_flags(budget),
            "hybrid (local window)": [*stack_flags(budget), "--local-window", str(budget["window"]), "--heads", "4"]}


def faster_recall_rows(budget, lr, sizes, matrices):
    """The vector models and the context matrix again, trained at learning rate lr."""
    rows = [vector_row(budget, f"{model}, lr {lr}", flags, size)
            for model, flags in vector_models(budget).items() for size in sizes]
    default = next((m for m in matrices if m["width"] == budget["width"] and m["heads"] == budget["default_heads"]),
                   matrices[0])
    return rows + [matrix_row(budget, f"context matrix, lr {lr}", m, m["width"] == budget["width"], m == default)
                   for m in matrices]


def field_recall_rows(budget, lr):
    """The LSTM at growing hidden sizes and Mamba at growing state sizes, trained at learning rate lr."""
    named = lambda model: model if lr == budget["lr"] else f"{model}, lr {lr}"  # noqa: E731
    width, field = str(budget["width"]), budget["field"]
    lstm = ["--arch", "lstm", "--embed-dim", width, "--layers", "2", "--dropout", "0.0"]
    rows = [Row(f"{named('LSTM')}, hidden {h}", [*lstm, "--hidden-dim", str(h)],
                extra={"model": named("LSTM"), "size": f"hidden {h}", "default": h == budget["width"]})
            for h in field["lstm_hidden"]]
    return rows + [Row(f"{named('Mamba')}, N {n}", [*stack_flags(budget, "mamba"), "--context-dim", width,
                                                    "--state-dim", str(n)],
                       extra={"model": named("Mamba"), "size": f"N {n}", "default": n == 16})
                   for n in field["mamba_states"]]


def stack_flags(budget, mixer="vector"):
    """The improvements study's best stack, two blocks, with either memory."""
    return ["--arch", "stack", "--embed-dim", str(budget["width"]), "--dropout", "0.0", "--layers", "2", "--gate",
            "--short-conv", "4", "--context-norm", "--no-pos-embed", "--hidden-dim", str(2 * budget["width"]),
            "--mixer", mixer]


def vector_row(budget, model, flags, size):
    return Row(f"{model}, context {size}", [*flags, "--context-dim", str(size)],
               extra={"model": model, "size": f"{size}", "default": size == budget["default_size"]})


def matrix_row(budget, model, m, series, default):
    """m: the mixer's width (nh * dv), heads, key width (dv when absent) and seed. series: on the line of
    one width with fewer, larger heads (other rows are hollow dots); default: the one shown against pairs."""
    dv, seed = m["width"] // m["heads"], f" (seed {m['seed']})" if m["seed"] != 1337 else ""
    dk = m.get("key", dv)
    keys = ["--key-dim", str(dk)] if "key" in m else []
    shape = f" of {dv}x{dk}" if m["width"] != budget["width"] else ""
    flags = [*stack_flags(budget, "matrix"), "--context-dim", str(m["width"]), "--context-heads",
             str(m["heads"]), *keys, "--seed", str(m["seed"])]
    return Row(f"{model}, {m['heads']} heads{shape}{seed}", flags,
               extra={"model": model, "size": f"{m['heads']} x {dv}x{dk}{seed}", "shape": f"{m['heads']} x {dv}x{dk}",
                      "series": series, "default": default})


def load_model(run_dir, device):
    return model_from_checkpoint(load_checkpoint(Path(run_dir) / "ckpt.pt")).to(device).eval()


def recall_accuracy(model, num_pairs, vocab, length, device, sequences=512):
    """Accuracy on the answer positions of fresh sequences of `length` tokens with exactly num_pairs pairs."""
    task = RecallTask(vocab, num_pairs, length, length, seed=99)
    batches = {"val": task.eval_batches("val", 64, sequences // 64)}
    return train.estimate_loss(model, batches, device, nullcontext())["val_acc"]


@torch.no_grad()
def state_floats(model, length, device):
    """Numbers in the generation state after `length` tokens."""
    state = model.init_state(1, device)
    for _ in range(length):
        _, state = model.step(torch.zeros(1, dtype=torch.long, device=device), state)
    return state_size(state)


def cost(row):
    """The field's rows from quickest to slowest to train: the LSTM's (a minute), Mamba's, Mamba's widest state."""
    return 0 if row.extra["model"].startswith("LSTM") else 2 if row.extra["size"] == "N 64" else 1


def study_recall(args, device):
    budget = RECALL_BUDGETS[args.budget]
    def common(lr):
        return ["--data", "recall", "--recall-vocab", str(budget["vocab"]), "--recall-pairs",
                ",".join(map(str, budget["pairs"])), "--recall-queries", str(budget["block"]), "--block-size",
                str(budget["block"]), "--batch-size", "32", "--max-iters", str(budget["steps"]), "--lr", lr,
                "--eval-interval", str(budget["steps"] // 5), "--eval-iters", "8", "--device", args.device]
    kept, started = kept_rows("recall")  # rows finished on another machine keep their committed measurements
    groups = [(recall_rows(budget), budget["lr"])]
    groups += [(faster_recall_rows(budget, **faster), faster["lr"]) for faster in budget["faster"]]
    field = [([row], lr) for lr in budget["field"]["rates"] for row in field_recall_rows(budget, lr)]
    groups += sorted(field, key=lambda group: cost(group[0][0]))  # the cheapest rows first, each at every rate
    finished = []

    def write(summaries):
        """Measure what is new, then write the page with every row finished so far."""
        for s in summaries:  # kept rows come back from JSON, which keys the pair counts by text
            s["accuracy"] = {int(n): accuracy for n, accuracy in s.get("accuracy", {}).items()}
        for s in tqdm([s for s in summaries if not s["accuracy"]], desc="measuring recall", unit="model"):
            model = load_model(s["out_dir"], device)
            s["accuracy"] = {n: recall_accuracy(model, n, budget["vocab"], budget["block"], device)
                             for n in budget["pairs"]}
            s["longer"] = {f"{n} pairs in {length}": recall_accuracy(model, n, budget["vocab"], length, device)
                           for length, n in budget["longer"] if model.max_len is None}
            s["state_floats"] = state_floats(model, budget["block"], device)
        lines = recall_table(summaries, budget, args.budget, device, started)
        figure = RESULTS / "recall.png"
        plot_recall(summaries, budget, figure)
        write_results("recall", "\n".join(lines) + "\n", {"budget": args.budget, "started": started, "rows": summaries},
                      [figure])

    def finished_in(later_groups):
        return [s for rows, lr in later_groups for s in run_rows("recall", args.budget, rows, common(lr), kept,
                                                                 train_new=False)]

    for at, (rows, lr) in enumerate(groups):  # each new row measured and written as it lands, beside every
        # row finished so far, later groups' included (a study stopped and resumed keeps them on its page)
        finished += run_rows("recall", args.budget, rows, common(lr), kept,
                             after_each=lambda batch: write(finished + batch + finished_in(groups[at + 1:])))
    write(finished)


def recall_table(summaries, budget, budget_name, device, started):
    """The markdown page: the table, then what reaches 90% and 99% at the hardest count with how much state."""
    longer = [f"{n} pairs in {length}" for length, n in budget["longer"]]
    hardest, kv_cache = max(budget["pairs"]), summaries[0]["state_floats"]
    lines = [f"# Associative recall against facts and state size ({budget_name})\n",
             header("recall", budget_name, device, "recall", started, runs=summaries, extra=
                    f"Sequences of {budget['block']} tokens, vocabulary {budget['vocab']}, trained on a mix of "
                    f"{'/'.join(map(str, budget['pairs']))} key-value pairs, {budget['steps']:,} steps of 32 "
                    f"sequences at learning rate {budget['lr']} (or the rate in the model's name); accuracy on 512 "
                    "fresh sequences per pair count (chance: 1 in "
                    f"{budget['vocab'] // 2}). The last columns ask longer sequences with more pairs than training "
                    "had, of the models without a position table."),
             "| model | context | state (numbers) | params | " + " | ".join(f"{n} pairs" for n in budget["pairs"])
             + " | " + " | ".join(longer) + " |", "|---|---|---|---|" + "---|" * (len(budget["pairs"]) + len(longer))]
    for s in summaries:
        accuracies = " | ".join(f"{100 * s['accuracy'][n]:.1f}%" for n in budget["pairs"])
        beyond = " | ".join(f"{100 * s['longer'][k]:.1f}%" if k in s["longer"] else "—" for k in longer)
        lines.append(f"| {s['extra']['model']} | {s['extra']['size']} | {s['state_floats']:,} | {s['params']:,} | "
                     f"{accuracies} | {beyond} |")
    lines.append("\nState: every number a model carries from one token to the next after the whole sequence "
                 "(the Transformer's KV cache grows with the length; the others do not). Context: the vector's size, "
                 "or the matrix mixer's heads x (value x key width) per block.\n")
    lines.append(f"Smallest state reaching 90% and 99% at {hardest} pairs (the Transformer's KV cache there: "
                 f"{kv_cache:,} numbers):\n")
    for model in dict.fromkeys(s["extra"]["model"] for s in summaries):
        seeds = {}  # (state, shape) -> accuracy at the hardest count, one per seed
        for s in summaries:
            if s["extra"]["model"] == model:
                shape = s["extra"].get("shape", s["extra"]["size"])
                seeds.setdefault((s["state_floats"], shape), []).append(s["accuracy"][hardest])
        for bar in (0.90, 0.99):
            # the smallest shape past the bar in every seed (the most seeds first, at equal state), and a smaller
            # one past it in some seeds only
            every = sorted((state, -len(accs), shape) for (state, shape), accs in seeds.items() if min(accs) >= bar)
            some = sorted((state, sum(a >= bar for a in accs), len(accs))
                          for (state, _), accs in seeds.items() if max(accs) >= bar and min(accs) < bar)
            best = max(max(accs) for accs in seeds.values())
            line = f"- {model}, {100 * bar:.0f}%: " + ("not reached in every seed" if some else
                                                       f"not reached (best {100 * best:.2f}%)")
            if every:
                state, runs, shape = every[0]
                line = (f"- {model}, {100 * bar:.0f}%: {state:,} numbers ({state / kv_cache:.2f} of the KV cache"
                        f"{', ' + shape if shape != '—' else ''}) in {seed_count(-runs)}")
            if some and (not every or some[0][0] < every[0][0]):
                state, hits, runs = some[0]
                line += f"; {state:,} ({state / kv_cache:.2f}) in {hits} of {runs} seeds"
            lines.append(line)
    lines += best_rate_table(summaries, budget)
    lines.append("\n![recall](recall.png)\n")
    return lines


def best_rate_table(summaries, budget):
    """Every shape trained at more than one learning rate: its accuracy at the hardest count at each rate, and
    the best. (Zoology reports its recall task at each model's best rate: a run still on the task's first
    plateau says nothing about the memory.)"""
    hardest, rates = max(budget["pairs"]), {}
    for s in summaries:
        family, _, lr = s["extra"]["model"].partition(", lr ")
        shape = (family, s["extra"]["size"], s["state_floats"])
        rates.setdefault(shape, {})[lr or budget["lr"]] = s["accuracy"][hardest]
    tried = {shape: by_rate for shape, by_rate in rates.items() if len(by_rate) > 1}
    if not tried:
        return []
    lines = [f"\nAt each shape's best learning rate ({hardest} pairs; the shapes trained at more than one rate; "
             f"every other one at {budget['lr']} only):\n",
             "| model | context | state (numbers) | accuracy by learning rate | best |", "|---|---|---|---|---|"]
    for (family, size, state), by_rate in tried.items():
        best = max(by_rate, key=by_rate.get)
        by = ", ".join(f"{lr}: {100 * acc:.1f}%" for lr, acc in sorted(by_rate.items(), key=lambda x: float(x[0])))
        lines.append(f"| {family} | {size} | {state:,} | {by} | {100 * by_rate[best]:.1f}% ({best}) |")
    return lines


def seed_count(runs):
    return {1: "its one seed", 2: "both seeds"}.get(runs, f"all {runs} seeds")


def plot_recall(summaries, budget, path):
    fig, (by_pairs, by_state) = plt.subplots(1, 2, figsize=(16, 4.8))
    hardest = max(budget["pairs"])
    models = dict.fromkeys(s["extra"]["model"] for s in summaries)
    # one colour per model, one marker per learning rate (circles: the budget's own), dashed lines for the faster
    families = list(dict.fromkeys(model.partition(", lr ")[0] for model in models))
    rates = list(dict.fromkeys(["", *(faster["lr"] for faster in budget["faster"]),
                                *(lr for lr in budget["field"]["rates"] if lr != budget["lr"])]))
    for model in models:
        family, _, lr = model.partition(", lr ")
        color = plt.rcParams["axes.prop_cycle"].by_key()["color"][families.index(family)]
        marker, line = "o^sD"[rates.index(lr)], "--" if lr else "-"
        runs = sorted((s for s in summaries if s["extra"]["model"] == model), key=lambda s: s["state_floats"])
        shown = next((s for s in runs if s["extra"]["default"]), runs[0])  # a study cut short may lack the default
        size = f" ({shown['extra']['size']})" if shown["extra"]["size"] != "—" else ""
        by_pairs.plot(budget["pairs"], [100 * shown["accuracy"][n] for n in budget["pairs"]], marker=marker,
                      linestyle=line, color=color, label=model + size)
        series = [s for s in runs if s["extra"].get("series", True)]  # one shape each; the others: hollow dots
        others = [s for s in runs if s not in series]
        if series:
            by_state.plot([s["state_floats"] for s in series], [100 * s["accuracy"][hardest] for s in series],
                          marker=marker, linestyle=line, color=color, label=model)
        if others:
            by_state.plot([s["state_floats"] for s in others], [100 * s["accuracy"][hardest] for s in others],
                          marker=marker, linestyle="none", markerfacecolor="none", color=color,
                          label=f"{model}: other shapes and seeds" if series else model)
    by_state.axvline(summaries[0]["state_floats"] / 4, color="gray", linestyle=":",
                     label="a quarter of the Transformer's KV cache")
    by_pairs.plot(budget["pairs"], [100 / n for n in budget["pairs"]], "--", color="gray",
                  label="guessing one of the N values in the sequence")
    by_pairs.set_xscale("log", base=2)
    by_pairs.set_xlabel("key-value pairs in the sequence")
    by_state.set_xscale("log", base=2)
    by_state.set_xlabel(f"state carried between tokens (numbers), at {budget['block']} tokens")
    for ax, title in ((by_pairs, "accuracy against facts to recall"),
                      (by_state, f"accuracy with {hardest} pairs against state size")):
        ax.set_ylabel("recall accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    by_pairs.legend(fontsize=8)
    by_state.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the plot has no empty corner
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
