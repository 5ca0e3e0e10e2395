"""
What the constant-size state buys, measured: training throughput against
sequence length, and generation latency and state memory against context
length, for the Transformer and New-LLM at matched parameter counts.

    python bench.py --quick --json bench.json       # under a minute on 2 CPU cores
    python bench.py --json results/bench.json --plot results/bench.png     # what the README shows (~5 minutes)
    python bench.py --compile --json results/bench_compiled.json           # compiled and eager (about 3 minutes)
    python bench.py --products                      # the report's model's products by torch and by oneDNN (seconds)
    python bench.py --engine --json results/engine.json   # each piece of fast.py: the step with it on and off
    python bench.py --device cuda --json bench.json # the GPU sizes (to 64k tokens of context)

Models (parameters counted without the Transformer's position table, which
only has to be long enough for the longest context measured):
  transformer   GPT-style, 4 blocks of width 128 (the CPU-scale baseline)
  newllm-stack  the best vector stack (train.py --preset best-newllm-cpu), trained
                through the chunked scan (scan.py)
  matrix-stack  the context-matrix stack (--preset best-matrix-cpu), trained through
                the chunked delta rule (delta_rule.py)
  mamba-stack   the stack with Mamba's state space as its memory (--preset mamba-cpu)
  lstm          the LSTM (--preset lstm-cpu), PyTorch's fused nn.LSTM
  newllm-seed   the seed report's model at the same size, a loop over positions
And the first command's model (`python train.py --arch newllm --context-dim 256`: the
report's model at train.py's defaults) timed three ways: as trained (fast.py's loop with its
backward written out), as the literal step-by-step definition through autograd, and as its
matrix products alone (the same shapes in the same order, nothing else: about the least
time a step doing these float32 products could take).

Training: tokens/s of forward + backward + AdamW step, the same number of
tokens per step at every length (batch = tokens / length); the median step of
each measurement, and the median of 5 rounds; at each length the models take turns. Generation: the
state holding `context` tokens is built directly (its contents do not change
the cost), then `steps` tokens are generated one at a time (the median step, and
the median of 5 rounds; at each context the models take turns); the state's size is counted
tensor by tensor. A ratio between two models is the median over rounds of each round's ratio:
the two numbers it divides were measured seconds apart, so a machine whose speed wanders from
minute to minute moves both; the models go in reverse order every other round, so none is always
first. Latency growth from 1k to 16k tokens of context is paired the same way.
"""

import json
import statistics
import time
from pathlib import Path

import torch

import train
from fast import HOOKS, PIECES, Products, accelerate, lesson_only
from cli import Parser, UserError, hardware, pick_device, run_script
from models import build_model, count_params, state_bytes
from plot import check_image_path
from presets import model_settings

MODELS = {
    "transformer": model_settings("transformer-cpu", dropout=0.0),
    "newllm-stack": model_settings("best-newllm-cpu", dropout=0.0),
    "matrix-stack": model_settings("best-matrix-cpu", dropout=0.0),
    "mamba-stack": model_settings("mamba-cpu", dropout=0.0),
    "lstm": model_settings("lstm-cpu", dropout=0.0),
    "newllm-seed": dict(arch="newllm", embed_dim=128, context_dim=128, hidden_dim=307, layers=8, pos_embed=False,
                        dropout=0.0),
}
VOCAB = 65  # Tiny Shakespeare's characters
EAGER = " eager"  # with --compile, a model's name with this added: the same model timed without torch.compile


