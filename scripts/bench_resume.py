"""Soak test of kill-and-resume: stop a real training run at random moments with SIGTERM, SIGINT or
SIGKILL, resume it, and compare its final weights and metrics with an uninterrupted run, bit for bit.

    python scripts/bench_resume.py --trials 20        # writes docs/results/soak_resume.md

Each trial starts ``train.py`` (the smoke experiment on a 6-patient phantom, ``--epochs`` epochs, a
checkpoint every 2 steps, deterministic kernels), sends it the trial's signal after a random delay
drawn over the run's duration (the three signals take turns), then runs the same command with
``trainer.resume=true`` -- which continues from last.pt, or starts fresh when the signal came before
the first step -- and compares the final last.pt's weights and metrics.json with the reference
run's. SIGTERM and SIGINT must end the run with exit code 75 (saved after the step in progress, or
nothing to save yet) or 0 (it had already finished). Prints one line per trial, then writes the
table through the harness (stamped with the command, the commit and the machine) to
docs/results/soak_resume.md (``--out``: elsewhere).
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

from harness import ROOT, markdown_table, write_result
from seg.runtime.checkpoint import read_run_state

SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}


def command(data_dir: Path, run_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"paths.data_dir={data_dir}",
            "data.phantom.num_patients=6", f"trainer.epochs={epochs}", "norm=iln",
            "trainer.checkpoint_every_n_steps=2", "trainer.deterministic=true", "trainer.progress=false",
            f"hydra.run.dir={run_dir}", *extra]


def final_state(run_dir: Path) -> tuple[dict, dict]:
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return weights, metrics


def where_it_stopped(run_dir: Path) -> str:
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if not checkpoint.exists():
        return "before its first checkpoint"
    state = read_run_state(torch.load(checkpoint, weights_only=True))
    status = "?"
    if (run_dir / "metrics.json").exists():
        status = json.loads((run_dir / "metrics.json").read_text()).get("status", "?")
    return f"epoch {state.epoch} batch {state.batch} (step {state.step}), status {status}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--signals", default="TERM,INT,KILL", help="comma-separated, taking turns")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    args = parser.parse_args()
    names = args.signals.split(",")
    rng = random.Random(args.seed)
    rows, identical, expected_exit = [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(command(tmp / "data", tmp / "warm-up", 1), check=True, capture_output=True, cwd=ROOT)  # phantom
        started = time.perf_counter()
        subprocess.run(command(tmp / "data", tmp / "reference", args.epochs), check=True, capture_output=True, cwd=ROOT)
        duration = time.perf_counter() - started
        reference_weights, reference_metrics = final_state(tmp / "reference")
        for trial in range(1, args.trials + 1):
            name = names[(trial - 1) % len(names)]
            run_dir = tmp / f"trial{trial}"
            delay = rng.uniform(0.2, duration)
            process = subprocess.Popen(command(tmp / "data", run_dir, args.epochs), cwd=ROOT, text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(delay)
            process.send_signal(SIGNALS[name])
            _, err = process.communicate()
            code = process.returncode
            clean = code in (75, 0) if name != "KILL" else code in (-signal.SIGKILL, 0)
            expected_exit += clean
            where = where_it_stopped(run_dir)
            subprocess.run(command(tmp / "data", run_dir, args.epochs, "trainer.resume=true"), check=True,
                           capture_output=True, cwd=ROOT)
            weights, metrics = final_state(run_dir)
            same = all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights) and all(
                metrics[k] == reference_metrics[k] for k in ("dice", "dice_2d", "best_val_dice", "steps"))
            identical += same
            rows.append([trial, f"SIG{name}", f"{delay:.2f}", code, where, "identical" if same else "**different**"])
            print(f"trial {trial:2d}: SIG{name} after {delay:5.2f} s, exit code {code}, last.pt: {where}: "
                  f"{'identical' if same else 'DIFFERENT'}"
                  + ("" if clean else f"\n  unexpected exit; stderr:\n{err}"), flush=True)
    total = (f"{identical}/{args.trials} resumed runs ended with weights and metrics identical, bit for bit, to the "
             f"uninterrupted run; {expected_exit}/{args.trials} interrupted runs exited as documented (75 or 0 for "
             f"SIGTERM and SIGINT). Reference run: {args.epochs} epochs, {duration:.1f} s.")
    print("\n" + total)
    about = ("A real `train.py` run (smoke experiment, 6-patient phantom, a checkpoint every 2 steps, deterministic "
             "kernels) stopped at random moments by SIGTERM, SIGINT or SIGKILL (taking turns), then resumed with "
             "`trainer.resume=true`; its final weights and metrics compared with an uninterrupted run's.")
    body = f"**{total}**\n\n" + markdown_table(
        ["trial", "signal", "after (s)", "exit code", "where last.pt stood", "final weights and metrics"], rows)
    write_result("soak_resume", "Soak test: kill and resume", body, about, args.out)


if __name__ == "__main__":
    main()
