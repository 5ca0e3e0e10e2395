"""
Train a model on a text (or on the recall task): one readable loop.

    python train.py --arch newllm --context-dim 256        # the report's model (REPORT.md)
    python train.py --arch transformer                     # the Transformer it is measured against
    python train.py --preset best-newllm-cpu               # the best attention-free stack (presets.py)
    python train.py --out-dir runs/newllm --resume         # carry on after Ctrl-C or a crash
    python train.py --arch transformer --dry-run           # build the model, print 'params: N'
    torchrun --standalone --nproc_per_node=2 train.py --arch transformer   # data-parallel (DDP)

A run leaves in --out-dir: config.json (every setting), log.jsonl (one line per
evaluation), ckpt.pt (the best validation loss) and last.pt (the latest state, for
--resume). It ends by printing a sample of generated text.

Read main() and train() top to bottom: setup, data, model, optimiser, then the loop
(evaluate and save -> step -> log -> stop). Around them come the small pieces they call
(configure_optimizer, evaluate_and_save, check_finite, estimate_loss, get_lr, schedule) and the flags. The run's folder (lock, checkpoints,
resuming, signals) is run_folder.py's, several processes processes.py's.
"""

import argparse
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from cli import Parser, UserError, autocast_for, check_seed, hardware, pick_device, run_script
from data import IGNORE, describe, load_dataset
from models import ARCHS, build_model, count_params, model_config_dict
from presets import PRESETS
from processes import Processes
from run_folder import (Diverged, Progress, TrainingDiverged, claim_out_dir, load_checkpoint, log_line, read_json,
                        resume, rng_state, save_state, stop_signals, trim_log, write_json)
from sample import generate

# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    """Train one model; returns a summary dict (experiments.py reads it)."""
    args = parse_args(argv)

    # setup: one process, or one of several under torchrun, each training on its own batches
    proc = Processes.start(pick_device(args.device))
    say = print if proc.master else (lambda *a, **k: None)

    # data: the text, its tokenizer, and random training batches (one seed per process)
    dataset = load_dataset(args.data, args.tokenizer, args.vocab_size, args.block_size, args.sentences,
                           args.seed + proc.rank, args.recall_vocab, args.recall_pairs, args.recall_queries)
    say(describe(args.data, dataset))
    max_iters, eval_interval = schedule(args, dataset, proc.world_size)

    # model: built from the flags, with the same initial weights in every process
    torch.manual_seed(args.seed)
    model_config = model_config_from_args(args, dataset.tokenizer.vocab_size)
    model = build_model(args.arch, fast=args.fast, **model_config)  # fast=False: the lesson files alone
    n_params = count_params(model)
    say(f"params: {n_params}")
    check_carry_state(args, model, dataset, proc.world_size)
    if args.dry_run:
        return {"params": n_params}
    model.to(proc.device)

    optimizer = configure_optimizer(model, args, proc.device)

    # the output folder, held by this run alone; a resumed run takes back everything it saved
    out_dir = Path(args.out_dir)
    lock = claim_out_dir(out_dir, args) if proc.master else None
    try:
        torch.manual_seed(args.seed + proc.rank)  # dropout masks differ across processes
        run = Progress()
        if args.resume:
            run = resume(out_dir, args, model, optimizer, dataset, proc)
            say(f"resuming from {args.resume} at step {run.step} (best val loss {run.best_val_loss:.4f})")
        if proc.master:
            trim_log(out_dir / "log.jsonl", run.step)  # a killed run may have logged past its checkpoint
            write_json(out_dir / "config.json", {
                "args": vars(args), "arch": args.arch, "model_config": model_config_dict(model), "params": n_params,
                "max_iters": max_iters, "world_size": proc.world_size, "data": dataset.identity,
                "hardware": hardware(proc.device), "torch": torch.__version__})
        summary = train(model, optimizer, dataset, args, proc, run, max_iters, eval_interval)
    finally:
        if lock is not None:
            lock.release()
    summary["params"] = n_params

    # the end: the numbers, and what the model writes now
    say(f"done: best val loss {run.best_val_loss:.4f} after {run.step} steps, {summary['tokens']:,} tokens, "
        f"{summary['tokens_per_s']:,.0f} tokens/s")
    if proc.master and args.sample_tokens > 0:
        prompt = torch.tensor([dataset.tokenizer.start_ids()], device=proc.device)
        say("sample:\n" + dataset.tokenizer.decode(generate(model, prompt, args.sample_tokens)[0].tolist()))
    proc.finish()
    return summary


