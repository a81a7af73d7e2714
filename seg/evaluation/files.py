"""Per-case, per-structure scores of predicted label volumes against ground truth: Dice, HD, HD95 and ASSD
in mm, the predicted and true volume in ml; each case's patient, phase and vendor (seg/evaluation/cases.py).

Definitions -- Dice those of seg/evaluation/dice.py (nnU-Net's), counted on the grid of the files, where the
trainer counts on its own (resampled to ``data.spacing``, cropped to ``data.image_size``, only
``data.max_slices_per_volume`` slices): the mean Dice of a model's predictions equals the trainer's test
``dice`` on the same cases when the two grids are one (docs/inference.md, "evaluate"); the distances those of
seg/evaluation/surface.py; the volumes, clinical indices and agreement those of seg/evaluation/cardiac.py and
seg/evaluation/agreement.py:

- **Dice** of class c in one case, in 3D: 2|P∩G| / (|P| + |G|) (MONAI ``DiceMetric``,
  ``ignore_empty=False``). A case where P and G are both empty is NaN: skipped, neither 1 nor 0.
  An empty G with a non-empty P scores 0.
- **HD, HD95, ASSD**, in mm, in 3D, with the voxel spacing of the ground truth's NIfTI header (so thick
  slices count as thick): MONAI's surface distances. Undefined (NaN, skipped) when P or G is empty:
  there is no distance to nothing. MONAI needs scipy for them; without it they are left out, and said so.
- **Volumes** (ml): voxel count x voxel volume / 1000, with the same spacing; the error is predicted - true.
- **Means**: per class, over the cases where it is defined; ``mean`` is the mean of the classes'
  means (the trainer's ``dice``).

Predictions and ground truth are paired by name: ``X.nii.gz`` with ``X_gt.nii.gz`` anywhere below the
ground-truth folder (ACDC, M&Ms) or, in a folder without ``_gt`` files, with ``X.nii.gz`` (nnU-Net's
labelsTr). Every ground truth is a case: one without a prediction is an error naming it, or, with
``missing="zero"``, scored as an empty prediction (Dice 0 for each class it holds) and listed. A
prediction without ground truth is an error.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.options import OptionError
from ..runtime.temporaries import temporary_path
from ..data.volumes import LABELS, NIFTI_SUFFIXES, DataError, case_name, is_label_file, read_nifti
from .cases import CaseInfo
from .scores import METRICS, geometry_scores, mean_defined
from .surface import DISTANCES, WITHOUT_SCIPY, distances_available


MISSING = ("error", "zero")  # what a ground truth without prediction does


@dataclass
class CaseResult:
    """One case's scores, {metric: {class name: value}} for the metrics of ``scores.METRICS`` (NaN where
    undefined; the distances absent when not computed); its patient, phase and vendor ('' where unknown);
    ``missing``: no prediction was found, scored as an empty one (``missing="zero"``)."""

    case: str
    scores: dict[str, dict[str, float]]
    missing: bool = False
    patient: str = ""
    phase: str = ""
    vendor: str = ""

    @property
    def dice(self) -> dict[str, float]:
        return self.scores["dice"]

    @property
    def hd95(self) -> dict[str, float] | None:
        return self.scores.get("hd95")


def nifti_files(folder: Path, recursive: bool = True, exclude: Path | None = None) -> list[Path]:
    """The NIfTI files in (or below) ``folder``, hidden ones and those below ``exclude`` left out."""
    found = []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not path.name.endswith(NIFTI_SUFFIXES) or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        where = path.parent.resolve()  # the folder the file lies in (a link to it lies where the link is)
        if exclude is not None and (where == exclude or exclude in where.parents):
            continue
        found.append(path)
    return found


def ground_truths(gt_dir: Path, exclude: Path | None = None) -> dict[str, Path]:
    """{case: ground-truth file} below ``gt_dir``: the ``_gt`` files when there are any, else every NIfTI
    file; two files for one case is an error naming both."""
    files = nifti_files(gt_dir, exclude=exclude)
    labelled = [path for path in files if is_label_file(path)]
    truths: dict[str, Path] = {}
    for path in labelled or files:
        case = case_name(path)[:-3] if labelled else case_name(path)
        if case in truths:
            raise DataError(f"gt={gt_dir}: two ground truths for case {case}: {truths[case]} and {path}")
        truths[case] = path
    if not truths:
        raise DataError(f"gt={gt_dir}: no ground truth NIfTI file (*_gt.nii.gz, *.nii.gz, *.nii) below it")
    return truths


def match_cases(pred_dir: Path, gt_dir: Path, missing: str = "error") -> list[tuple[str, Path | None, Path]]:
    """(case, prediction or None when missing, ground truth) for every ground truth below ``gt_dir``.

    A prediction without ground truth is an error; a ground truth without prediction is an error unless
    ``missing="zero"``. Files below ``pred_dir`` are never taken as ground truth (a prediction folder
    inside the ground-truth folder)."""
    if missing not in MISSING:
        raise OptionError(f"missing={missing}: choose {' or '.join(MISSING)}")
    predictions = {case_name(p): p for p in nifti_files(pred_dir, recursive=False)}
    if not predictions:
        raise DataError(f"pred={pred_dir}: no predicted NIfTI files (*.nii.gz, *.nii)")
    truths = ground_truths(gt_dir, exclude=pred_dir.resolve())
    unmatched = sorted(set(predictions) - set(truths))
    if unmatched:
        raise DataError(f"gt={gt_dir}: no ground truth (<case>_gt.nii.gz, or <case>.nii.gz in a folder without _gt "
                        f"files) for {len(unmatched)} prediction(s): {listing(unmatched)}")
    absent = sorted(set(truths) - set(predictions))
    if absent and missing == "error":
        raise DataError(f"no prediction for {len(absent)} ground truth(s): {listing(absent)} (in pred={pred_dir}; "
                        f"missing=zero counts each as Dice 0)")
    return [(case, predictions.get(case), truths[case]) for case in sorted(truths)]


def listing(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def one_hot(labels: np.ndarray, values: list[int]) -> torch.Tensor:
    """(1, 1 + K, *spatial) float masks: channel 0 everything else, channel k the label ``values[k-1]``."""
    masks = [labels == value for value in values]
    background = ~np.logical_or.reduce(masks) if masks else np.ones_like(labels, bool)
    return torch.from_numpy(np.stack([background, *masks])).unsqueeze(0).float()


def hausdorff_available() -> bool:
    """MONAI's surface distances (HD, HD95, ASSD) need scipy."""
    return distances_available()


