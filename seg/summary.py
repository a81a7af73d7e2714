"""One table of a whole sweep: every run's metrics.json -> summary.md and summary.csv in the sweep folder.

Written automatically at the end of a multirun (``MultirunSummary``, a Hydra callback configured
in configs/train.yaml) and available as ``write_summary(sweep_dir)``. A run that diverged or
failed is shown as such, never as a Dice of zero.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback

COLUMNS = ["run", "norm", "lr", "batch_size", "seed", "status", "dice", "dice_2d", "best_val_dice",
           "images_per_s", "wall_time_s"]


def read_runs(sweep_dir: Path) -> list[dict]:
    """metrics.json of every run folder directly below ``sweep_dir``, with its folder name as ``run``."""
    runs = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            metrics = {"status": f"unreadable metrics.json ({err})"}
        runs.append({"run": path.parent.name, **metrics})
    return sorted(runs, key=lambda r: (str(r.get("norm")), -(r.get("lr") or 0), r.get("seed") or 0, r["run"]))


def cell(run: dict, key: str) -> str:
    """A table cell: Dice to 4 places; no Dice for a run that did not finish, but its status."""
    value = run.get(key)
    if value is None:
        return "—" if run.get("status") == "ok" or key not in ("dice", "dice_2d", "best_val_dice") else run.get("status", "?")
    if isinstance(value, float):
        return f"{value:.4f}" if key.startswith(("dice", "best")) else f"{value:.3g}"
    return str(value)


def write_summary(sweep_dir: str | Path) -> Path | None:
    """Write summary.md and summary.csv for the runs in ``sweep_dir``; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        return None
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    lines = [f"# Sweep {sweep_dir}", "", "Dice: test, 3D per volume (primary); dice_2d: per slice.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(run, key) for key in COLUMNS) + " |" for run in runs]
    markdown = sweep_dir / "summary.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


class MultirunSummary(Callback):
    """Hydra callback: write the sweep's summary table when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"Sweep summary: {path}")
            print(path.read_text())