def make(name, block_size, device):
    config = dict(MODELS[name])
    model = build_model(config.pop("arch"), vocab_size=VOCAB, block_size=block_size, **config).to(device)
    pos = getattr(model, "pos_emb", None)
    return model, count_params(model) - (pos.weight.numel() if pos is not None else 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def literal_seed_forward(model, idx, targets):
    """The report's model exactly as REPORT.md writes it: FNN([x_t ; c_{t-1}]) and the token head at every step."""
    x = model.embed(idx)
    context = model.cell.init_state(idx.size(0), idx.device)
    logits = []
    for t in range(idx.size(1)):
        h, context = model.cell.step(x[:, t], context)
        logits.append(model.head(h))
    logits = torch.stack(logits, dim=1)
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def median_seconds(work, device, repeats):
    """The median time of `work()` over `repeats` calls, after two more that warm up allocators, kernels and
    optimizer state."""
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_throughput(model, length, tokens, device, repeats, forward=None):
    """Tokens per second of full training steps at one sequence length."""
    batch = max(1, tokens // length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(VOCAB, (batch, length), device=device)
    forward = forward if forward is not None else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            _, loss = forward(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * length / median_seconds(step, device, repeats)


def step_products(config, batch, length, device):
    """A function that does every matrix product of the report's model's training step (newllm.py, fast.py),
    the same shapes in the same order, by the same kind of product (fast.Products.linear, weights laid out as
    the loop lays them out, without the bias, ReLU or sum the loop fuses into some), and nothing else: about
    the least time a step doing these products can take. Only the shapes matter, so the inputs are random and
    the backward pass starts where the forward pass ended."""
    E, C, H, V, rows = config.embed_dim, config.context_dim, config.hidden_dim, config.vocab_size, batch * length
    weight = lambda *shape: torch.randn(*shape, device=device) / shape[1] ** 0.5  # noqa: E731  (values stay finite)
    W_x, W_c, W_o, head = weight(H, E), weight(H, C), weight(C, H), weight(V, H)
    layers = [weight(H, H) for _ in range(config.layers - 1)]
    x, hidden, contexts = (torch.randn(rows, n, device=device) for n in (E, H, C))  # every position at once
    products = Products(torch.empty(batch, C, device=device))

    def products_of_a_step():
        x @ W_x.T  # the token half of the first Linear
        loop = [products.laid_out(W) for W in (W_c, *layers, W_o)]
        context = torch.randn(batch, C, device=device)  # any start (8k numbers: microseconds)
        for _ in range(length):  # forward, one position after another: W_c c, the layers, W_o h
            h = products.linear(context, loop[0])
            for W in loop[1:-1]:
                h = products.linear(h, W)
            context = products.linear(h, loop[-1])
        logits = hidden @ head.T  # the token head, then its two gradients
        logits @ head, logits.T @ hidden
        loop = [products.laid_out(W.T) for W in (W_c, *layers, W_o)]
        for _ in range(length):  # backward, one position after another
            grad = products.linear(context, loop[-1])
            for W in reversed(loop[1:-1]):
                grad = products.linear(grad, W)
            context = products.linear(grad, loop[0])
        for _ in layers:  # each weight's gradient: one product over all positions
            products.linear(hidden.T, hidden.T)
        products.linear(contexts.T, hidden.T), products.linear(hidden.T, contexts.T)  # W_o, W_c
        hidden.T @ x, hidden @ W_x  # W_x and the embeddings (autograd, as in training)
    return products_of_a_step


def measure_products(results, device, rounds):
    """What fast.py's choice of products rests on, each timed by itself (the median of `rounds`): GFLOPS of the
    loop's product (32 x 512 by 512 x 512) and of a weight gradient's (512 x 2048 by 2048 x 512) by torch and,
    where this PyTorch has it, by oneDNN (with the loop's weight laid out, as the loop does); the cost of one
    call, from a product too small to take time (32 x 16 by 16 x 16); and the time to draw one layer's dropout
    mask at the first command's size (64 x 32 x 512) with torch.rand and with bernoulli_."""
    x, w, a, b = (torch.randn(*shape, device=device) for shape in ((32, 512), (512, 512), (2048, 512), (2048, 512)))
    tiny_x, tiny_w = torch.randn(32, 16, device=device), torch.randn(16, 16, device=device)
    products = Products(x)
    laid_out = products.laid_out(w)
    ways = {"torch": (lambda: x @ w.T, lambda: a.T @ b, lambda: tiny_x @ tiny_w.T)}
    if products.onednn:
        ways["oneDNN"] = (lambda: products.linear(x, w), lambda: products.linear(a.T, b.T),
                          lambda: products.linear(tiny_x, tiny_w))
        ways["oneDNN, weight laid out"] = (lambda: products.linear(x, laid_out), None, None)
    masks = {"torch.rand": lambda: torch.rand(64, 32, 512, device=device).lt_(0.9).div_(0.9),
             "bernoulli_": lambda: torch.empty(64, 32, 512, device=device).bernoulli_(0.9).div_(0.9)}

    def seconds(work, calls):  # one call's time: the median over rounds of `calls` calls timed together
        return statistics.median(median_seconds(lambda: [work() for _ in range(calls)], device, 3) / calls
                                 for _ in range(rounds))
    gflops = lambda work, flops, calls: flops / seconds(work, calls) / 1e9  # noqa: E731
    found = results["products"] = {}
    print(f"the report's model's products, timed by themselves on {results['device']}")
    for how, (loop, gradient, tiny) in ways.items():
        found[how] = {"loop_gflops": gflops(loop, 2 * 32 * 512 * 512, 200)}
        if gradient is not None:
            found[how]["gradient_gflops"] = gflops(gradient, 2 * 512 * 2048 * 512, 10)
            found[how]["us_per_call"] = 1e6 * seconds(tiny, 1000)
        print(f"  {how:<25} " + ", ".join(f"{k} {v:,.1f}" for k, v in found[how].items()))
    found["mask_ms_per_layer"] = {how: 1e3 * seconds(draw, 5) for how, draw in masks.items()}
    print("  dropout mask, ms per layer: " + ", ".join(f"{k} {v:.2f}" for k, v in found["mask_ms_per_layer"].items()))


def take_turns(models, lengths, tokens, device, repeats, rounds, forwards=None):
    """name -> {length: [training tokens/s in each round]}. At each length the models take turns, seconds
    apart, so a slow minute on a shared machine hits the models being compared alike.
    forwards: name -> what to call instead of the model."""
    measured = {name: {n: [] for n in lengths[name]} for name in models}
    for r in range(rounds):
        for n in sorted({n for name in models for n in lengths[name]}):
            for name, (model, _) in in_turn(models, r):
                if n in lengths[name]:
                    forward = forwards[name] if forwards else None
                    measured[name][n].append(train_throughput(model, n, tokens, device, repeats, forward))
    return measured


def in_turn(models, round_number):
    """models' items in order, reversed in every other round: no model always goes first."""
    items = list(models.items())
    return items[::-1] if round_number % 2 else items


def medians(by_length):
    """{key: [a value per round]} -> {key: the median}."""
    return {key: statistics.median(values) for key, values in by_length.items()}


def paired_ratio(numerators, denominators):
    """The median over rounds of each round's ratio (numbers measured seconds apart divided by each other)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def state_at(model, context, device):
    """A generation state that has read `context` tokens, built directly (its values do not matter for cost)."""
    state = model.init_state(1, device)
    state["position"] = context
    if "cache" in state:  # the Transformer: every layer's keys and values, one per token read
        E, heads = model.config.embed_dim, model.config.heads
        shape = (1, heads, context, E // heads)
        state["cache"] = [(torch.randn(shape, device=device), torch.randn(shape, device=device)) for _ in model.blocks]
    return state


def rss_bytes():
    """This process's resident memory now (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * 4096
    except (OSError, ValueError, IndexError):
        return None


@torch.no_grad()
def generation(model, context, steps, device):
    """Median seconds per generated token, the state's bytes, and memory in use, at one context length."""
    model.eval()
    state = state_at(model, context, device)
    token = torch.zeros(1, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def next_token():
        nonlocal token, state
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    seconds = median_seconds(next_token, device, steps)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()
    return seconds, state_bytes(state), memory


def main(argv=None):
    parser = Parser(prog="bench.py", description="Training throughput and generation cost against length.")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute on 2 CPU cores)")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--rounds", type=int, help="rounds of measurement, the models taking turns in each "
                                                   "(default 5, --products 3; --quick: 1)")
    parser.add_argument("--plot", help="also draw generation memory and latency against context length (PNG)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--compile", action="store_true",
                        help="time training of the three models compiled and eager, at lengths 256 and 2048 only "
                             "(about 3 minutes on a 2-core CPU, compiling included)")
    parser.add_argument("--engine", action="store_true",
                        help="time every model's training step with fast.py's pieces all on, all off (the lesson "
                             "files alone) and all on but one: what each piece gains (a few minutes)")
    parser.add_argument("--products", action="store_true",
                        help="time the report's model's matrix products by themselves, by torch and by oneDNN "
                             "(fast.py), its cost per call and its dropout masks (seconds)")
    args = parser.parse_args(argv)
    # refuse now, not after minutes of measuring
    if args.json and (not Path(args.json).resolve().parent.is_dir() or Path(args.json).is_dir()):
        raise UserError(f"cannot write {args.json}: its folder does not exist, or it is a folder")
    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds must be positive (got {args.rounds})")
    rounds = args.rounds or (1 if args.quick else 5)
    if args.compile + args.products + args.engine > 1:
        raise UserError("--compile, --products and --engine measure different things: run them one at a time")
    if args.plot:
        if args.compile or args.products or args.engine:
            raise UserError("--plot draws generation, which --compile, --products and --engine do not measure: "
                            "drop one")
        check_image_path(args.plot)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    train_lengths = [128, 256, 512, 1024, 2048] + ([4096, 8192] if gpu else [])
    seed_lengths = [128, 256]  # the loop over positions makes longer lengths slow to even measure
    contexts = [256, 1024, 4096, 16384] + ([65536] if gpu else [])
    tokens_per_step = 65536 if gpu else 8192
    repeats = 3 if args.quick else 5
    steps = 16 if args.quick else 64
    results = {"device": hardware(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "tokens_per_step": tokens_per_step, "params": {}, "train": {}, "generate": {}}
    if args.compile:
        compiled_training(results, device, repeats, rounds, args.json)
        return
    if args.products:
        measure_products(results, device, rounds=args.rounds or (1 if args.quick else 3))
        write_results(results, args.json)
        return
    if args.engine:
        measure_engine(results, device, repeats, rounds)
        write_results(results, args.json)
        return

    print(f"bench on {results['device']}, torch {torch.__version__}")
    measure_training(results, train_lengths, seed_lengths, device, repeats, rounds)
    measure_generation(results, contexts, steps, device, rounds)
    results["ratios"], results["targets_met"] = ratios_and_targets(results)
    report(results, args.json)
    if args.plot:
        plot_generation(results, args.plot)
        print(f"wrote {args.plot}")


def measure_training(results, lengths, seed_lengths, device, repeats, rounds):
    """Training tokens/s of every model at every length, and of the report's model as its literal loop."""
    tokens_per_step = results["tokens_per_step"]
    print(f"\ntraining throughput, tokens/s ({tokens_per_step} tokens per step; batch = tokens / length)")
    print(f"{'model':<22}{'params':>10}" + "".join(f"{n:>10}" for n in lengths))
    models = {name: make(name, max(lengths), device) for name in MODELS}
    results["train_rounds"] = take_turns(models, {name: seed_lengths if name == "newllm-seed" else lengths
                                                  for name in MODELS}, tokens_per_step, device, repeats, rounds)
    for name, (model, params) in models.items():
        results["params"][name] = params
        speeds = results["train"][name] = medians(results["train_rounds"][name])
        print(f"{name:<22}{params:>10,}" + "".join(f"{speeds[n]:>10,.0f}" if n in speeds else f"{'-':>10}"
                                                  for n in lengths))
    # the first command's model: train.py's defaults, its batch and length, dropout on as in training
    defaults = train.parse_args([])
    torch.manual_seed(0)
    model = build_model("newllm", vocab_size=VOCAB, block_size=defaults.block_size, context_dim=256).to(device)
    length, tokens = defaults.block_size, defaults.batch_size * defaults.block_size
    products = step_products(model.config, defaults.batch_size, length, device)
    ways = {"as trained": lambda: train_throughput(model, length, tokens, device, repeats),
            "literal loop": lambda: train_throughput(model, length, tokens, device, repeats,
                                                     lambda i, t: literal_seed_forward(model, i, t)),
            "products only": lambda: tokens / median_seconds(products, device, repeats)}
    turns = [{how: measure() for how, measure in in_turn(ways, r)} for r in range(rounds)]
    first = {how: statistics.median(turn[how] for turn in turns) for how in ways}
    results["first_command"] = dict(first, batch=defaults.batch_size, length=defaults.block_size,
                                    params=count_params(model), rounds=turns)
    print(f"\nthe first command's model ({count_params(model):,} parameters, batch {defaults.batch_size} x "
          f"{defaults.block_size}): " + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in first.items()))


def measure_engine(results, device, repeats, rounds):
    """What each piece of fast.py gains: each model's training tokens/s with every piece on ("engine"), none
    ("lesson"), and every piece but one, taking turns round by round. A piece's gain is the engine's speed over
    the speed without it, minus 1, paired round by round (the whole engine's: over the lesson's)."""
    lengths, tokens = [256, 2048], results["tokens_per_step"]
    defaults = train.parse_args([])
    torch.manual_seed(0)
    first = build_model("newllm", vocab_size=VOCAB, block_size=defaults.block_size, context_dim=256).to(device)
    cases = {name: (make(name, max(lengths), device)[0], lengths, tokens)
             for name in ("transformer", "newllm-stack", "matrix-stack")}
    # Mamba, the slowest to time by far, at one length: its scan, like all its work, grows with T
    cases["mamba-stack"] = (make("mamba-stack", lengths[0], device)[0], lengths[:1], tokens)
    cases["first command"] = (first, [defaults.block_size], defaults.batch_size * defaults.block_size)
    found = results["engine"] = {}
    print(f"fast.py's pieces: training tokens/s with each on and off, and each piece's gain ({rounds} rounds)")
    for name, (model, model_lengths, model_tokens) in cases.items():
        used = [p for p in PIECES if any(getattr(m, attribute, None) is not None
                                         for m in accelerate(lesson_only(model), [p]).modules()
                                         for attribute in HOOKS)]
        variants = {"engine": PIECES, "lesson": []}
        if len(used) > 1:
            variants.update({f"without {p}": [q for q in PIECES if q != p] for p in used})
        speeds = {v: {n: [] for n in model_lengths} for v in variants}
        for r in range(rounds):
            for n in model_lengths:
                for variant, pieces in in_turn(variants, r):
                    accelerate(lesson_only(model), pieces)
                    speeds[variant][n].append(train_throughput(model, n, model_tokens, device, repeats))
        accelerate(lesson_only(model))
        gains = {n: {"engine": paired_ratio(speeds["engine"][n], speeds["lesson"][n]) - 1} for n in model_lengths}
        for n in model_lengths:
            for p in used:
                without = speeds[f"without {p}"][n] if len(used) > 1 else speeds["lesson"][n]
                gains[n][p] = paired_ratio(speeds["engine"][n], without) - 1
        found[name] = {"pieces": used, "tokens_per_s": {v: medians(by_n) for v, by_n in speeds.items()},
                       "gain": gains, "rounds": speeds}
        for n in model_lengths:
            print(f"  {name:<14} length {n:>5}: engine {statistics.median(speeds['engine'][n]):>8,.0f} tokens/s, "
                  f"lesson {statistics.median(speeds['lesson'][n]):>8,.0f}; gain "
                  + ", ".join(f"{p} {g:+.1%}" for p, g in gains[n].items()))


def measure_generation(results, contexts, steps, device, rounds):
    """Per-token latency, state size and memory of generation after `context` tokens, for each model."""
    gpu = device.type == "cuda"
    print(f"\ngeneration: ms per token | state size (MiB) | {'GPU peak' if gpu else 'process'} memory (MiB)")
    print(f"{'model':<22}" + "".join(f"{n:>24}" for n in contexts))
    names = ("transformer", *(name for _, name in COMPARED))
    models = {name: make(name, max(contexts) + steps + 8, device)[0] for name in names}
    turns = [{n: {name: generation(model, n, steps, device) for name, model in in_turn(models, r)} for n in contexts}
             for r in range(rounds)]  # at each context the models take turns, as in training
    results["generate_rounds"] = {name: {n: [turn[n][name][0] for turn in turns] for n in contexts} for name in names}
    for name in names:
        rows = {n: (statistics.median(seconds), *turns[-1][n][name][1:])
                for n, seconds in results["generate_rounds"][name].items()}
        results["generate"][name] = {n: {"s_per_token": s, "state_bytes": b, "memory_bytes": m}
                                     for n, (s, b, m) in rows.items()}
        print(f"{name:<22}" + "".join(f"{s * 1e3:>8.2f} |{b / 2**20:>6.2f} |{(m or 0) / 2**20:>6.0f}"
                                      for s, b, m in rows.values()))


TRAINING_TARGETS = {"stack": (1.15, 2.5), "matrix": (0.8, 1.5)}  # x the Transformer's tokens/s at 256, 2048
COMPARED = (("stack", "newllm-stack"), ("matrix", "matrix-stack"), ("mamba", "mamba-stack"), ("lstm", "lstm"))


def training_ratios(train_rounds, suffix=""):
    """Each stack's training tokens/s against the Transformer's at lengths 256 and 2048, paired round by round.
    suffix picks the entries measured one way (compiled_training times each model eager and compiled)."""
    t = train_rounds["transformer" + suffix]
    return {f"{short}_vs_transformer_train_{n}": paired_ratio(train_rounds[name + suffix][n], t[n])
            for short, name in COMPARED if name + suffix in train_rounds for n in (256, 2048)}


def training_targets(ratios):
    """Each training target's verdict, from training_ratios' numbers (compared unrounded)."""
    return {f"{short} trains >= {target}x the Transformer's tokens/s at length {n}":
            ratios[f"{short}_vs_transformer_train_{n}"] >= target
            for short, targets in TRAINING_TARGETS.items() for n, target in zip((256, 2048), targets)}


def ratios_and_targets(results):
    """The numbers the targets are stated in (ratios to the Transformer, growth from 1k to 16k), and each verdict."""
    s = results["train_rounds"]["newllm-stack"]
    first, generated = results["first_command"], results["generate_rounds"]
    growth = {name: {"state": rows[16384]["state_bytes"] / rows[1024]["state_bytes"] - 1,
                     "latency": paired_ratio(generated[name][16384], generated[name][1024]) - 1}
              for name, rows in results["generate"].items()}
    against_literal_loop = lambda how: paired_ratio([turn[how] for turn in first["rounds"]],  # noqa: E731
                                                    [turn["literal loop"] for turn in first["rounds"]])
    ratios = {
        **training_ratios(results["train_rounds"]),
        **{f"{short}_{what}_growth_1k_to_16k": growth[name][what] for short, name in
           (*COMPARED, ("transformer", "transformer")) for what in ("state", "latency")},
        **{f"{short}_vs_transformer_generate_16k": paired_ratio(generated["transformer"][16384], generated[name][16384])
           for short, name in COMPARED},
        "first_command_vs_literal_loop": against_literal_loop("as trained"),
        "first_command_products_only_vs_literal_loop": against_literal_loop("products only"),  # the ceiling
        "seed_vs_stack_train_128": paired_ratio(results["train_rounds"]["newllm-seed"][128], s[128]),
    }
    targets = training_targets(ratios)
    targets["the first command's training step >= 2x the literal loop's"] = \
        ratios["first_command_vs_literal_loop"] >= 2.0
    for short in ("stack", "matrix"):
        targets[f"{short} generates >= 5x the Transformer's tokens/s at 16k tokens of context"] = \
            ratios[f"{short}_vs_transformer_generate_16k"] >= 5.0
        targets[f"{short} state within 5% from 1k to 16k tokens"] = abs(ratios[f"{short}_state_growth_1k_to_16k"]) <= 0.05
        targets[f"{short} latency within 20% from 1k to 16k tokens"] = \
            abs(ratios[f"{short}_latency_growth_1k_to_16k"]) <= 0.20
    return ratios, targets


def compiled_training(results, device, repeats, rounds, json_path):
    """Training throughput at the two lengths the targets name, every model compiled and eager, all six taking
    turns: the targets checked on the compiled models, and what compiling gained each model, paired round by
    round. The delta rule's loop over chunks stays eager (delta_rule.py); the first steps at each length compile."""
    lengths = [256, 2048]
    print(f"training throughput, compiled and eager, tokens/s ({results['tokens_per_step']} tokens per step)")
    names = ("transformer", "newllm-stack", "matrix-stack")
    models = {name: make(name, max(lengths), device) for name in names}
    entries = {**models, **{name + EAGER: models[name] for name in names}}
    # dynamic=False: a graph of its own for each length, as a training run (one block size) gets; by default
    # the second length would recompile into one graph for any length, slower here (docs/speed.md)
    forwards = {**{name: torch.compile(model, dynamic=False) for name, (model, _) in models.items()},
                **{name + EAGER: None for name in names}}  # None: call the model itself
    rounds_by_entry = results["train_rounds"] = take_turns(entries, {name: lengths for name in entries},
                                                           results["tokens_per_step"], device, repeats, rounds, forwards)
    for name, (_, params) in entries.items():
        results["params"][name] = params
        results["train"][name] = medians(rounds_by_entry[name])
        print(f"{name:<22}" + "".join(f"{n:>8}: {v:>8,.0f}" for n, v in results["train"][name].items()))
    ratios = training_ratios(rounds_by_entry)  # compiled against compiled
    ratios.update({key.replace("_vs_", "_eager_vs_"): value
                   for key, value in training_ratios(rounds_by_entry, EAGER).items()})  # eager against eager
    ratios.update({f"{short}_compiled_vs_eager_train_{n}": paired_ratio(rounds_by_entry[name][n],
                                                                        rounds_by_entry[name + EAGER][n])
                   for short, name in zip(("transformer", "stack", "matrix"), names) for n in lengths})
    results["ratios"], results["targets_met"] = ratios, training_targets(ratios)
    report(results, json_path)


def report(results, json_path):
    """Print the ratios and each target's verdict, and write every number to json_path if given."""
    print("\nratios")
    for key, value in results["ratios"].items():
        print(f"  {key:<44}{value:>8.3f}")  # three decimals: enough to see why a verdict went either way
    print("targets")
    for key, met in results["targets_met"].items():
        print(f"  [{'met' if met else 'NOT met'}] {key}")
    write_results(results, json_path)


def write_results(results, json_path):
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")


def plot_generation(results, path):
    """State size and per-token latency against context length, one line per model, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (memory, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in results["generate"].items():
        contexts = sorted(rows, key=int)
        memory.plot(contexts, [rows[n]["state_bytes"] / 2**20 for n in contexts], "o-", label=name)
        latency.plot(contexts, [rows[n]["s_per_token"] * 1e3 for n in contexts], "o-", label=name)
    for ax, label in ((memory, "generation state (MiB)"), (latency, "milliseconds per generated token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens of context already read")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"Generation cost against context length ({results['device']}, {results['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_script(main)
