"""
Train New-LLM or a Transformer on a text (or the recall task), one readable loop.

    python train.py --arch newllm --context-dim 256        # the seed model, ~6 min on 2 CPU cores
    python train.py --arch transformer                     # the matched Transformer, ~4 min
    python train.py --preset seed-baseline                 # the seed report's run, word level
    python train.py --preset best-newllm-cpu               # the best attention-free stack
    python train.py --out-dir runs/newllm --resume         # carry on after Ctrl-C or a crash
    python train.py --arch transformer --dry-run           # build the model, print 'params: N'
    torchrun --standalone --nproc_per_node=2 train.py --arch transformer   # data-parallel (DDP)

Each run leaves in --out-dir: config.json (every setting), log.jsonl (one line
per evaluation), ckpt.pt (the best validation loss) and last.pt (the latest
state, for --resume). Checkpoints are written atomically; Ctrl-C saves last.pt.

The file reads top to bottom: presets and flags, then main(): setup, data,
model (new or resumed), optimizer, estimate_loss, get_lr, and one loop that
evaluates/checkpoints, steps, logs and stops.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import IGNORE, describe, load_dataset
from lab import ARCHS, Parser, UserError, build_model, count_params, generate, hardware, load_checkpoint, \
    model_config_dict, pick_device, run_script, save_checkpoint

# -----------------------------------------------------------------------------
# presets: the configurations people rerun. Any flag given next to a preset overrides it.

# The seed report's setup (SEED.md): word level, 1,000 tokens, one line per sequence of at
# most 32 tokens, batch 16, Adam (no weight decay) at a constant 1e-4, clipping 1.0, dropout 0.1.
SEED_SETUP = dict(tokenizer="word", vocab_size=1000, sentences=True, block_size=32, dropout=0.1,
                  batch_size=16, lr=1e-4, beta2=0.999, weight_decay=0.0, warmup_iters=0,
                  lr_schedule="constant", grad_clip=1.0, epochs=50, eval_interval=0, eval_iters=50)
SEED_NEWLLM = dict(SEED_SETUP, arch="newllm", embed_dim=256, context_dim=256, hidden_dim=512, layers=8)

# The best attention-free New-LLM (README, "Closing the gap"): a stack of gated context blocks
# with a short convolution, trained through the parallel scan. (--timescales measured worse.)
BEST_STACK = dict(arch="newllm", num_contexts=4, gate=True, short_conv=4, context_norm=True, pos_embed=False)

PRESETS = {
    "seed-baseline": SEED_NEWLLM,
    "seed-exp1": dict(SEED_NEWLLM, context_dim=512),
    "seed-exp2": dict(SEED_NEWLLM, context_dim=512, hidden_dim=1024, layers=10),
    "seed-exp3": dict(SEED_NEWLLM, context_dim=512, hidden_dim=1024, layers=10, epochs=150),
    "seed-transformer": dict(SEED_SETUP, arch="transformer", embed_dim=256, heads=4, layers=6,
                             hidden_dim=1024, post_norm=True),
    # CPU scale (~0.8M parameters), matched to `--preset transformer-cpu`
    "best-newllm-cpu": dict(BEST_STACK, embed_dim=128, context_dim=128, hidden_dim=524, block_size=128,
                            batch_size=32, dropout=0.1, max_iters=1500, lr=2e-3),
    "transformer-cpu": dict(arch="transformer", embed_dim=128, heads=4, layers=4, block_size=128,
                            batch_size=32, dropout=0.1, max_iters=1500, lr=2e-3),
    # GPU scale (~10M parameters, nanoGPT's Shakespeare model), matched to `--preset transformer-gpu`
    "best-newllm": dict(BEST_STACK, embed_dim=384, context_dim=384, hidden_dim=1554, num_contexts=6,
                        block_size=256, batch_size=64, dropout=0.2, max_iters=5000, lr=1e-3),
    "transformer-gpu": dict(arch="transformer", embed_dim=384, heads=6, layers=6, block_size=256,
                            batch_size=64, dropout=0.2, max_iters=5000, lr=1e-3),
}

MODEL_FLAGS = {f.name for config_class, _ in ARCHS.values() for f in fields(config_class)} - {"vocab_size"}


def int_list(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def build_parser():
    p = Parser(prog="train.py", description="Train New-LLM or a Transformer.")
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare", help="'shakespeare' (downloaded once), 'recall', or a UTF-8 text file")
    g.add_argument("--tokenizer", default="char", choices=["char", "word"], help="characters, or lower-cased whitespace words")
    g.add_argument("--vocab-size", type=int, default=1000, help="word tokenizer: entries including <PAD> <UNK> <BOS> <EOS>")
    g.add_argument("--sentences", action=bool_flag, default=False, help="one line per sequence, padded (the seed report's setup)")
    g.add_argument("--recall-vocab", type=int, default=256, help="recall task: vocabulary (keys in the lower half, values in the upper)")
    g.add_argument("--recall-pairs", type=int_list, default=[8],
                   help="recall task: key-value pairs per sequence; a list (4,8,16) trains on a mix")
    g.add_argument("--recall-queries", type=int, default=8, help="recall task: queries per sequence")

    g = p.add_argument_group("model (unset flags take the architecture's defaults, see newllm.py / transformer.py)")
    g.add_argument("--arch", default="newllm", choices=list(ARCHS), help="architecture")
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration; flags given beside it override it")
    g.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--embed-dim", type=int, help="E: embedding / residual width")
    g.add_argument("--context-dim", type=int, help="New-LLM: C, size of each context vector")
    g.add_argument("--hidden-dim", type=int, help="H: FNN width (one-context New-LLM) or MLP width")
    g.add_argument("--layers", type=int, help="FNN depth (one-context New-LLM) or Transformer blocks")
    g.add_argument("--heads", type=int, help="attention heads (Transformer, New-LLM hybrid)")
    g.add_argument("--dropout", type=float, help="dropout probability")
    g.add_argument("--num-contexts", type=int, help="New-LLM: 1 = the seed model, K >= 2 = a stack of K context blocks")
    g.add_argument("--context-norm", action=bool_flag, help="New-LLM: LayerNorm on the context")
    g.add_argument("--gate", action=bool_flag, help="New-LLM: gated update a*c + (1-a)*v instead of c + delta")
    g.add_argument("--timescales", action=bool_flag, help="New-LLM: per-channel gate floors, fast and slow memories")
    g.add_argument("--short-conv", type=int, help="New-LLM stack: causal depthwise conv width before each context (0 = off)")
    g.add_argument("--local-window", type=int, help="New-LLM stack: hybrid attention over the last W positions (0 = off)")
    g.add_argument("--pos-embed", action=bool_flag, help="New-LLM: learned position embedding (caps the length)")
    g.add_argument("--post-norm", action=bool_flag, help="Transformer: LayerNorm after each residual sum (the report's)")
    g.add_argument("--init", choices=["gpt2", "torch"], help="Transformer: GPT-2's N(0, 0.02) init or PyTorch's defaults")

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step (per process)")
    g.add_argument("--max-iters", type=int, default=500, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="train for this many passes over the training data instead of --max-iters")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"], help="after warmup: cosine decay to lr/10, or constant")
    g.add_argument("--warmup-iters", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (0 = Adam)")
    g.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (0 = once per epoch)")
    g.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation (the same batches every time)")
    g.add_argument("--log-interval", type=int, default=10, help="read the loss on the host every N steps")
    g.add_argument("--seed", type=int, default=1337, help="seed for initialisation, batches and dropout")

    g = p.add_argument_group("system and output")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--amp", action=bool_flag, default=True, help="bfloat16 autocast on CUDA")
    g.add_argument("--compile", action=bool_flag, default=False, help="torch.compile the model")
    g.add_argument("--out-dir", help="where the run's files go (default runs/<preset or arch>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    g.add_argument("--dry-run", action="store_true", help="build the model, print 'params: N' and exit")
    g.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate at the end (0 = none)")
    g.add_argument("--progress", action=bool_flag, default=True, help="show a progress bar")
    return p


def parse_args(argv):
    """Defaults < preset < the resumed run's config.json < flags on the command line."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.preset:
        parser.set_defaults(**PRESETS[first.preset])
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or f"runs/{args.preset or args.arch}"
    if args.resume:
        config_path = Path(args.out_dir) / "config.json"
        if not config_path.is_file():
            raise UserError(f"nothing to resume: {config_path} does not exist")
        saved = json.loads(config_path.read_text())["args"]
        if "--arch" in " ".join(argv or sys.argv[1:]) and args.arch != saved["arch"]:
            raise UserError(f"{args.out_dir} holds a {saved['arch']} run, but --arch {args.arch} was asked for")
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "overwrite", "dry_run")})
        args = parser.parse_args(argv)
    return args


