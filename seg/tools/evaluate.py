"""seg-evaluate: per-case, per-class Dice and 95% Hausdorff distance (mm) of predictions against ground truth.

Every ground truth below gt (``<case>_gt.nii.gz``; in a folder without _gt files every
``<case>.nii.gz``) is a case, paired with ``<case>.nii.gz`` in pred. A ground truth without
prediction is an error naming it, unless ``missing=zero``: then it is scored as an empty prediction
(Dice 0 for each class it holds) and listed. Prints a Markdown table (one row per case, then the
mean) and writes it as CSV (default ``<pred>/evaluation.csv``; an existing file is replaced only with
``overwrite=true``). The classes are those seg-predict recorded, unless labels= is given.
Definitions (empty classes, spacing, means): seg/evaluation/files.py. HD95 needs scipy (the study extra).

Every option is checked at start; a bad one ends the tool with one line naming it, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data import DataError
from ..evaluation.files import MISSING, evaluate_folders, parse_labels
from ..config.options import OptionError, check_new_file, parse_bool, parse_key_values
from . import arguments

USAGE = ("usage: seg-evaluate pred=<folder> gt=<folder> [labels=rv:1,lv:3] [missing=error|zero] "
         "[out=<file.csv>] [overwrite=true]")
DEFAULTS = {"pred": None, "gt": None, "labels": "", "missing": "error", "out": "", "overwrite": "false"}


def main(argv: list[str] | None = None) -> int:
    """seg-evaluate with ``argv`` (default: the command line's arguments); returns the exit code."""
    args = parse_key_values(arguments(argv), DEFAULTS, USAGE)
    try:
        overwrite = parse_bool("overwrite", args["overwrite"])
        if args["missing"] not in MISSING:
            raise OptionError(f"missing={args['missing']}: choose {' or '.join(MISSING)}")
        labels = parse_labels(args["labels"]) if args["labels"] else None
        pred, gt = Path(args["pred"]), Path(args["gt"])
        for key, folder in (("pred", pred), ("gt", gt)):
            if not folder.is_dir():
                raise OptionError(f"{key}={folder}: no such folder")
        if pred.resolve() == gt.resolve():
            raise OptionError(f"gt={args['gt']}: the same folder as pred=; the predictions would be their own truth")
        out = Path(args["out"]) if args["out"] else pred / "evaluation.csv"
        check_new_file("out", args["out"], out, ".csv", overwrite)
        evaluation = evaluate_folders(pred, gt, labels, missing=args["missing"])
    except (OptionError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    evaluation.write_csv(out)
    print(evaluation.markdown())
    print(f"\nWritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
