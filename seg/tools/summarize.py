"""seg-summarize: tables and plots of a sweep folder: every run's metrics.json -> the study's table and figures.

Writes, into the sweep folder, what a multirun writes at its end (seg/study/summary.py): summary.md/.csv
(one row per run), paper_table.md/.csv (rows norms, Dice mean ± std over folds and seeds, diverged
runs shown as such: first at each norm's learning rate chosen on validation, with selection.csv
listing every choice, then per learning rate for inspection only), comparison.md/.csv (the norms
compared pairwise on per-volume test Dice: Wilcoxon with Holm, t-intervals, average
ranks), claims.md (the normalization papers' claims, where the sweep holds their runs) and, with the
``study`` extra (pip install -e ".[study]": matplotlib, scipy), comparison.png, dice_vs_lr.png (or
dice_vs_batch_size.png), learning_curves.png and mixing_weights.png. Useful to re-summarize a
sweep that is still running or was interrupted. docs/study.md explains each file.

Exit codes: 0 the tables were written; 1 an error (no such folder, no run in it), in one line;
3 (``EXIT_INCOMPLETE``) the tables were written, but a headline rests on an incomplete choice: a
learning rate was chosen while a candidate rate has no result (its job missing from the sweep's
multirun.yaml plan, its metrics.json unreadable, its run interrupted, failed or still running) --
one line per such choice says which.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..study.summary import EXIT_INCOMPLETE, summarize
from . import arguments


def main(argv: list[str] | None = None) -> int:
    """seg-summarize with ``argv`` (default: the command line's arguments); returns the exit code."""
    parser = argparse.ArgumentParser(prog="seg-summarize", description=__doc__.splitlines()[0].partition(": ")[2])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder whose subfolders hold metrics.json")
    parser.add_argument("--metric", default="dice", help="the metrics.json key in the table (default: dice, "
                                                         "3D per volume; dice_2d, dice_rv, best_val_dice...)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(arguments(argv))
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 1
    summary = summarize(args.sweep_dir, metric=args.metric, plots=not args.no_plots)
    if summary is None:
        print(f"error: no run folder with a metrics.json directly below {args.sweep_dir}", file=sys.stderr)
        return 1
    print((args.sweep_dir / "paper_table.md").read_text())
    written = sorted(p.name for p in args.sweep_dir.iterdir() if p.suffix in (".md", ".csv", ".png"))
    print(f"Written in {args.sweep_dir}: {', '.join(written)}")
    for line in summary.incomplete:
        print(f"warning: incomplete choice (exit {EXIT_INCOMPLETE}): {line}", file=sys.stderr)
    return EXIT_INCOMPLETE if summary.incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
