"""The figures of one volume per structure, as seg-evaluate's per-case table and the trainer's metrics.json
(``per_volume``) both hold them: Dice (seg/evaluation/dice.py, seg/evaluation/files.py), HD, HD95 and ASSD
in mm (seg/evaluation/surface.py), predicted and true volume in ml and the volume error
(seg/evaluation/cardiac.py).

A row is flat: ``case``, ``patient``, ``phase`` (ED/ES where the dataset names it, else ''), ``vendor``
('' where unknown), ``dice`` (the mean of the structures' Dice), then per structure ``<metric>_<structure>``
for each metric of ``METRICS``; NaN (null in JSON, empty in CSV) where a figure is undefined. A spacing
that is not known (a slice spacing of 0: DICOM without slice positions) leaves volumes and distances NaN.
"""

from __future__ import annotations

import math

import numpy as np

from .cardiac import volume_ml
from .surface import DISTANCES, surface_distances

METRICS = ("dice", *DISTANCES, "vol_pred", "vol_true", "vol_error")
INFO = ("case", "patient", "phase", "vendor")


def spacing_known(spacing) -> bool:
    return spacing is not None and len(spacing) >= 3 and all(math.isfinite(float(s)) and float(s) > 0
                                                              for s in spacing)


def geometry_scores(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, int], spacing,
                    distances: bool = True) -> dict[str, dict[str, float]]:
    """{metric: {structure: value}} of one volume for the metrics besides Dice: HD, HD95, ASSD (when
    ``distances``; else NaN) and the volumes, one binary mask per label value. ``spacing``: one value per
    axis of the arrays, in mm."""
    known = spacing_known(spacing)
    scores: dict[str, dict[str, float]] = {metric: {} for metric in METRICS if metric != "dice"}
    for name, value in labels.items():
        p, g = prediction == value, truth == value
        found = surface_distances(p, g, spacing) if distances and known else dict.fromkeys(DISTANCES, math.nan)
        for metric in DISTANCES:
            scores[metric][name] = found[metric]
        vp, vt = (volume_ml(p, spacing), volume_ml(g, spacing)) if known else (math.nan, math.nan)
        scores["vol_pred"][name], scores["vol_true"][name], scores["vol_error"][name] = vp, vt, vp - vt
    return scores


def flat(scores: dict[str, dict[str, float]], structures: list[str]) -> dict[str, float]:
    """{metric: {structure: value}} -> {"<metric>_<structure>": value} in the order of METRICS, then structures."""
    return {f"{metric}_{name}": scores[metric].get(name, math.nan) for metric in METRICS if metric in scores
            for name in structures}


def mean_defined(values) -> float:
    """The mean of the finite values; NaN if there are none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else math.nan
