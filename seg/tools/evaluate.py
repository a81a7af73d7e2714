"""seg-evaluate: predictions against ground truth as cardiac MRI is reported -- per case and structure Dice,
HD, HD95, ASSD (mm) and volumes (ml); per phase x structure means; per patient the clinical indices (EDV,
ESV, SV, EF, LV mass) and their agreement with the truth; a Bland-Altman plot.

Every ground truth below gt (``<case>_gt.nii.gz``; in a folder without _gt files every
``<case>.nii.gz``) is a case, paired with ``<case>.nii.gz`` in pred. A ground truth without
prediction is an error naming it, unless ``missing=zero``: then it is scored as an empty prediction
(Dice 0 for each class it holds) and listed. The phase (ED/ES) and vendor of a case come from the
dataset's files (ACDC's Info.cfg, M&Ms-2's names and dataset_information.csv; seg/evaluation/cases.py).
Prints the tables in Markdown and writes them (default ``<pred>/evaluation.csv``; beside it
``evaluation_phases.csv``, ``evaluation_clinical.csv``, ``evaluation_agreement.csv``, ``evaluation.md``,
``evaluation_bland_altman.png``); an existing file is replaced only with ``overwrite=true``. The classes
are those seg-predict recorded, unless labels= is given. Definitions: seg/evaluation/ (files.py,
surface.py, cardiac.py, agreement.py, report.py). The distances need scipy, the plot matplotlib (the
study extra); without them they are left out, and said so.

Every option is checked at start; a bad one ends the tool with one line naming it, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data import DataError
from ..evaluation.files import MISSING, evaluate_folders, parse_labels
from ..evaluation.report import output_paths, write_report
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
        for path in list(output_paths(out).values())[1:]:  # the files written beside it
            if (path.exists() or path.is_symlink()) and not overwrite:
                raise OptionError(f"out={out}: {path} exists (pass overwrite=true to replace it)")
        evaluation = evaluate_folders(pred, gt, labels, missing=args["missing"])
        written = write_report(evaluation, out)
    except (OptionError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(written["markdown"].read_text())
    print("Written: " + ", ".join(str(path) for path in written.values() if path is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
