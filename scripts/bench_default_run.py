"""The default run as a user meets it: ``python train.py`` timed end to end, with its test Dice.

    python scripts/bench_default_run.py            # fresh data folder: includes generating the phantom
    python scripts/bench_default_run.py --keep-data /path/to/data   # reuse a generated phantom
    python scripts/bench_default_run.py -- norm=iln lr=0.5          # any overrides after --

Writes the wall time of the whole command (process start to exit), the time the trainer itself
reports, the device, and the test Dice (3D per volume and 2D per slice) from metrics.json to
docs/results/bench_default_run.md (``--json``: the figures as JSON too). ``--keep-data`` with a folder that
does not exist yet generates the phantom there (and the page says the run started from a fresh folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, markdown_table, write_json, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-data", type=Path, help="data folder to use (and keep); default: a fresh one")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.keep_data or Path(tmp) / "data"
        fresh = not data_dir.exists()
        run_dir = Path(tmp) / "run"
        command = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                   "trainer.progress=false", *args.overrides]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
    about = (f"`python train.py {' '.join(args.overrides)}` end to end on {metrics['device']}, from "
             f"{'a fresh data folder (generating the phantom included)' if fresh else 'existing data'}.")
    body = markdown_table(
        ["wall time (s)", "trainer time (s)", "train images/s", "test Dice 3D", "test Dice 2D", "best val Dice"],
        [[f"{wall:.0f}", f"{metrics['wall_time_s']:.0f}", f"{metrics['images_per_s']:.1f}", f"{metrics['dice']:.4f}",
          f"{metrics['dice_2d']:.4f}", f"{metrics['best_val_dice']:.4f}"]])
    print("\n" + body)
    write_result("bench_default_run", "The default run, end to end", body, about, args.out)
    if args.json:
        write_json(args.json, {"overrides": args.overrides, "fresh_data": fresh, "wall_s": wall,
                               **{key: metrics.get(key) for key in ("device", "wall_time_s", "images_per_s", "dice",
                                                                     "dice_2d", "best_val_dice", "precision")}})


if __name__ == "__main__":
    main()
