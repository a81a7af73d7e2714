"""Surface distances in mm between a predicted and a true mask of one structure: HD, HD95 and ASSD.

The distances are MONAI's (``monai.metrics.utils.get_edge_surface_distance``, what its
``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` are built on), in 3D with the voxel spacing, so
thick slices count as thick:

- the **surface** of a mask: its voxels that touch the background (the mask minus its binary erosion);
- ``d(P→G)``: for each surface voxel of P, the Euclidean distance in mm to the nearest surface voxel of G;
  ``d(G→P)`` likewise;
- **HD** (Hausdorff distance, mm): max(max d(P→G), max d(G→P)) -- MONAI ``compute_hausdorff_distance``;
- **HD95** (mm): max(95th percentile of d(P→G), 95th percentile of d(G→P)) -- MONAI
  ``compute_hausdorff_distance(percentile=95)``, the ACDC and M&Ms challenges' robust variant;
- **ASSD** (average symmetric surface distance, mm): the mean of d(P→G) and d(G→P) pooled (every surface
  voxel of both masks once) -- MONAI ``compute_average_surface_distance(symmetric=True)``.

Empty structures. Both masks empty: every distance is undefined (NaN). Exactly one empty: undefined too
(NaN, where MONAI gives inf) -- there is no distance to nothing; the Dice of 0 reports that failure, and
the tables count the volumes with a defined distance (``n``), so an undefined distance is never a silent
zero. Means skip NaN.

MONAI needs scipy for the surfaces (binary erosion) and the distances (KD-tree or distance transform);
scipy is the ``study`` extra. Without it ``distances_available()`` is False and callers leave the
distances out, saying so (seg-evaluate's tables, the trainer's metrics.json), rather than fail.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

DISTANCES = ("hd", "hd95", "assd")
WITHOUT_SCIPY = "surface distances (HD, HD95, ASSD) not computed: MONAI needs scipy (pip install -e '.[study]')"


def distances_available() -> bool:
    """MONAI's surface distances need scipy's binary erosion and KD-tree / distance transform."""
    try:
        import scipy.ndimage  # noqa: F401
        import scipy.spatial  # noqa: F401
    except ImportError:
        return False
    return True


def surface_distances(prediction, truth, spacing) -> dict[str, float]:
    """{"hd", "hd95", "assd"} in mm between two binary masks of one shape (numpy or torch, any number of
    dimensions) with voxel ``spacing`` (one value per dimension, mm); NaN when either mask is empty."""
    from monai.metrics.utils import get_edge_surface_distance

    p = torch.as_tensor(np.asarray(prediction) if not isinstance(prediction, torch.Tensor) else prediction).bool()
    g = torch.as_tensor(np.asarray(truth) if not isinstance(truth, torch.Tensor) else truth).bool()
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(g.shape)} differ in shape")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not give one value per dimension of {tuple(p.shape)}")
    if not p.any() or not g.any():
        return dict.fromkeys(DISTANCES, math.nan)
    with warnings.catch_warnings():  # MONAI warns about empty masks; they were handled above
        warnings.simplefilter("ignore")
        _, (to_truth, to_prediction), _ = get_edge_surface_distance(
            p.cpu(), g.cpu(), spacing=[float(s) for s in spacing], symmetric=True, warn_empty=False)
    to_truth, to_prediction = to_truth.double(), to_prediction.double()
    return {"hd": float(max(to_truth.max(), to_prediction.max())),
            "hd95": float(max(torch.quantile(to_truth, 0.95), torch.quantile(to_prediction, 0.95))),
            "assd": float(torch.cat([to_truth, to_prediction]).mean())}


def structure_distances(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, int], spacing
                        ) -> dict[str, dict[str, float]]:
    """{structure: {"hd", "hd95", "assd"}} of two label maps, one binary mask per label value."""
    return {name: surface_distances(prediction == value, truth == value, spacing) for name, value in labels.items()}
