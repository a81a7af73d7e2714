"""The trainer's test figures per volume and per patient (metrics.json ``per_volume``, ``per_patient``), and
their means (``hd``, ``hd95``, ``assd`` and per class).

Each test volume is the stack of its test slices (those annotated for the task, the central
``data.max_slices_per_volume`` of them) on the training grid: in-plane the spacing after resampling to
``data.spacing`` (the case's ``grid_spacing``), across slices the volume's slice spacing; the crop/pad to
``data.image_size`` is part of it (what the crop cuts away is in neither mask). Per volume and class: the
Dice of seg/evaluation/dice.py, HD, HD95 and ASSD in mm (seg/evaluation/surface.py), the predicted and true
volume in ml and their difference (seg/evaluation/cardiac.py); per patient, the clinical indices the task's
classes allow. On a stack with slices left out the slices are taken as adjacent, so its volume and
distances describe the slices tested, not the whole heart; seg-evaluate measures whole volumes on the
input grid.

Only the test set is measured this way, once at the end of a run (the surface distances cost a KD-tree
per volume and class on the CPU; validation after each epoch stays the Dice of counts).
"""

from __future__ import annotations

import math

import torch

from .cardiac import clinical_indices
from .dice import per_volume_dice
from .scores import METRICS, flat, geometry_scores, mean_defined
from .surface import DISTANCES, WITHOUT_SCIPY, distances_available


def array_spacing(case: dict) -> tuple[float, float, float] | None:
    """The spacing (slice, x, y) in mm of a case's prepared (S, X, Y) arrays; None when not recorded."""
    grid = case.get("grid_spacing") or case.get("spacing")
    if not grid or len(grid) < 3:
        return None
    return float(grid[2]), float(grid[0]), float(grid[1])


def per_volume_figures(prediction: torch.Tensor, slices, num_classes: int, class_names: list[str]) -> list[dict]:
    """Per volume of a SliceSet, in the order of ``slices.cases``: {"case", "patient", "phase", "vendor",
    "dice", "dice_<class>"..., "hd_<class>", "hd95_<class>", "assd_<class>", "vol_pred_<class>",
    "vol_true_<class>", "vol_error_<class>"} (None where undefined or, for the distances, not computed)."""
    rows = per_volume_dice(prediction, slices, num_classes, class_names)
    with_distances = distances_available()
    prediction = prediction.cpu().numpy()
    labels = slices.labels.cpu().numpy()
    index = slices.volume_index.cpu().numpy()
    classes = {name: k for k, name in enumerate(class_names, start=1)}
    for volume, (row, case) in enumerate(zip(rows, slices.cases)):
        mine = index == volume
        scores = geometry_scores(prediction[mine], labels[mine], classes, array_spacing(case), with_distances)
        row.update({"phase": case.get("phase", ""), "vendor": str(case.get("vendor", "") or "")})
        row.update({key: none_if_nan(value) for key, value in flat(scores, class_names).items()})
    return rows


def none_if_nan(value: float):
    return None if value is None or not math.isfinite(value) else value


def summary(rows: list[dict], class_names: list[str]) -> dict:
    """metrics.json's means of the per-volume figures: ``hd``, ``hd95``, ``assd`` (mean over classes of the
    per-class means over volumes, as ``dice``) and ``<metric>_<class>``; ``per_patient`` (clinical indices);
    ``surface_distances``: computed, or why not."""
    out: dict = {}
    for metric in DISTANCES:
        per_class = {name: mean_defined(row.get(f"{metric}_{name}") for row in rows) for name in class_names}
        out[metric] = none_if_nan(mean_defined(per_class.values()))
        out.update({f"{metric}_{name}": none_if_nan(value) for name, value in per_class.items()})
    try:
        patients = clinical_indices(rows, class_names)
    except ValueError as err:
        patients, out["per_patient_note"] = [], str(err)
    out["per_patient"] = [{k: none_if_nan(v) if isinstance(v, float) else v for k, v in p.items()}
                          for p in patients if len(p) > 2]
    out["surface_distances"] = "computed" if distances_available() else WITHOUT_SCIPY
    return out


__all__ = ["METRICS", "array_spacing", "per_volume_figures", "summary"]