def configure_optimizer(model, args, device):
    """AdamW; weight decay on weight matrices only (biases, norms and those marked no_weight_decay do not decay)."""
    decays = lambda p: p.dim() >= 2 and not getattr(p, "no_weight_decay", False)  # noqa: E731
    matrices = [p for p in model.parameters() if decays(p)]
    others = [p for p in model.parameters() if not decays(p)]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                              {"params": others, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")


def train(model, optimizer, dataset, args, proc, run, max_iters, eval_interval):
    """The loop: evaluate and save -> one optimiser step -> log -> stop. Returns a summary dict."""
    out_dir = Path(args.out_dir)
    trained = torch.compile(model) if args.compile else model
    trained = proc.wrap(trained)
    autocast = autocast_for(proc.device, args.amp)  # bfloat16 where the GPU has it natively, else float32
    eval_data = {split: dataset.eval_batches(split, args.batch_size, args.eval_iters) for split in ("train", "val")}
    tokens_per_step = args.batch_size * args.block_size * proc.world_size
    started = time.time() - run.elapsed_s
    recent_losses, smoothed = [], None
    bar = tqdm(total=max_iters, initial=run.step, disable=not (proc.master and args.progress),
               dynamic_ncols=True, leave=False)
    model.train()
    with stop_signals() as stop_requested:
        try:
            while True:
                # evaluate on fixed batches; keep the best model (ckpt.pt) and the latest state (last.pt)
                # (a resumed run has already evaluated the step it starts from)
                if (run.step % eval_interval == 0 or run.step == max_iters) and run.step != run.last_eval_step:
                    run.last_eval_step, run.elapsed_s = run.step, time.time() - started
                    lr = get_lr(min(run.step, max_iters - 1), args, max_iters)  # the rate of the step about to run
                    metrics = evaluate_and_save(model, optimizer, dataset, args, proc, run, eval_data, autocast, lr)
                    if metrics:
                        bar.write(f"step {run.step:>6}: train loss {metrics['train_loss']:.4f}, "
                                  f"val loss {metrics['val_loss']:.4f}")
                if run.step >= max_iters:
                    break

                # one optimiser step at the scheduled learning rate
                tick = time.time()
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(run.step, args, max_iters)
                x, y, state = next_batch(model, dataset, args, run, proc.device)
                with autocast:
                    _, loss = trained(x, y) if state is None else trained(x, y, state=state)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                recent_losses.append(loss.detach())

                # log: the host reads the losses only every log_interval steps, so the device never waits between;
                # a lone process stops at once when asked, several agree on it at the next log step
                if run.step % args.log_interval == 0 or run.step == max_iters or (stop_requested and not proc.distributed):
                    losses, stop = proc.read_losses(recent_losses, bool(stop_requested))
                    recent_losses = []
                    check_finite(losses, run.step)
                    smoothed = losses[-1] if smoothed is None else 0.9 * smoothed + 0.1 * losses[-1]
                    bar.set_postfix(loss=f"{smoothed:.4f}", best_val=f"{run.best_val_loss:.4f}")
                    if stop:  # Ctrl-C or SIGTERM (in any process): save where we are, then leave as Ctrl-C does
                        run.elapsed_s = time.time() - started
                        save_state(["last.pt"], model, optimizer, dataset, args, proc, run)
                        raise KeyboardInterrupt
                run.train_time_s += time.time() - tick
                bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            if proc.master:  # a second Ctrl-C may have cut the save short: say what last.pt really holds
                saved = load_checkpoint(out_dir / "last.pt")["step"] if (out_dir / "last.pt").exists() else 0
                print(f"stopped; last.pt holds step {saved}. Resume with: python train.py --out-dir {out_dir} --resume")
            raise SystemExit(130)
        except Diverged as error:
            bar.close()
            raise TrainingDiverged(f"training diverged: {error}. ckpt.pt (best val loss {run.best_val_loss:.4f}) "
                                   "is untouched; try a lower --lr") from None
    bar.close()
    tokens = run.step * tokens_per_step
    return {"best_val_loss": run.best_val_loss, "steps": run.step, "tokens": tokens, "train_time_s": run.train_time_s,
            "tokens_per_s": tokens / max(run.train_time_s, 1e-9), "out_dir": str(out_dir)}


def next_batch(model, dataset, args, run, device):
    """The next training batch (x, y) on the device, and the state its rows start from (None: each from scratch).
    With --carry-state each row reads on through its own stretch of the text from where its last window ended,
    the gradient cut between windows (how char-rnn trained); the state is saved with the run, so resuming is exact."""
    if not args.carry_state:
        x, y = dataset.get_batch(args.batch_size)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), None
    x, y, fresh = dataset.lane_batch(args.batch_size, run.step)
    if fresh:  # the lanes start from the beginning of their stretches: so does the state
        run.carried = model.init_state(args.batch_size, device)
    return x.to(device), y.to(device), run.carried


