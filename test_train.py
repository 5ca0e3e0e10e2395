"""
The scripts as a user meets them: presets, dry runs, exact resume, interrupts,
divergence, atomic checkpoints, data-parallel training, and one clear line for
every bad input (tried through the real command line, in a subprocess).

    python -m pytest -q test_train.py
"""

import importlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

try:
    import resource
except ImportError:  # Windows
    resource = None

import data
import train
from cli import UserError, run_script
from models import build_model
from processes import Processes
from run_folder import FolderLock, load_checkpoint, resume, save_checkpoint
from conftest import write_corpus
from test_models import seed_params, transformer_params

REPO = Path(__file__).resolve().parent
TINY = ["--embed-dim", "16", "--context-dim", "16", "--hidden-dim", "32", "--layers", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--sample-tokens", "0", "--no-progress"]


def cli(*args, timeout=180):
    """`python args...` in a new process, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def run(script, *args):
    """What `python script args...` does, inside this process: the script's main() under run_script, with
    stdout, stderr and the exit code captured. The same code path as cli() without a new interpreter
    (importing torch again costs seconds), for the many cases that need no process of their own."""
    module = importlib.import_module(script.removesuffix(".py"))
    argv = [str(a) for a in args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_script(lambda: module.main(argv))
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, fragment):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", ["to", "be", "or", "not", "that", "is"], 400)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A finished tiny New-LLM run to resume, sample from and damage."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run("train.py", "--data", corpus, "--out-dir", out, "--max-iters", "4", "--eval-interval", "2", *TINY)
    assert result.returncode == 0, result.stderr
    return out


# -----------------------------------------------------------------------------
# presets and dry runs


def test_seed_presets_have_the_reports_parameter_counts(word_corpus, capsys):
    expected = {"seed-baseline": 3009768, "seed-exp1": 3272168, "seed-exp2": 12047848, "seed-exp3": 12047848,
                "seed-transformer": 5260264}
    for preset, params in expected.items():
        assert train.main(["--preset", preset, "--data", str(word_corpus), "--dry-run"])["params"] == params
        assert f"params: {params}\n" in capsys.readouterr().out


def test_dry_run_params_equal_the_formula(corpus):
    V, T = len(set(corpus.read_text())), train.parse_args([]).block_size  # the position table has T rows
    assert train.main(["--data", str(corpus), "--dry-run"])["params"] == seed_params(V, T, 256, 256, 512, 8)
    assert train.main(["--arch", "transformer", "--data", str(corpus), "--dry-run"])["params"] \
        == transformer_params(V, T, 256, 3, 1024)


def test_a_flag_overrides_its_preset():
    args = train.parse_args(["--preset", "seed-baseline", "--context-dim", "128", "--lr", "0.01"])
    assert (args.context_dim, args.lr, args.hidden_dim, args.sentences) == (128, 0.01, 512, True)


# -----------------------------------------------------------------------------
# one clear line for every bad input


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"), (b"  \n\t \n", "only whitespace"), (b"\x00\x01\x02binary", "binary"),
    ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"), (b"too short", "too short")])
def test_bad_corpus_files(tmp_path, content, fragment):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert_one_line_error(run("train.py", "--data", path, "--out-dir", tmp_path / "run"), fragment)


@pytest.mark.parametrize("flags,fragment", [
    (["--data", "no/such/file.txt"], "does not exist"),
    (["--arch", "rnn"], "invalid choice"),
    (["--preset", "seed-huge"], "invalid choice"),
    (["--arch", "transformer", "--embed-dim", "30", "--heads", "4"], "must divide"),
    (["--embed-dim", "0"], "must be positive"),
    (["--layers", "-2"], "must be positive"),
    (["--block-size", "0"], "must be positive"),
    (["--arch", "transformer", "--gate"], "do(es) not apply"),
    (["--short-conv", "4"], "do(es) not apply to --arch newllm"),
    (["--preset", "best-newllm-cpu", "--arch", "transformer"], "--preset best-newllm-cpu is made for --arch stack"),
    (["--arch", "stack", "--mixer", "matrix", "--context-dim", "30", "--context-heads", "4"], "must divide"),
    (["--arch", "stack", "--context-heads", "2"], "add --mixer matrix"),
    (["--arch", "stack", "--key-dim", "8"], "add --mixer matrix"),
    (["--arch", "stack", "--mixer", "matrix", "--key-dim", "0"], "must be positive"),
    (["--batch-size", "0"], "must be positive"),
    (["--max-iters", "ten"], "invalid int value"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--eval-interval", "-1"], "--eval-interval must be 0 or more"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--seed", str(2**70)], "--seed must be in"),
    (["--max-iters", "10", "--eval-interval", "5", "--snapshots", "7"], "in multiples of 5"),
    (["--max-iters", "10", "--eval-interval", "5", "--snapshots", "15"], "steps up to 10"),
    (["--arch", "stack", "--state-dim", "0"], "--state-dim must be positive"),
    (["--carry-state"], "--carry-state is for --arch stack"),
    (["--arch", "stack", "--local-window", "4", "--carry-state"], "--carry-state is for --arch stack without"),
    (["--arch", "stack", "--carry-state", "--compile"], "without --compile"),
    (["--arch", "stack", "--carry-state", "--data", "recall"], "reads the text as one stream"),
    (["--arch", "stack", "--carry-state", "--batch-size", "5000"], "needs at least 2 windows"),
])
def test_bad_flags(corpus, tmp_path, flags, fragment):
    assert_one_line_error(run("train.py", "--data", corpus, "--out-dir", tmp_path / "run", *flags), fragment)


def test_a_real_command_line_prints_one_line_too(corpus, tmp_path):
    """The cases above run main() in this process; here the interpreter itself, for a bad flag and a bad file."""
    assert_one_line_error(cli("train.py", "--data", corpus, "--max-iters", "ten"), "invalid int value")
    assert_one_line_error(cli("sample.py", "--ckpt", tmp_path / "none.pt"), "no checkpoint")


@pytest.mark.parametrize("device,available", [("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())])
def test_missing_accelerator(corpus, tmp_path, device, available):
    if available:
        pytest.skip(f"this machine has {device}")
    assert_one_line_error(run("train.py", "--data", corpus, "--device", device, "--out-dir", tmp_path / "r"), device)


def test_out_dir_holding_another_run_is_refused(trained_run, corpus):
    assert_one_line_error(run("train.py", "--data", corpus, "--out-dir", trained_run, *TINY), "already holds a run")


def test_resume_bad_checkpoints(trained_run, corpus, tmp_path):
    assert_one_line_error(run("train.py", "--out-dir", tmp_path / "empty", "--resume"), "nothing to resume")
    assert_one_line_error(run("train.py", "--out-dir", trained_run, "--resume", "--arch", "transformer"),
                          "holds a newllm run")
    assert_one_line_error(run("train.py", "--out-dir", trained_run, "--resume", "--block-size", "32"),
                          "model differs")
    other = write_corpus(tmp_path / "other.txt", ["completely", "different", "letters", "xyz"], 300)
    assert_one_line_error(run("train.py", "--out-dir", trained_run, "--resume", "--data", other), "vocabulary differs")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((trained_run / "config.json").read_text())
    (damaged / "last.pt").write_bytes((trained_run / "last.pt").read_bytes()[:2000])  # truncated
    assert_one_line_error(run("train.py", "--out-dir", damaged, "--resume"), "No intact checkpoint is left")


def test_unreadable_run_files_are_one_line(trained_run, tmp_path):
    """A log cut short mid-line (a full disk) or a config.json written by something else: one line, for
    --resume and for plot.py alike; and an image name matplotlib cannot write is refused before drawing."""
    run_dir = tmp_path / "cut"
    shutil.copytree(trained_run, run_dir)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 9, "val_lo')
    assert_one_line_error(run("train.py", "--out-dir", run_dir, "--resume"), "cannot be read")
    assert_one_line_error(run("plot.py", run_dir), "cannot be read")
    (run_dir / "config.json").write_text('{"model_type": "gpt2"}')
    assert_one_line_error(run("train.py", "--out-dir", run_dir, "--resume"), "was not written by train.py")
    assert_one_line_error(run("plot.py", trained_run, "-o", tmp_path / "curves.xyz"), "name it .png")


def test_files_that_are_not_checkpoints_are_never_a_traceback(trained_run, tmp_path):
    """Whatever a file that is not a whole checkpoint trips over (not a zip, a zip of something else, a real
    checkpoint cut short anywhere, torch's own file of another object, a dict missing the model), the user
    reads one line."""
    import zipfile
    rng = random.Random(0)
    real = (trained_run / "ckpt.pt").read_bytes()
    junk = [bytes(rng.randrange(256) for _ in range(2000)) for _ in range(10)]
    junk += [real[: rng.randrange(1, len(real))] for _ in range(20)]
    for i, contents in enumerate(junk):
        (tmp_path / f"junk{i}.pt").write_bytes(contents)
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as archive:
        archive.writestr("data.pkl", bytes(rng.randrange(256) for _ in range(500)))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    for path in tmp_path.iterdir():
        with pytest.raises(UserError) as refused:
            load_checkpoint(path)
        assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_flipped_bit_anywhere_in_a_checkpoint_is_caught_or_harmless(trained_run, tmp_path):
    """A checkpoint damaged on disk is refused, never loaded with wrong contents. (torch.load alone reads most
    flipped bits in tensor data without complaint; a flip in the zip's metadata, a timestamp say, is harmless.)"""
    intact_bytes = (trained_run / "ckpt.pt").read_bytes()
    intact = load_checkpoint(trained_run / "ckpt.pt")
    rng, refused = random.Random(0), 0
    for i in range(40):
        damaged = bytearray(intact_bytes)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flipped{i}.pt"
        path.write_bytes(damaged)
        try:
            assert same_contents(load_checkpoint(path), intact)
        except UserError as error:
            assert "damaged or not a checkpoint" in str(error)
            refused += 1
    assert refused > 30  # most of the file is tensor data


def same_contents(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_contents(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_contents, a, b))
    return a == b


def test_run_script_turns_an_allocation_failure_into_one_line():
    def main():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit:
        run_script(main)
    assert exit.value.code == 2 and err.getvalue().startswith("error: out of memory") and err.getvalue().count("\n") == 1
    with pytest.raises(RuntimeError):  # any other RuntimeError is a bug, and keeps its traceback
        run_script(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_sample_bad_inputs(trained_run, tmp_path):
    ckpt = trained_run / "ckpt.pt"
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--num-samples", "0"), "--num-samples")
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--temperature", "nan"), "--temperature")
    assert_one_line_error(run("sample.py", "--ckpt", tmp_path / "none.pt"), "no checkpoint")
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--prompt", "Zebra!"), "not in the vocabulary")
    assert_one_line_error(run("sample.py", "--ckpt", ckpt, "--prompt", "to be " * 10), "reads at most")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert_one_line_error(run("sample.py", "--ckpt", junk), "damaged or not a checkpoint")


def test_sample_prints_text(trained_run, corpus):
    """The prompt, then exactly 40 characters of the corpus's alphabet (one token is one character); the same seed
    prints the same text, another seed another text."""
    texts = []
    for seed in (1, 1, 2):
        result = run("sample.py", "--ckpt", trained_run / "ckpt.pt", "--prompt", "to be", "--tokens", "40",
                     "--seed", seed)
        assert result.returncode == 0, result.stderr
        texts.append(result.stdout.removesuffix("\n"))
    assert all(len(text) == 45 and text.startswith("to be") for text in texts)
    assert set("".join(texts)) <= set(corpus.read_text())
    assert texts[0] == texts[1] != texts[2]


# -----------------------------------------------------------------------------
# no lost work


def test_killed_mid_write_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    good = {"arch": "newllm", "model_config": {}, "model": {"w": torch.ones(3)}, "tokenizer": {}}
    save_checkpoint(path, good)

    class FailsHalfway:  # pickling raises after part of the file is written, like a crash or a full disk
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(path, {**good, "model": {"w": torch.zeros(10_000), "x": FailsHalfway()}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_sigkill_mid_write_never_corrupts(tmp_path):
    """Kill a process that rewrites a 40 MB checkpoint in a loop; the file always loads. A kill that lands
    mid-write leaves the half-written temporary file behind (nothing runs after SIGKILL): at least one must,
    or the test has not tested anything."""
    path = tmp_path / "ckpt.pt"
    script = ("import torch, run_folder\n"
              "c = {'arch': 'newllm', 'model_config': {}, 'tokenizer': {}, 'model': {'w': torch.randn(10_000_000)}}\n"
              f"run_folder.save_checkpoint({str(path)!r}, c)\nprint('ready', flush=True)\n"
              f"while True: run_folder.save_checkpoint({str(path)!r}, c)\n")
    mid_write = 0
    for delay in (0.05, 0.3, 0.17, 0.11, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert load_checkpoint(path)["model"]["w"].numel() == 10_000_000
        leftovers = list(tmp_path.glob("ckpt.pt.*.tmp"))
        mid_write += bool(leftovers)
        for leftover in leftovers:
            leftover.unlink()
        if mid_write >= 2:
            break
    assert mid_write >= 1


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_stop_and_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    """SIGTERM mid-run saves last.pt; --resume then reaches the losses of a run never stopped, bit for bit."""
    flags = ["--data", corpus, "--max-iters", "120", "--eval-interval", "20", "--dropout", "0.1", *TINY]
    whole = tmp_path / "whole"
    uninterrupted = background("train.py", "--out-dir", whole, *flags)  # on the other core, meanwhile

    parted = tmp_path / "parted"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", "--out-dir", str(parted), *map(str, flags)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not ((parted / "log.jsonl").exists() and len(read_log(parted)) >= 2) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in stdout
    stopped_at = load_checkpoint(parted / "last.pt")["step"]
    assert 20 <= stopped_at < 120

    result = cli("train.py", "--out-dir", parted, "--resume")
    assert result.returncode == 0 and uninterrupted.wait() == 0, result.stderr
    for a, b in zip(read_log(whole), read_log(parted), strict=True):  # bit for bit
        assert (a["step"], a["val_loss"], a["train_loss"]) == (b["step"], b["val_loss"], b["train_loss"])


def test_snapshots_keep_the_model_as_it_was_at_those_steps(corpus, tmp_path):
    """--snapshots 2,4: step-2.pt and step-4.pt hold the weights of those evaluations (step 4's is last.pt's)."""
    out = tmp_path / "run"
    result = run("train.py", "--data", corpus, "--out-dir", out, *TINY, "--max-iters", "6", "--eval-interval", "2",
                 "--snapshots", "2,4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-2.pt", "step-4.pt"]
    early, middle, last = (load_checkpoint(out / name) for name in ("step-2.pt", "step-4.pt", "last.pt"))
    assert (early["step"], middle["step"], last["step"]) == (2, 4, 6)
    assert not torch.equal(early["model"]["head.weight"], middle["model"]["head.weight"])


def test_a_run_that_carries_its_state_resumes_exactly(corpus, tmp_path):
    """--carry-state keeps the state its last batch ended in with the run: resumed from step 4 (the lanes
    wrap around in between), the run ends with the weights of the run never stopped, bit for bit."""
    flags = ["--data", corpus, *TINY, "--arch", "stack", "--carry-state", "--max-iters", "10", "--eval-interval", "2",
             "--dropout", "0.1", "--batch-size", "64"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert run("train.py", "--out-dir", whole, *flags, "--snapshots", "4").returncode == 0
    windows = (len(data.load_dataset(str(corpus), block_size=16).splits["train"]) - 1) // 64 // 16
    assert 2 <= windows < 10  # the lanes start over (and the state is reset) inside the run
    parted.mkdir()
    shutil.copy(whole / "config.json", parted)
    shutil.copy(whole / "step-4.pt", parted)
    assert load_checkpoint(parted / "step-4.pt")["carried"]["position"] > 0
    result = run("train.py", "--out-dir", parted, "--resume", "step-4.pt")
    assert result.returncode == 0, result.stderr
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parted / "last.pt")
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])


def test_resuming_reads_the_checkpoint_on_the_cpu_whatever_the_device(trained_run, tmp_path):
    """Random states must stay CPU tensors (torch.set_rng_state takes nothing else), so a run resumed on a GPU
    must not load its checkpoint onto the GPU. Driven here with the process's device set to "meta", a device
    every machine has: a checkpoint mapped onto it holds no numbers at all, and resuming would fail."""
    copy = copy_run(trained_run, tmp_path / "run")
    args = train.parse_args(["--out-dir", str(copy), "--resume"])
    dataset = data.load_dataset(args.data, args.tokenizer, args.vocab_size, args.block_size, args.sentences,
                                args.seed, args.recall_vocab, args.recall_pairs, args.recall_queries)
    model = build_model(args.arch, **train.model_config_from_args(args, dataset.tokenizer.vocab_size))
    optimizer = train.configure_optimizer(model, args, torch.device("cpu"))
    progress = resume(copy, args, model, optimizer, dataset, Processes(torch.device("meta")))
    saved = load_checkpoint(copy / "last.pt")
    assert progress.step == saved["step"] == 4
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    assert all(torch.equal(p, saved["model"][name]) for name, p in model.state_dict().items())


def background(*args, stderr=subprocess.DEVNULL):
    """`python args...` started in a new process, not waited for."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def log_size(out):
    path = out / "log.jsonl"
    return path.stat().st_size if path.exists() else 0


def copy_run(run, to):
    to.mkdir()
    for f in run.iterdir():
        if f.name != ".lock":
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_a_damaged_last_pt_names_the_intact_checkpoint_and_the_command(trained_run, tmp_path):
    copy = copy_run(trained_run, tmp_path / "run")
    (copy / "last.pt").write_bytes((copy / "last.pt").read_bytes()[:2000])  # truncated
    result = cli("train.py", "--out-dir", copy, "--resume")
    assert_one_line_error(result, "last.pt is damaged")
    assert "ckpt.pt (step " in result.stderr and f"python train.py --out-dir {copy} --resume ckpt.pt" in result.stderr
    result = run("train.py", "--out-dir", copy, "--resume", "ckpt.pt", "--max-iters", "6")
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_log(copy)] == [0, 2, 4, 6] and load_checkpoint(copy / "last.pt")["step"] == 6


def test_a_run_that_saved_nothing_is_replaced_without_overwrite(trained_run, corpus, tmp_path):
    """A run that failed at its first step left only config.json: the next run needs no --overwrite."""
    out = tmp_path / "failed"
    out.mkdir()
    shutil.copy(trained_run / "config.json", out / "config.json")
    result = run("train.py", "--data", corpus, "--out-dir", out, "--max-iters", "2", *TINY)
    assert result.returncode == 0, result.stderr
    assert read_log(out)


def test_resuming_on_another_text_with_the_same_alphabet_is_refused(trained_run, corpus, tmp_path):
    copy = copy_run(trained_run, tmp_path / "run")
    reversed_text = tmp_path / "reversed.txt"
    reversed_text.write_text(corpus.read_text()[::-1])
    result = cli("train.py", "--out-dir", copy, "--resume", "--data", reversed_text)
    assert_one_line_error(result, "this run was trained on corpus.txt")
    assert "reversed.txt" in result.stderr and "--new-data" in result.stderr
    assert run("train.py", "--out-dir", copy, "--resume", "--data", reversed_text, "--new-data").returncode == 0
    assert json.loads((copy / "config.json").read_text())["data"]["data"] == "reversed.txt"


def test_a_second_live_run_in_the_same_folder_is_refused_and_touches_nothing(corpus, tmp_path):
    out = tmp_path / "busy"
    flags = ["--data", corpus, "--out-dir", out, "--max-iters", "100000", "--eval-interval", "50", *TINY]
    first = subprocess.Popen([sys.executable, "train.py", *map(str, flags)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "last.pt").exists():
            assert first.poll() is None, "the first run died"
            time.sleep(0.05)
        config = (out / "config.json").read_bytes()
        attempts = [background("train.py", *flags, extra, stderr=subprocess.PIPE) for extra in ("--resume", "--overwrite")]
        for attempt in attempts:
            _, stderr = attempt.communicate(timeout=120)
            result = subprocess.CompletedProcess(attempt.args, attempt.returncode, "", stderr)
            assert_one_line_error(result, f"{out} is in use by another run (process {first.pid})")
        assert (out / "config.json").read_bytes() == config and first.poll() is None
    finally:
        first.kill()
        first.wait()
    FolderLock(out).release()  # the operating system let go of the killed run's lock: no stale lock


def test_kill_9_at_any_moment_loses_nothing(corpus, tmp_path):
    """SIGKILL ten times, half of them as a checkpoint is being written, resuming after each: every resume
    starts, the model ends bit-for-bit equal to an uninterrupted run's, and every evaluation is logged once."""
    flags = ["--data", corpus, "--max-iters", "400", "--eval-interval", "4", "--dropout", "0.1", *TINY,
             "--hidden-dim", "256"]  # a checkpoint of ~1 MB: writing it takes long enough to be hit
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = background("train.py", "--out-dir", whole, *flags)  # on the other core, meanwhile
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills, mid_write, rng = 0, 0, random.Random(0)
    while kills < 10:
        resume = ["--resume"] if (killed / "last.pt").exists() else []
        proc = subprocess.Popen([sys.executable, "train.py", "--out-dir", str(killed), *map(str, flags), *resume],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        logged = log_size(killed)
        while not ((killed / "last.pt").exists() and log_size(killed) > logged):  # it is training
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.002)
        if kills % 2 == 0:  # the next evaluation has just been logged: its checkpoints are being written
            logged = log_size(killed)
            while log_size(killed) == logged and proc.poll() is None:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        kills += 1
        mid_write += any(killed.glob("*.tmp"))
    assert cli("train.py", "--out-dir", killed, "--resume").returncode == 0 and uninterrupted.wait() == 0
    assert mid_write >= 1  # at least one kill landed inside a checkpoint write
    a, b = (load_checkpoint(run / "last.pt") for run in (whole, killed))
    assert a["step"] == b["step"] == 400
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [(r["step"], r["val_loss"]) for r in read_log(whole)] == [(r["step"], r["val_loss"]) for r in read_log(killed)]


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
def test_a_full_disk_mid_write_keeps_the_previous_checkpoints(trained_run, tmp_path):
    """A checkpoint write that fails half-way (the file size limit stands in for a full disk) ends with
    one line, and leaves both checkpoints as they were, with no temporary file behind."""
    copy = copy_run(trained_run, tmp_path / "run")
    before = {name: (copy / name).read_bytes() for name in ("ckpt.pt", "last.pt")}
    limit = len(before["last.pt"]) // 2
    result = subprocess.run([sys.executable, "train.py", "--out-dir", str(copy), "--resume", "--max-iters", "8"],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: File too large") and "saved checkpoints are intact" in lines[0]
    assert {name: (copy / name).read_bytes() for name in before} == before
    assert load_checkpoint(copy / "last.pt")["step"] == 4 and not list(copy.glob("*.tmp"))


def test_a_refused_run_touches_no_file_of_the_folder(trained_run, corpus, tmp_path):
    """A run refused for a folder that holds another run leaves the files there as they were, a user's own
    .tmp files included: taking the folder's lock clears only atomic_write's leftovers of a killed run."""
    copy = copy_run(trained_run, tmp_path / "run")
    (copy / "draft.tmp").write_text("mine")
    (copy / "last.pt.4242.tmp").write_bytes(b"half a checkpoint")
    before = {path.name: path.read_bytes() for path in copy.iterdir() if path.name != ".lock"}
    assert_one_line_error(run("train.py", "--data", corpus, "--out-dir", copy, *TINY), "already holds a run")
    assert (copy / "draft.tmp").read_text() == "mine"
    FolderLock(copy).release()
    assert not (copy / "last.pt.4242.tmp").exists() and (copy / "draft.tmp").exists()
    assert all((copy / name).read_bytes() == data for name, data in before.items() if name != "last.pt.4242.tmp")


def test_divergence_stops_and_keeps_the_best_checkpoint(corpus, tmp_path):
    out = tmp_path / "diverged"
    result = run("train.py", "--data", corpus, "--out-dir", out, "--lr", "1e30", "--warmup-iters", "0",
                 "--max-iters", "50", "--eval-interval", "25", *TINY)
    assert_one_line_error(result, "diverged")
    assert "at step" in result.stderr
    best = load_checkpoint(out / "ckpt.pt")
    assert best["step"] == 0 and best["best_val_loss"] < 10


# -----------------------------------------------------------------------------
# the corpus download


class FakeResponse:
    def __init__(self, payload):
        self.payload = payload

    def read(self):
        return self.payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_corrupt_download_is_retried_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data.time, "sleep", lambda seconds: None)
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse(b"trunc"))
    with pytest.raises(UserError, match="size/checksum"):
        data.read_corpus("shakespeare")
    assert len(calls) == 3 and not (tmp_path / "tinyshakespeare.txt").exists()


@pytest.mark.parametrize("name", ["shakespeare", "seed-sentences"])
def test_corrupt_cache_is_downloaded_again(name, tmp_path, monkeypatch):
    text = b"Tiny but true.\n"
    corpus = data.CORPORA[name]
    monkeypatch.setitem(data.CORPORA, name, data.Corpus(corpus.title, corpus.url, len(text), data._sha256(text),
                                                        corpus.file))
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    urls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: urls.append(url) or FakeResponse(text))
    (tmp_path / corpus.file).write_bytes(b"Tiny but tru")  # an interrupted earlier download
    assert data.read_corpus(name) == text.decode()
    assert (tmp_path / corpus.file).read_bytes() == text and urls == [corpus.url]


# -----------------------------------------------------------------------------
# several processes


def test_torchrun_two_cpu_processes(corpus, tmp_path):
    """DistributedDataParallel over gloo: two ranks train, rank 0 alone logs and checkpoints, the loss falls."""
    out = tmp_path / "ddp"
    for attempt in range(2):  # a launch that dies before the first step (torchrun's free port taken meanwhile) once more
        result = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--data", corpus,
                     "--out-dir", out, "--max-iters", "60", "--eval-interval", "30", "--lr", "3e-3", *TINY,
                     "--overwrite", timeout=300)
        if result.returncode == 0 or (out / "log.jsonl").exists():
            break
    assert result.returncode == 0, result.stderr[-2000:]
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 30, 60]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len(load_checkpoint(out / "last.pt")["rng"]) == 2  # every rank's batch state, for resume
    assert result.stdout.count("params:") == 1  # only rank 0 speaks


def test_a_cuda_process_turns_tf32_matrix_products_on(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    Processes.start(torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 is False
    Processes.start(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_mixed_precision_is_bfloat16_only_where_the_gpu_has_it(monkeypatch, capsys):
    """On a GPU with native bfloat16 (compute capability 8 on) --amp autocasts to it; on an older one (a V100, 7.0)
    training stays in float32 and says so in one line; on a CPU, or with --no-amp, nothing is cast."""
    from cli import autocast_for
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    for capability, expected in (((8, 0), torch.bfloat16), ((7, 0), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        context = autocast_for(cuda, amp=True)
        assert getattr(context, "fast_dtype", None) == expected
    assert capsys.readouterr().out == "note: Tesla V100 has no native bfloat16: training in float32\n"
    assert not isinstance(autocast_for(cuda, amp=False), torch.autocast)
    assert not isinstance(autocast_for(torch.device("cpu"), amp=True), torch.autocast)


def test_weight_decay_pulls_on_weight_matrices_only():
    """Biases, norms and Mamba's decay rates A_log (a matrix, but no weight) are in the group without decay."""
    from test_models import tiny
    model = tiny("mamba")
    optimizer = train.configure_optimizer(model, train.parse_args(["--weight-decay", "0.1"]), torch.device("cpu"))
    decayed, kept = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    mixer = model.blocks[0].mixer
    assert id(mixer.A_log) in kept and id(mixer.D) in kept and id(mixer.to_inputs.bias) in kept
    assert id(mixer.to_inputs.weight) in decayed and id(model.head.weight) in decayed
