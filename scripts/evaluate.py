"""Per-case, per-class Dice and 95% Hausdorff distance (mm) of predictions against ground truth.

    python scripts/evaluate.py pred=pred/ gt=/path/to/ACDC/database/testing
    python scripts/evaluate.py pred=pred/ gt=labelsTr/ labels=rv:1,myo:2,lv:3 out=scores.csv

Pairs ``<case>.nii.gz`` in pred with ``<case>_gt.nii.gz`` (or ``<case>.nii.gz``) anywhere below gt;
prints a Markdown table (one row per case, then the mean) and writes it as CSV (default
``<pred>/evaluation.csv``). The classes are those predict.py recorded, unless labels= is given.
Definitions (empty classes, spacing, means): seg/evaluation.py. HD95 needs scipy (the study extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USAGE = "usage: python scripts/evaluate.py pred=<folder> gt=<folder> [labels=rv:1,lv:3] [out=<file.csv>]"


def main(argv: list[str]) -> int:
    from seg.data import DataError
    from seg.evaluation import evaluate_folders, parse_labels
    from seg.inference import parse_key_values

    args = parse_key_values(argv, {"pred": None, "gt": None, "labels": "", "out": ""}, USAGE)
    try:
        evaluation = evaluate_folders(args["pred"], args["gt"], parse_labels(args["labels"]) or None)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args["out"] or Path(args["pred"]) / "evaluation.csv")
    evaluation.write_csv(out)
    print(evaluation.markdown())
    print(f"\nWritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