def evaluate_and_save(model, optimizer, dataset, args, proc, run, eval_data, autocast, lr):
    """Evaluate, log and write ckpt.pt (if the best so far) and last.pt; the metrics, in the main process only."""
    rng_states = proc.gather(rng_state(dataset, proc.device))  # every process takes part in this
    # the plain model, not the DDP wrapper: evaluation needs no synchronisation between processes
    metrics = estimate_loss(model, eval_data, proc.device, autocast) if proc.master else None
    finite = proc.gather(metrics is None or math.isfinite(metrics["val_loss"]))
    if not all(finite):  # every process learns it, so none waits for the others forever
        raise Diverged(f"validation loss is {metrics['val_loss'] if metrics else 'not finite'} at step {run.step}")
    if not proc.master:
        return None
    log_line(Path(args.out_dir) / "log.jsonl", run, args.batch_size * args.block_size * proc.world_size, lr, metrics)
    names = ["last.pt"] + ([f"step-{run.step}.pt"] if run.step in args.snapshots else [])
    if metrics["val_loss"] < run.best_val_loss:
        run.best_val_loss = metrics["val_loss"]
        names.insert(0, "ckpt.pt")  # the best model first: a crash between the two leaves last.pt older, never newer
    save_state(names, model, optimizer, dataset, args, proc, run, rng_states)
    return metrics


def check_finite(losses, step):
    """Stop at the first NaN or infinite loss, naming its step (losses are the last len(losses) steps')."""
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            raise Diverged(f"loss became {value} at step {step - len(losses) + i + 1}")


@torch.no_grad()
def estimate_loss(model, eval_data, device, autocast):
    """Mean loss and next-token accuracy (scored targets only) on the same fixed batches every time."""
    model.eval()
    out = {}
    for split, batches in eval_data.items():
        losses, correct, scored = [], 0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast:
                logits, loss = model(x, y)
            losses.append(loss.item())
            mask = y != IGNORE
            correct += (logits.argmax(-1) == y)[mask].sum().item()
            scored += mask.sum().item()
        out[f"{split}_loss"] = sum(losses) / len(losses)
        out[f"{split}_acc"] = correct / max(scored, 1)
    model.train()
    return out


def get_lr(step, args, max_iters):
    # 1) linear warmup
    if step < args.warmup_iters:
        return args.lr * (step + 1) / (args.warmup_iters + 1)
    # 2) constant after warmup
    if args.lr_schedule == "constant":
        return args.lr
    # 3) cosine decay from lr to lr/10 at the last step
    progress = min(1.0, (step - args.warmup_iters) / max(1, max_iters - args.warmup_iters))
    return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.lr / 10)


