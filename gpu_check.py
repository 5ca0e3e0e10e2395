"""
The GPU check: everything this lab measures on a CUDA machine, in one command, every output
under one folder with the hardware and the date.

    python gpu_check.py                      # on a CUDA machine: about 40 minutes on one H100
    python gpu_check.py --dry-run            # the same steps at toy sizes (one seed), on any machine (a minute)

Steps, each a command of its own whose output goes to <out>/<step>.log:
  tests        the test suite (the models run on the CPU there; the GPU paths are the next steps')
  bench        python bench.py --device cuda (training and generation against length)
  compiled     python bench.py --device cuda --compile
  engine       python bench.py --device cuda --engine (what fast.py gains on a GPU)
  runs         the Transformer, the best vector stack and the context matrix at the GPU presets
               (transformer-gpu, best-newllm, best-matrix: 5,000 steps), two seeds each
A step that fails is recorded and the next one runs; a finished training run is not trained again.
<out>/summary.md lists every step, its exit code, its time and each run's best validation loss.
"""

import subprocess
import sys
import time
from pathlib import Path

import torch

from cli import Parser, UserError, hardware, run_script
from run_folder import read_log

REPO = Path(__file__).resolve().parent
PRESETS = ("transformer-gpu", "best-newllm", "best-matrix")
SEEDS = (1337, 1)
TOY = ["--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--block-size", "16",
       "--embed-dim", "48", "--hidden-dim", "64", "--layers", "2", "--sample-tokens", "0"]  # seconds on any CPU


def steps(device, out, dry_run):
    """(name, command) for every step; a dry run swaps each for a toy-sized one that runs anywhere."""
    python, runs = [sys.executable], []
    for preset in PRESETS:
        for seed in SEEDS[:1] if dry_run else SEEDS:
            run_dir = out / "runs" / f"{preset}-{seed}"
            flags = ["train.py", "--preset", preset, "--seed", str(seed), "--device", device, "--no-progress",
                     "--out-dir", str(run_dir)] + (["--resume"] if (run_dir / "last.pt").is_file() else [])
            toy = TOY + ([] if preset.startswith("transformer") else ["--context-dim", "48"])
            runs.append((f"run {preset} seed {seed}", python + flags + (toy if dry_run else [])))
    if dry_run:
        return [("tests", python + ["-m", "pytest", "-q", "-x", "test_fast.py", "-k", "equals_lesson and seed"]),
                ("bench", python + ["bench.py", "--products", "--quick", "--json", str(out / "bench.json")])] + runs
    bench = python + ["bench.py", "--device", device]
    return [("tests", python + ["-m", "pytest", "-q"]),
            ("bench", bench + ["--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]),
            ("compiled", bench + ["--compile", "--json", str(out / "bench_compiled.json")]),
            ("engine", bench + ["--engine", "--json", str(out / "engine.json")])] + runs


def best_loss(run_dir):
    """The best validation loss in a run's log, or None."""
    log = run_dir / "log.jsonl"
    return min((record["val_loss"] for record in read_log(log)), default=None) if log.is_file() else None


def main(argv=None):
    parser = Parser(prog="gpu_check.py", description="Every GPU measurement of the lab, in one folder.")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on this machine's CPU (seconds)")
    parser.add_argument("--out", help="the folder (default results/gpu-<date>)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():  # one line, before anything is written
        raise UserError("PyTorch sees no CUDA GPU here: run this on a CUDA machine, or add --dry-run")
    out = Path(args.out or REPO / "results" / f"gpu-{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    where = hardware(torch.device(device))
    lines = [f"# GPU check{' (dry run)' if args.dry_run else ''}", "",
             f"{where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; `python gpu_check.py"
             f"{' --dry-run' if args.dry_run else ''}`", "", "| step | exit code | minutes | best val loss |",
             "|---|---|---|---|"]
    for name, command in steps(device, out, args.dry_run):
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        started = time.time()
        with open(out / f"{name.replace(' ', '-')}.log", "w") as log:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        loss = best_loss(Path(command[command.index("--out-dir") + 1])) if "--out-dir" in command else None
        lines.append(f"| {name} | {code} | {(time.time() - started) / 60:.1f} | "
                     f"{'' if loss is None else f'{loss:.4f}'} |")
        (out / "summary.md").write_text("\n".join(lines) + "\n")  # after every step: a cut-short check keeps its part
        print(f"  exit code {code}", flush=True)
    print(f"wrote {out / 'summary.md'}")
    if any(line.strip("|").split("|")[1].strip() != "0" for line in lines[6:]):
        raise UserError(f"a step failed: see the logs in {out}")


if __name__ == "__main__":
    run_script(main)
