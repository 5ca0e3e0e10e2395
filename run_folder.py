"""
A run's folder, and the files in it that survive anything: every write goes to a temporary
file that is renamed into place, the folder is locked for one process at a time, a
checkpoint is checked against its checksums before it is loaded, a resumed run is checked
to be the same run on the same text, and Ctrl-C saves the latest state before stopping.
train.py calls these by name; a first reading of it can skip this file.

A run leaves in its folder: config.json (every setting), log.jsonl (one line per
evaluation), ckpt.pt (the best validation loss) and last.pt (the latest state, for --resume).
What a checkpoint holds:
  arch, model_config   enough to rebuild the model alone (models.model_from_checkpoint)
  model, optimizer     weights and AdamW state
  tokenizer, data      the vocabulary, and the identity of the text it was trained on
  step, best_val_loss, last_eval_step, elapsed_s, train_time_s    where the run stands (Progress)
  carried              --carry-state: the model state the last training batch ended in (else None)
  rng                  every random state that decides the next batch and dropout mask (CPU tensors)
  args                 the flags of the run
  format               the layout's number (FORMAT)

test_train.py kills writers at random moments to show that nothing is ever half-written.
"""

import json
import os
import re
import signal
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from cli import UserError
from models import model_config_dict

LEFTOVER = re.compile(r".+\.(pt|json|jsonl)\.\d+\.tmp")  # atomic_write's temporary names for a run's files
FORMAT = 2  # the checkpoint layout's number; a checkpoint of another layout is refused

try:  # the lock: flock on POSIX, a locked byte on Windows; either is released by the OS when a process dies
    import fcntl

    def _try_lock(handle):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:
    import msvcrt

    def _try_lock(handle):
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)


def atomic_write(path, write):
    """Call write(file) on a temporary file in the same folder, flush it to disk, then rename it to path.

    os.replace is atomic on POSIX and Windows, so a process killed at any moment
    leaves either the old file or the new one, never half of one. The temporary
    name carries the process id, so two writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path):
    """A run's config.json or summary.json; one that cannot be read (cut short by a full disk, edited) is a
    UserError."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read ({error}); restore it, or start the run again with --overwrite") \
            from None