def schedule(args, dataset, world_size):
    """How many steps in all, and how often to evaluate (--epochs and --eval-interval 0 count in epochs)."""
    per_epoch = None
    if args.epochs or args.eval_interval == 0:
        per_epoch = max(1, dataset.steps_per_epoch(args.batch_size) // world_size)
    max_iters = math.ceil(args.epochs * per_epoch) if args.epochs else args.max_iters
    for name, value in (("--batch-size", args.batch_size), ("--max-iters", max_iters), ("--eval-iters", args.eval_iters),
                        ("--log-interval", args.log_interval)):
        if value <= 0:
            raise UserError(f"{name} must be positive (got {value})")
    eval_interval = args.eval_interval or per_epoch
    if any(step % eval_interval or not 0 < step <= max_iters for step in args.snapshots):
        raise UserError(f"--snapshots are kept at evaluations: steps up to {max_iters} in multiples of {eval_interval}")
    return max_iters, eval_interval


# -----------------------------------------------------------------------------
# flags


def build_parser():
    p = Parser(prog="train.py", description="Train New-LLM, the context stack or a Transformer.")
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare",
                   help="'shakespeare' or 'seed-sentences' (downloaded once), 'recall', or a UTF-8 text file")
    g.add_argument("--tokenizer", default="char", choices=["char", "word"], help="characters, or lower-cased whitespace words")
    g.add_argument("--vocab-size", type=int, default=1000, help="word tokenizer: entries including <PAD> <UNK> <BOS> <EOS>")
    g.add_argument("--sentences", action=bool_flag, default=False, help="one line per sequence, padded (the report's setup)")
    g.add_argument("--recall-vocab", type=int, default=256, help="recall task: vocabulary (keys in the lower half, values in the upper)")
    g.add_argument("--recall-pairs", type=int_list, default=[8],
                   help="recall task: key-value pairs per sequence; a list (4,8,16) trains on a mix")
    g.add_argument("--recall-queries", type=int, default=8, help="recall task: queries per sequence")

    g = p.add_argument_group("model (unset flags take the architecture's defaults: newllm.py, stack.py, transformer.py)")
    g.add_argument("--arch", default="newllm", choices=list(ARCHS), help="architecture")
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration (presets.py); flags beside it override it")
    g.add_argument("--block-size", type=int, default=64, help="tokens per training sequence")
    g.add_argument("--embed-dim", type=int, help="E: embedding / residual width")
    g.add_argument("--context-dim", type=int, help="newllm, stack: C, the size of the context (vector, or q/k/v width)")
    g.add_argument("--hidden-dim", type=int, help="H: FNN width (newllm) or MLP width (stack, transformer)")
    g.add_argument("--layers", type=int, help="FNN depth (newllm), blocks (stack, transformer)")
    g.add_argument("--heads", type=int, help="attention heads (transformer, the stack's hybrid window)")
    g.add_argument("--dropout", type=float, help="dropout probability")
    g.add_argument("--mixer", choices=["vector", "matrix", "mamba"],
                   help="stack: a context vector, delta-rule context matrices, or Mamba's state space")
    g.add_argument("--state-dim", type=int, help="stack, mamba mixer: N, state numbers per channel")
    g.add_argument("--context-heads", type=int, help="stack, matrix mixer: heads, each a (C/heads) x key-dim matrix")
    g.add_argument("--key-dim", type=int, help="stack, matrix mixer: key and query width per head (default C/heads)")
    g.add_argument("--context-norm", action=bool_flag,
                   help="newllm: LayerNorm on the context after every update; stack: on what the memory returns")
    g.add_argument("--gate", action=bool_flag,
                   help="newllm: keep gate read from h_t; stack: keep gate read from the input, with a floor")
    g.add_argument("--timescales", action=bool_flag, help="stack, vector mixer: per-channel gate floors, fast and slow")
    g.add_argument("--short-conv", type=int, help="stack: causal depthwise conv width before each context (0 = off)")
    g.add_argument("--local-window", type=int, help="stack: hybrid attention over the last W positions (0 = off)")
    g.add_argument("--pos-embed", action=bool_flag, help="newllm, stack: learned position embedding (caps the length)")
    g.add_argument("--post-norm", action=bool_flag, help="transformer: LayerNorm after each residual sum (the report's)")
    g.add_argument("--init", choices=["gpt2", "torch"], help="transformer: GPT-2's N(0, 0.02) init or PyTorch's defaults")

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step (per process)")
    g.add_argument("--max-iters", type=int, default=400, help="optimizer steps")
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
    g.add_argument("--carry-state", action=bool_flag, default=False,
                   help="stack: each batch row reads on from the state its last window ended in (gradient cut)")
    g.add_argument("--snapshots", type=int_list, default=[], help="also keep the model at these steps (step-N.pt)")
    g.add_argument("--seed", type=int, default=1337, help="seed for initialisation, batches and dropout")

    g = p.add_argument_group("system and output")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--amp", action=bool_flag, default=True,
                   help="bfloat16 autocast on a CUDA GPU that has native bfloat16 (else float32, said in one line)")
    g.add_argument("--compile", action=bool_flag, default=False, help="torch.compile the model")
    g.add_argument("--fast", action=bool_flag, default=True,
                   help="use fast.py's engine (--no-fast: the models exactly as the lesson files write them)")
    g.add_argument("--out-dir", help="where the run's files go (default runs/<preset or arch>)")
    g.add_argument("--resume", nargs="?", const="last.pt", metavar="CHECKPOINT",
                   help="continue the run in --out-dir from last.pt (or from the checkpoint named, e.g. ckpt.pt)")
    g.add_argument("--new-data", action="store_true", help="with --resume: continue on a different text on purpose")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    g.add_argument("--dry-run", action="store_true", help="build the model, print 'params: N' and exit")
    g.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate at the end (0 = none)")
    g.add_argument("--progress", action=bool_flag, default=True, help="show a progress bar")
    return p