def evaluate_case(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, int], spacing,
                  with_distances: bool = True) -> dict[str, dict[str, float]]:
    """{metric: {class: value}} of one case, by the definitions above: Dice, and HD, HD95, ASSD (mm; left
    out unless ``with_distances``) and the volumes (ml)."""
    from monai.metrics import DiceMetric

    values = list(labels.values())
    p, g = one_hot(prediction, values), one_hot(truth, values)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, g)[0]
    both_empty = (p[0, 1:].flatten(1).sum(1) == 0) & (g[0, 1:].flatten(1).sum(1) == 0)
    dice = torch.where(both_empty, torch.nan, dice)
    scores = {"dice": dict(zip(labels, dice.tolist())),
              **geometry_scores(prediction, truth, labels, spacing, distances=with_distances)}
    if not with_distances:
        for metric in DISTANCES:
            del scores[metric]
    return scores


def nanmean(values) -> float:
    return mean_defined(values)


@dataclass
class Evaluation:
    """The scores of every case, and their means per class and overall."""

    cases: list[CaseResult]
    classes: list[str]

    def mean(self, metric: str, name: str) -> float:
        return nanmean(case.scores[metric][name] for case in self.cases if metric in case.scores)

    @property
    def has_distances(self) -> bool:
        return any("hd95" in case.scores for case in self.cases)

    has_hd95 = has_distances

    @property
    def dice(self) -> float:
        """Mean over classes of the per-class mean over cases: the trainer's test ``dice``."""
        return nanmean(self.mean("dice", name) for name in self.classes)

    @property
    def metrics(self) -> list[str]:
        """The metrics of the table, in ``scores.METRICS`` order (the distances only when computed)."""
        return [m for m in METRICS if m not in DISTANCES or self.has_distances]

    def columns(self) -> list[tuple[str, str]]:
        """(metric, class) of each table column."""
        return [(metric, name) for metric in self.metrics for name in self.classes]

    @property
    def has_vendors(self) -> bool:
        return any(case.vendor for case in self.cases)

    @property
    def missing(self) -> list[str]:
        """The cases without prediction, scored as empty predictions."""
        return [case.case for case in self.cases if case.missing]

    def volume_rows(self) -> list[dict]:
        """One flat row per case (seg/evaluation/scores.py): case, patient, phase, vendor, dice (mean over
        the classes), <metric>_<class>..., missing."""
        return [{"case": case.case, "patient": case.patient, "phase": case.phase, "vendor": case.vendor,
                 "dice": nanmean(case.dice.values()),
                 **{f"{metric}_{name}": case.scores[metric][name] for metric, name in self.columns()},
                 "missing": "yes" if case.missing else "no"} for case in self.cases]

    def rows(self) -> list[dict]:
        """The per-case rows, then the mean row (case "mean", the means over the cases of each column)."""
        rows = self.volume_rows()
        rows.append({"case": "mean", "patient": "", "phase": "", "vendor": "", "dice": self.dice,
                     **{f"{metric}_{name}": self.mean(metric, name) for metric, name in self.columns()},
                     "missing": str(len(self.missing))})
        return rows

    def markdown(self) -> str:
        """The per-case table: Dice, HD95, ASSD and the volume error per class (every figure is in the CSV)."""
        shown = [m for m in ("dice", "hd95", "assd", "vol_error") if m in self.metrics]
        info = ["phase", *(["vendor"] if self.has_vendors else [])]
        header = ["case", *info, *(f"{metric}_{name}" for metric in shown for name in self.classes)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows():
            case = row["case"] + (" (missing)" if row["missing"] == "yes" else "")
            lines.append("| " + " | ".join([case, *(row[key] or "" for key in info),
                                            *(format_score(row[key], key) for key in header[1 + len(info):])])
                         + " |")
        lines += ["", f"Mean Dice over classes: {self.dice:.4f} ({len(self.cases)} cases). "
                  "— : undefined (Dice: class absent from prediction and truth; distances: absent from either). "
                  "HD95, ASSD in mm; vol_error = predicted − true volume in ml."]
        if self.missing:
            lines.append(f"Missing predictions, counted as Dice 0: {', '.join(self.missing)}")
        if not self.has_distances:
            lines.append(f"Note: {WITHOUT_SCIPY}.")
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        write_rows(path, self.rows())


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV of ``rows`` (the first row's keys as the header; NaN and None as empty fields), written to a
    temporary name and renamed."""
    temporary = temporary_path(path, keep_suffix=".csv")
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None or isinstance(v, float) and math.isnan(v) else v)
                           for k, v in row.items()} for row in rows])
    temporary.replace(path)


def format_score(value, metric: str = "dice") -> str:
    """4 decimals for a Dice, 2 for mm and ml; "—" where undefined."""
    if value is None or isinstance(value, str) or math.isnan(value):
        return "—" if not isinstance(value, str) or not value else value
    return f"{value:.4f}" if metric.startswith("dice") else f"{value:.2f}"


def labels_to_evaluate(pred_dir: Path, pairs: list[tuple[str, Path | None, Path]]) -> dict[str, int]:
    """{class name: label value}: from the predictions' record (predict.py writes it), else every
    non-zero value of the ground truth, named as in ACDC when it is one of ACDC's."""
    record = pred_dir / "predictions.json"
    if record.is_file():
        return {str(k): int(v) for k, v in json.loads(record.read_text())["labels"].items()}
    names = {value: name for name, value in LABELS.items()}
    values = sorted({int(v) for _, _, truth in pairs for v in np.unique(read_nifti(truth)[0])} - {0})
    return {names.get(v, f"label{v}"): v for v in values}


def parse_labels(text: str) -> dict[str, int]:
    """``rv:1,lv:3`` or ``1,3`` -> {name: value}; values 1-255, each name and value once."""
    labels: dict[str, int] = {}
    usage = f"labels={text}: give name:value pairs with values 1-255, e.g. rv:1,myo:2,lv:3"
    for item in text.split(","):
        name, _, value = item.strip().rpartition(":")
        try:
            number = int(value)
        except ValueError:
            raise OptionError(usage) from None
        if not 1 <= number <= 255:
            raise OptionError(usage)
        name = name or f"label{number}"
        if name in labels:
            raise OptionError(f"labels={text}: name {name} is given twice")
        if number in labels.values():
            raise OptionError(f"labels={text}: value {number} is given twice")
        labels[name] = number
    return labels


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                     labels: dict[str, int] | None = None, missing: str = "error") -> Evaluation:
    """Score every ground truth below ``gt_dir`` against its prediction in ``pred_dir`` (``missing``:
    what a ground truth without prediction does -- ``error`` or ``zero``, see the module's docstring)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pairs = match_cases(pred_dir, gt_dir, missing)
    labels = labels or labels_to_evaluate(pred_dir, pairs)
    with_distances = distances_available()
    info = CaseInfo()
    results = []
    for case, pred_path, truth_path in pairs:
        truth, spacing, truth_affine = read_nifti(truth_path)
        if pred_path is None:  # missing="zero": an empty prediction
            prediction, pred_affine = np.zeros_like(truth), truth_affine
        else:
            prediction, _, pred_affine = read_nifti(pred_path)
        if prediction.shape != truth.shape or not np.allclose(pred_affine, truth_affine, atol=1e-3):
            raise DataError(f"{pred_path}: shape {prediction.shape} or affine differs from the ground truth "
                            f"{truth_path} {truth.shape}")
        scores = evaluate_case(np.rint(prediction).astype(np.int64), np.rint(truth).astype(np.int64), labels,
                               spacing, with_distances)
        results.append(CaseResult(case, scores, missing=pred_path is None, **info(case, truth_path)))
    return Evaluation(results, list(labels))