def model_config_from_args(args, vocab_size):
    """The architecture's config fields that were set; a flag it does not have is an error."""
    config_class, _ = ARCHS[args.arch]
    names = {f.name for f in fields(config_class)}
    given = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - names)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise UserError(f"{flags} do(es) not apply to --arch {args.arch}")
    return {**{k: v for k, v in given.items() if k in names}, "vocab_size": vocab_size}


# -----------------------------------------------------------------------------
# random state: everything that decides the next batch and the next dropout mask


def rng_state(dataset, device):
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain lists load with weights_only
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state,
             "data": dataset.state_dict()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, dataset, device):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    dataset.load_state_dict(state["data"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Diverged(Exception):
    pass


# -----------------------------------------------------------------------------


def main(argv=None):
    """Train; returns a summary dict (experiments.py reads it)."""
    args = parse_args(argv)

    # setup: one process, or one of several under torchrun
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = 0, 1
    device = pick_device(args.device)
    if distributed:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out_dir = Path(args.out_dir)

    # data
    dataset = load_dataset(args.data, args.tokenizer, args.vocab_size, args.block_size, args.sentences,
                           args.seed + rank, args.recall_vocab, args.recall_pairs, args.recall_queries)
    say(describe(args.data, dataset))
    steps_per_epoch = max(1, dataset.steps_per_epoch(args.batch_size) // world_size) if (args.epochs or args.eval_interval == 0) else None
    max_iters = math.ceil(args.epochs * steps_per_epoch) if args.epochs else args.max_iters
    eval_interval = args.eval_interval or steps_per_epoch
    for name, value in (("--batch-size", args.batch_size), ("--max-iters", max_iters), ("--eval-iters", args.eval_iters),
                        ("--log-interval", args.log_interval), ("--lr", args.lr)):
        if value <= 0:
            raise UserError(f"{name} must be positive (got {value})")

    # model, new or resumed
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model_config = model_config_from_args(args, dataset.tokenizer.vocab_size)
    model = build_model(args.arch, **model_config)
    n_params = count_params(model)
    say(f"params: {n_params}")
    if args.dry_run:
        return {"params": n_params}
    if master:  # only now, with the data and the model known to be good, touch the output folder
        prepare_out_dir(out_dir, args)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; biases and norms do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")
    step, best_val, last_eval_step, elapsed, train_time = 0, float("inf"), -1, 0.0, 0.0
    torch.manual_seed(args.seed + rank)  # dropout differs across ranks
    if args.resume:
        checkpoint = load_checkpoint(out_dir / "last.pt", map_location=device)
        check_compatible(checkpoint, args.arch, model_config, dataset.tokenizer.state_dict())
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, best_val = checkpoint["step"], checkpoint["best_val_loss"]
        last_eval_step, elapsed, train_time = checkpoint["last_eval_step"], checkpoint["elapsed_s"], checkpoint["train_time_s"]
        states = checkpoint["rng"]
        if len(states) == world_size:
            set_rng_state(states[rank], dataset, device)
        else:
            say(f"note: the run was written by {len(states)} process(es), not {world_size}: batches will differ")
        say(f"resuming at step {step} (best val loss {best_val:.4f})")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = args.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * world_size
    if master:
        write_json(out_dir / "config.json", {"args": vars(args), "arch": args.arch, "model_config": model_config_dict(raw_model),
                                             "params": n_params, "max_iters": max_iters, "world_size": world_size,
                                             "hardware": hardware(device), "torch": torch.__version__})

    eval_data = {split: dataset.eval_batches(split, args.batch_size, args.eval_iters) for split in ("train", "val")}

    @torch.no_grad()
    def estimate_loss():
        """Mean loss and next-token accuracy (scored targets only) on fixed batches of each split."""
        raw_model.eval()
        out = {}
        for split, batches in eval_data.items():
            losses, correct, scored = [], 0, 0
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                with autocast:
                    logits, loss = raw_model(x, y)
                losses.append(loss.item())
                scored_mask = y != IGNORE
                correct += (logits.argmax(-1) == y)[scored_mask].sum().item()
                scored += scored_mask.sum().item()
            out[f"{split}_loss"] = sum(losses) / len(losses)
            out[f"{split}_acc"] = correct / max(scored, 1)
        raw_model.train()
        return out

    def get_lr(step):
        # 1) linear warmup
        if step < args.warmup_iters:
            return args.lr * (step + 1) / (args.warmup_iters + 1)
        # 2) constant after warmup
        if args.lr_schedule == "constant":
            return args.lr
        # 3) cosine decay from lr to lr/10 at the last step
        progress = min(1.0, (step - args.warmup_iters) / max(1, max_iters - args.warmup_iters))
        return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.lr / 10)

    def gather_rng_states():
        """Every rank's random state (a collective under torchrun), so a resumed run draws the same batches."""
        if not distributed:
            return [rng_state(dataset, device)]
        states = [None] * world_size
        dist.all_gather_object(states, rng_state(dataset, device))
        return states

    def save(path, step, rng_states):
        save_checkpoint(path, {
            "arch": args.arch, "model_config": model_config_dict(raw_model), "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "tokenizer": dataset.tokenizer.state_dict(), "step": step,
            "best_val_loss": best_val, "last_eval_step": last_eval_step, "elapsed_s": elapsed + time.time() - t0,
            "train_time_s": train_time,
            "rng": rng_states, "args": vars(args)})

    # Ctrl-C / SIGTERM: finish the current step, save last.pt, exit. A second Ctrl-C stops at once.
    stop_requested = []
    previous_handlers = {}

    def request_stop(signum, frame):
        stop_requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous_handlers[sig] = signal.signal(sig, request_stop)

    # the loop: evaluate/checkpoint -> step -> log -> stop
    log_path = out_dir / "log.jsonl"
    if master:
        trim_log(log_path, step)
    t0 = time.time()
    recent_losses, running_loss = [], None
    bar = tqdm(total=max_iters, initial=step, disable=not (master and args.progress), dynamic_ncols=True, leave=False)
    model.train()
    try:
        while True:
            if (step % eval_interval == 0 or step == max_iters) and step != last_eval_step:
                last_eval_step = step
                rng_states = gather_rng_states()
                if master:
                    metrics = estimate_loss()
                    if not math.isfinite(metrics["val_loss"]):
                        raise Diverged(f"validation loss is {metrics['val_loss']} at step {step}")
                    record = {"step": step, "tokens": step * tokens_per_step, "time_s": round(elapsed + time.time() - t0, 2),
                              "train_time_s": round(train_time, 2), "lr": get_lr(min(step, max_iters - 1)), **metrics}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.write(f"step {step:>6}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}")
                    if metrics["val_loss"] < best_val:
                        best_val = metrics["val_loss"]
                        save(out_dir / "ckpt.pt", step, rng_states)
                    save(out_dir / "last.pt", step, rng_states)
            if step >= max_iters:
                break

            tick = time.time()
            lr = get_lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = dataset.get_batch(args.batch_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            recent_losses.append(loss.detach())

            # the host reads the losses (and the stop flag) only every log_interval steps: no syncs in between
            if step % args.log_interval == 0 or step == max_iters or (stop_requested and not distributed):
                check = torch.stack(recent_losses + [torch.tensor(float(bool(stop_requested)), device=device)])
                if distributed:
                    dist.all_reduce(check)  # sum over ranks: a NaN anywhere, or a stop anywhere, is seen everywhere
                values = check.tolist()
                losses, stop = [v / world_size for v in values[:-1]], values[-1] > 0
                for i, value in enumerate(losses):
                    if not math.isfinite(value):
                        raise Diverged(f"loss became {value} at step {step - len(losses) + i + 1}")
                running_loss = losses[-1] if running_loss is None else 0.9 * running_loss + 0.1 * losses[-1]
                recent_losses = []
                bar.set_postfix(loss=f"{running_loss:.4f}", best_val=f"{best_val:.4f}")
                if stop:
                    rng_states = gather_rng_states()
                    if master:
                        save(out_dir / "last.pt", step, rng_states)
                    raise KeyboardInterrupt
            train_time += time.time() - tick
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        if master:
            saved = load_checkpoint(out_dir / "last.pt")["step"] if (out_dir / "last.pt").exists() else 0
            say(f"stopped; last.pt holds step {saved}. Resume with: python train.py --out-dir {out_dir} --resume")
        raise SystemExit(130)
    except Diverged as error:
        bar.close()
        raise UserError(f"training diverged: {error}. ckpt.pt (best val loss {best_val:.4f}) is untouched; "
                        f"try a lower --lr") from None
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    bar.close()

    summary = {"params": n_params, "best_val_loss": best_val, "steps": step, "tokens": step * tokens_per_step,
               "train_time_s": train_time, "tokens_per_s": step * tokens_per_step / max(train_time, 1e-9),
               "out_dir": str(out_dir)}
    if master:
        say(f"done: best val loss {best_val:.4f} after {step} steps, {summary['tokens']:,} tokens, "
            f"{summary['tokens_per_s']:,.0f} tokens/s")
        if args.sample_tokens > 0:
            prompt = torch.tensor([dataset.tokenizer.start_ids()], device=device)
            text = dataset.tokenizer.decode(generate(raw_model, prompt, args.sample_tokens, top_k=None)[0].tolist())
            say("sample:\n" + text)
    if distributed:
        dist.destroy_process_group()
    return summary


def prepare_out_dir(out_dir, args):
    """Refuse to mix two runs in one folder unless asked to resume or overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file")
    run_files = [out_dir / name for name in ("config.json", "log.jsonl", "ckpt.pt", "last.pt")]
    if any(f.exists() for f in run_files) and not args.resume:
        if not args.overwrite:
            raise UserError(f"{out_dir} already holds a run: add --resume to continue it or --overwrite to replace it")
        for f in run_files:
            f.unlink(missing_ok=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out_dir}: {error.strerror}") from None


def trim_log(log_path, step):
    """On resume, drop log lines past the checkpoint (a killed run may have written some)."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    tmp = Path(str(log_path) + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log_path)


def check_compatible(checkpoint, arch, model_config, tokenizer_state):
    """A resumed checkpoint must hold the same architecture, shape and vocabulary as the run asks for."""
    if checkpoint["arch"] != arch:
        raise UserError(f"the checkpoint holds a {checkpoint['arch']} model, but --arch {arch} was asked for")
    if checkpoint["tokenizer"] != tokenizer_state:
        raise UserError("the checkpoint's vocabulary differs from this data's: resume with the data and tokenizer it was trained on")
    saved_config = checkpoint["model_config"]
    config_class, _ = ARCHS[arch]
    wanted = config_class(**model_config).__dict__
    differ = [f"{k} {saved_config.get(k)} vs {v}" for k, v in wanted.items() if saved_config.get(k) != v]
    if differ:
        raise UserError(f"the checkpoint's model differs from the flags ({', '.join(differ)})")


if __name__ == "__main__":
    run_script(main, io_note="; saved checkpoints are intact")