def int_list(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


ONE_OFF_FLAGS = ("resume", "new_data", "overwrite", "dry_run")  # about this invocation, not the run: never inherited


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
        saved = read_json(config_path).get("args")
        if not isinstance(saved, dict):
            raise UserError(f"{config_path} was not written by train.py: nothing to resume")
        if "--arch" in (argv if argv is not None else sys.argv[1:]) and args.arch != saved["arch"]:
            raise UserError(f"{args.out_dir} holds a {saved['arch']} run, but --arch {args.arch} was asked for")
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ONE_OFF_FLAGS})
        args = parser.parse_args(argv)
    check_training_flags(args)
    return args


def check_training_flags(args):
    """The optimiser's and the schedule's settings, checked before anything is built or written."""
    if args.epochs is not None and not args.epochs > 0:
        raise UserError(f"--epochs must be positive (got {args.epochs})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive number (got {args.lr})")
    if not 0 <= args.beta2 < 1:
        raise UserError(f"--beta2 must be in [0, 1) (got {args.beta2})")
    check_seed(args.seed)
    for name in ("weight_decay", "grad_clip", "warmup_iters", "eval_interval"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {value})")


MODEL_FLAGS = {f.name for config_class, _ in ARCHS.values() for f in fields(config_class)} - {"vocab_size"}


def check_carry_state(args, model, dataset, world_size):
    """--carry-state needs a model that reads on from a state, a text read as one stream, and one process."""
    if not args.carry_state:
        return
    if args.arch != "stack" or model.config.local_window or model.config.pos_embed:
        raise UserError("--carry-state is for --arch stack without --local-window or --pos-embed: "
                        "only a fixed-size state can be carried from window to window")
    if not hasattr(dataset, "lane_batch"):
        raise UserError("--carry-state reads the text as one stream: not with --sentences or --data recall")
    if world_size > 1 or args.compile:
        raise UserError("--carry-state runs in one process and without --compile")
    dataset.lane_batch(args.batch_size, 0)  # a text too short for its lanes fails here, before anything is written


def model_config_from_args(args, vocab_size):
    """The architecture's config fields that were set; a flag it does not have is an error."""
    config_class, _ = ARCHS[args.arch]
    names = {f.name for f in fields(config_class)}
    given = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - names)
    if foreign:
        as_flags = lambda names: ", ".join("--" + name.replace("_", "-") for name in names)  # noqa: E731
        preset = PRESETS.get(args.preset, {})
        from_preset = [name for name in foreign if name in preset]
        if preset.get("arch") != args.arch and from_preset:
            raise UserError(f"--preset {args.preset} is made for --arch {preset['arch']}: its {as_flags(from_preset)} "
                            f"do(es) not apply to --arch {args.arch}; "
                            f"choose a preset for --arch {args.arch} or drop --arch")
        raise UserError(f"{as_flags(foreign)} do(es) not apply to --arch {args.arch}")
    return {**{k: v for k, v in given.items() if k in names}, "vocab_size": vocab_size}


if __name__ == "__main__":
    run_script(main, io_note="; saved checkpoints are intact")
