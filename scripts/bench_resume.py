"""Kill-and-resume trials: SIGKILL a real training run at random moments, resume it, compare weights.

    python scripts/bench_resume.py --trials 20

Each trial starts ``train.py`` (the smoke experiment on a 6-patient phantom, a
checkpoint every 2 steps, deterministic kernels; 12 epochs so that most kills land mid-run), kills it with SIGKILL after a random delay
drawn over the run's duration, then re-runs the same command with ``trainer.resume=true``
(which starts fresh if no checkpoint had been written yet) and compares the final weights and
metrics with an uninterrupted reference run, bit for bit. Prints one line per trial and a total.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"paths.data_dir={data_dir}",
            "data.phantom.num_patients=6", "trainer.epochs=12", "norm=iln", "trainer.checkpoint_every_n_steps=2",
            "trainer.deterministic=true", "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]


def final_state(run_dir: Path) -> tuple[dict, dict]:
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return weights, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        subprocess.run(command(tmp / "data", tmp / "reference"), check=True, capture_output=True, cwd=ROOT)
        duration = time.perf_counter() - started
        reference_weights, reference_metrics = final_state(tmp / "reference")
        identical = from_checkpoint = 0
        for trial in range(1, args.trials + 1):
            run_dir = tmp / f"trial{trial}"
            delay = rng.uniform(0.2, duration)
            process = subprocess.Popen(command(tmp / "data", run_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
            checkpoint = run_dir / "checkpoints" / "last.pt"
            where = "no checkpoint yet"
            if checkpoint.exists():
                progress = torch.load(checkpoint, weights_only=True)["progress"]
                where = f"epoch {progress['epoch']} batch {progress['batch']} (step {progress['step']})"
                from_checkpoint += 1
            if (run_dir / "metrics.json").exists():
                where += ", run had already finished"
            subprocess.run(command(tmp / "data", run_dir, "trainer.resume=true"), check=True, capture_output=True,
                           cwd=ROOT)
            weights, metrics = final_state(run_dir)
            same = all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights) and all(
                metrics[k] == reference_metrics[k] for k in ("dice", "dice_2d", "best_val_dice", "steps"))
            identical += same
            print(f"trial {trial:2d}: killed after {delay:5.2f} s at {where}: "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"\n{identical}/{args.trials} resumed runs ended with weights and metrics identical to the "
          f"uninterrupted run ({from_checkpoint} resumed from a checkpoint, the others had none yet and restarted); "
          f"reference run {duration:.1f} s, torch {torch.__version__}")


if __name__ == "__main__":
    main()