def read_log(path):
    """A run's log.jsonl, one evaluation per line (train.log_line appends them); a line that cannot be read (a
    write cut short) is a UserError."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} has a line that cannot be read ({error}); remove it, then go on") from None


class UnreadableCheckpoint(UserError):
    """A checkpoint file that is missing or cannot be read (truncated, overwritten, not a checkpoint at all)."""


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save({**checkpoint, "format": FORMAT}, f))


def load_checkpoint(path):
    """Load a checkpoint written by save_checkpoint, onto the CPU (random states must stay there; the weights
    move to the model's device as they load); anything else is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(f"no checkpoint at {path}")
    try:
        # torch.save writes a zip that records a CRC-32 of every entry, but torch.load does not check them:
        # a flipped bit in the weights would load silently. zipfile checks them all (~5 ms for 10 MB).
        with zipfile.ZipFile(path) as archive:
            damaged_entry = archive.testzip()
        if damaged_entry is not None:
            raise ValueError(f"{damaged_entry} fails its checksum")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever zipfile or torch.load trips over in a file that is not a whole checkpoint
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        if "Weights only load failed" in reason:  # torch's advice about its own settings would mislead here
            reason = "torch.load refused its contents"
        raise UnreadableCheckpoint(f"checkpoint {path} is damaged or not a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"arch", "model_config", "model", "tokenizer"} <= checkpoint.keys():
        raise UserError(f"{path} is not a New-LLM lab checkpoint")
    if checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} was written by an earlier version of this lab (layout {checkpoint.get('format', 1)}, "
                        f"this one reads {FORMAT}): train it again")
    return checkpoint


class FolderLock:
    """Hold out_dir/.lock for as long as this object lives: one live run per output folder.

    The lock belongs to the process, so the operating system drops it when the
    process ends in any way (kill -9 included): a stale lock cannot exist. A
    second run finds the lock held and is refused before it changes anything.
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"
        self.handle = open(self.path, "a+")
        try:
            _try_lock(self.handle)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise UserError(f"{out_dir} is in use by another run (process {holder}); "
                            "wait for it to finish, stop it, or choose another --out-dir") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        for leftover in Path(out_dir).glob("*.tmp"):  # half-written files of a killed run (atomic_write's names)
            if LEFTOVER.fullmatch(leftover.name):
                leftover.unlink()

    def release(self):
        self.handle.close()


# -----------------------------------------------------------------------------
# the run: claiming the folder, saving, resuming, the log


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint and taken back on --resume."""
    step: int = 0
    best_val_loss: float = float("inf")
    last_eval_step: int = -1
    elapsed_s: float = 0.0        # wall-clock time, evaluation included
    train_time_s: float = 0.0     # time spent in optimiser steps only
    carried: Optional[dict] = None  # --carry-state: the model state the last training batch ended in


def claim_out_dir(out_dir, args):
    """Lock --out-dir for this run, then refuse to mix two runs in it unless resuming or overwriting."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out_dir}: {error.strerror}") from None
    lock = FolderLock(out_dir)  # a second live run stops here, before anything is touched
    run_files = [out_dir / name for name in ("config.json", "log.jsonl", "ckpt.pt", "last.pt")]
    # config.json alone is a run that ended before it saved anything (out of memory at its first step, say):
    # there is nothing in it to continue or to lose, so a new run simply replaces it
    if any(f.exists() for f in run_files[1:]) and not args.resume:
        if not args.overwrite:
            lock.release()
            raise UserError(f"{out_dir} already holds a run: add --resume to continue it or --overwrite to replace it")
        for f in run_files:
            f.unlink(missing_ok=True)
    return lock


def make_checkpoint(model, optimizer, dataset, args, run, rng_states):
    """Everything needed to use the model alone, or to continue the run exactly (this file's docstring)."""
    return {"arch": args.arch, "model_config": model_config_dict(model), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "tokenizer": dataset.tokenizer.state_dict(),
            "data": dataset.identity, **asdict(run), "rng": rng_states, "args": vars(args)}


def resume(out_dir, args, model, optimizer, dataset, proc):
    """Load the run's checkpoint into model and optimiser; check it is the same run and the same data."""
    path = out_dir / args.resume
    try:
        checkpoint = load_checkpoint(path)
    except UnreadableCheckpoint as error:
        raise UserError(f"{error}. {intact_alternative(out_dir, path)}") from None
    check_same_run(checkpoint, args, model, dataset)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    states = checkpoint["rng"]
    if len(states) == proc.world_size:
        set_rng_state(states[proc.rank], dataset, proc.device)
    elif proc.master:
        print(f"note: the run was written by {len(states)} process(es), not {proc.world_size}: batches will differ")
    run = Progress(**{f.name: checkpoint.get(f.name, f.default) for f in fields(Progress)})
    run.carried = on_device(run.carried, proc.device)
    return run


def on_device(state, device):
    """A model state (dicts and lists of tensors and numbers, as init_state makes them) moved to the device."""
    if isinstance(state, dict):
        return {key: on_device(value, device) for key, value in state.items()}
    if isinstance(state, list):
        return [on_device(value, device) for value in state]
    return state.to(device) if torch.is_tensor(state) else state


def intact_alternative(out_dir, damaged):
    """The sentence that says which other checkpoint in the folder is whole, and how to continue from it."""
    for name in ("last.pt", "ckpt.pt"):
        other = out_dir / name
        if other != damaged and other.is_file():
            try:
                step = load_checkpoint(other)["step"]
            except UserError:
                continue
            return (f"{other} (step {step}) is intact: continue from it with "
                    f"python train.py --out-dir {out_dir} --resume {name}")
    return f"No intact checkpoint is left in {out_dir}: start again with --overwrite"


def check_same_run(checkpoint, args, model, dataset):
    """The checkpoint must hold this architecture, shape and vocabulary, and (unless --new-data) this text."""
    if checkpoint["arch"] != args.arch:
        raise UserError(f"the checkpoint holds a {checkpoint['arch']} model, but --arch {args.arch} was asked for")
    if checkpoint["tokenizer"] != dataset.tokenizer.state_dict():
        raise UserError("the checkpoint's vocabulary differs from this data's: "
                        "resume with the data and tokenizer it was trained on")
    differ = [f"{k} {checkpoint['model_config'].get(k)} vs {v}" for k, v in model_config_dict(model).items()
              if checkpoint["model_config"].get(k) != v]
    if differ:
        raise UserError(f"the checkpoint's model differs from the flags ({', '.join(differ)})")
    trained_on, now = checkpoint["data"], dataset.identity
    if trained_on != now and not args.new_data:
        raise UserError(f"this run was trained on {identity_text(trained_on)}, but the data now is "
                        f"{identity_text(now)}: pass the same --data, or add --new-data to continue on it on purpose")


def identity_text(identity):
    if "sha256" in identity:
        return f"{identity['data']} ({identity['chars']:,} characters, SHA-256 {identity['sha256'][:12]})"
    return ", ".join(f"{k} {v}" for k, v in identity.items())


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def log_line(path, run, tokens_per_step, lr, metrics):
    """Append one evaluation to log.jsonl (plot.py and experiments.py read it)."""
    record = {"step": run.step, "tokens": run.step * tokens_per_step, "time_s": round(run.elapsed_s, 2),
              "train_time_s": round(run.train_time_s, 2), "lr": lr, **metrics}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path, step):
    """Keep the log lines up to `step` (a run killed after logging, before saving, wrote one more)."""
    if not path.exists():
        return
    kept = "".join(json.dumps(record) + "\n" for record in read_log(path) if record["step"] <= step)
    atomic_write(path, lambda f: f.write(kept.encode()))


def save_state(names, model, optimizer, dataset, args, proc, run, rng_states=None):
    """Write the run's state under each name in --out-dir (every process's random state, gathered)."""
    rng_states = rng_states or proc.gather(rng_state(dataset, proc.device))
    if proc.master:
        checkpoint = make_checkpoint(model, optimizer, dataset, args, run, rng_states)
        for name in names:
            save_checkpoint(Path(args.out_dir) / name, checkpoint)


# -----------------------------------------------------------------------------
# random state and signals


def rng_state(dataset, device):
    """Everything random that decides the next batch and the next dropout mask."""
    state = {"torch": torch.get_rng_state(), "data": dataset.state_dict()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, dataset, device):
    torch.set_rng_state(state["torch"])
    dataset.load_state_dict(state["data"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Diverged(Exception):
    pass


class TrainingDiverged(UserError):
    """What a user sees when the loss stops being finite (a learning-rate sweep records it and goes on)."""


@contextmanager
def stop_signals():
    """Ctrl-C or SIGTERM sets a flag: the loop finishes its step, saves last.pt and stops.
    A second Ctrl-C stops at once."""
    requested = []

    def request_stop(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
