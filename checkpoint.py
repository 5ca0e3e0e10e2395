"""
Files that survive a crash: every write goes to a temporary file that is renamed into
place, a run's folder is locked for one process at a time, a checkpoint is checked against
its checksums before it is loaded, and a checkpoint, config or log that cannot be read
says so in one line.

What a checkpoint holds (train.py writes it; sample.py and the studies read it):
  arch, model_config   enough to rebuild the model alone (models.model_from_checkpoint)
  model, optimizer     weights and AdamW state
  tokenizer, data      the vocabulary, and the identity of the text it was trained on
  step, best_val_loss, last_eval_step, elapsed_s, train_time_s    where the run stands
  rng                  every random state that decides the next batch and dropout mask
  args                 the flags of the run
  format               the layout's number (FORMAT); models.model_from_checkpoint reads older ones too

Used by train.py (writing), sample.py, plot.py and the studies (reading); test_train.py kills
writers at random moments to show that nothing is ever half-written.
"""

import json
import os
import re
import zipfile
from pathlib import Path

import torch

from cli import UserError

LEFTOVER = re.compile(r".+\.(pt|json|jsonl)\.\d+\.tmp")  # atomic_write's temporary names for a run's files
FORMAT = 2  # format 1 (no number) kept both New-LLM models under arch "newllm"; models.py converts it

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


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; anything else is a UserError."""
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
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # whatever zipfile or torch.load trips over in a file that is not a whole checkpoint
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        if "Weights only load failed" in reason:  # torch's advice about its own settings would mislead here
            reason = "torch.load refused its contents"
        raise UnreadableCheckpoint(f"checkpoint {path} is damaged or not a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"arch", "model_config", "model", "tokenizer"} <= checkpoint.keys():
        raise UserError(f"{path} is not a New-LLM lab checkpoint")
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
