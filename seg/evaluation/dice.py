"""Dice, stated precisely, computed from per-slice counts on the training device.

For each foreground class c, a slice contributes three counts: |P∩G|, |P| and |G| (P the
predicted mask, G the ground truth). From them:

* **3D (per-volume) Dice -- the primary ``dice``** (ACDC / nnU-Net convention): the slices of a
  volume are restacked (their counts summed), Dice = 2|P∩G| / (|P| + |G|) per volume and class;
  a volume where both P and G are empty for c is NaN and skipped (not counted as 1, not as 0);
  an empty G with a non-empty P scores 0. Per class: the mean over volumes; ``dice``: the mean
  over classes.
* **2D (per-slice) Dice -- ``dice_2d``**: the same per slice, empty-vs-empty slices skipped (a
  slice with an empty G and a non-empty P scores 0), averaged over slices, then over classes.
* **2D Dice with MONAI's rule for empty slices -- ``dice_2d_monai``**: ``monai.metrics.DiceMetric``
  with ``ignore_empty=True`` (its default): every slice with an empty G is skipped, whatever P holds,
  so false positives on slices without the structure do not count. The slices behind both rules are
  counted per class (``slices_<class>_total``, ``_empty_truth``, ``_false_positive`` -- an empty G
  with a non-empty P, scored 0 by ``dice_2d`` and skipped by ``dice_2d_monai``), so a reader sees what
  the two figures differ by.
* **Per volume -- ``per_volume_dice``**: the 3D Dice of each volume with its case and patient id
  (metrics.json's ``per_volume`` list), what the paired comparisons of a sweep are made on
  (seg/study/summary.py); a volume's ``dice`` is the mean over its defined classes (None if none is).

The foreground of a two-class task is the arg-max of the logits. The ILN author's code takes
softmax(logits)[foreground] >= 0.5 instead; for two classes that is logit_fg >= logit_bg, the same
as the arg-max except on an exact tie (logits equal to float precision), which the arg-max gives
to the background (tests/test_protocol.py shows both).
"""

from __future__ import annotations

import math

import torch


def dice_from_counts(intersection: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2|P∩G| / (|P| + |G|) elementwise; NaN where both masks are empty."""
    denominator = pred + target
    return torch.where(denominator > 0, 2 * intersection / denominator.clamp(min=1), torch.nan)


def slice_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of a batch of label maps (N, H, W): (N, 3, num_classes - 1) = (|P∩G|, |P|, |G|) per fg class."""
    classes = torch.arange(1, num_classes, device=prediction.device).view(1, -1, 1, 1)
    p = prediction.unsqueeze(1) == classes
    g = target.unsqueeze(1) == classes
    return torch.stack([(p & g).sum((2, 3)), p.sum((2, 3)), g.sum((2, 3))], dim=1).double()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
            domain: torch.Tensor | None = None) -> torch.Tensor:
    """Arg-max label maps (N, H, W) of ``images`` (N, 1, H, W), batch by batch, on their device.

    ``domain`` (N,): each image's domain id, for conditional normalizations (``UNet.forward``).
    """
    return torch.cat([model(images[i:i + batch_size], None if domain is None else domain[i:i + batch_size]).argmax(1)
                      for i in range(0, images.shape[0], batch_size)])


def volume_counts(counts: torch.Tensor, volume_index: torch.Tensor, num_volumes: int) -> torch.Tensor:
    """Per-slice counts (N, 3, K) summed per volume: (num_volumes, 3, K)."""
    per_volume = torch.zeros((num_volumes, *counts.shape[1:]), dtype=counts.dtype, device=counts.device)
    return per_volume.index_add_(0, volume_index, counts)


def summarize_counts(counts: torch.Tensor, volume_index: torch.Tensor, num_volumes: int,
                     class_names: list[str]) -> dict[str, float]:
    """3D and 2D Dice (overall and per class) from per-slice counts (N, 3, K)."""
    per_volume = volume_counts(counts, volume_index, num_volumes)
    dice_3d = torch.nanmean(dice_from_counts(*per_volume.unbind(1)), dim=0)
    per_slice = dice_from_counts(*counts.unbind(1))
    dice_2d = torch.nanmean(per_slice, dim=0)
    empty_truth = counts[:, 2] == 0
    dice_2d_monai = torch.nanmean(torch.where(empty_truth, torch.nan, per_slice), dim=0)
    result = {"dice": nanmean(dice_3d.tolist()), "dice_2d": nanmean(dice_2d.tolist()),
              "dice_2d_monai": nanmean(dice_2d_monai.tolist())}
    false_positive = (empty_truth & (counts[:, 1] > 0)).sum(0).tolist()
    for k, (name, d3, d2) in enumerate(zip(class_names, dice_3d.tolist(), dice_2d.tolist())):
        result[f"dice_{name}"], result[f"dice_2d_{name}"] = d3, d2
        result[f"dice_2d_monai_{name}"] = dice_2d_monai[k].item()
        result[f"slices_{name}_total"] = counts.shape[0]
        result[f"slices_{name}_empty_truth"] = int(empty_truth[:, k].sum())
        result[f"slices_{name}_false_positive"] = int(false_positive[k])
    return result


def per_volume_dice(prediction: torch.Tensor, slices, num_classes: int, class_names: list[str]) -> list[dict]:
    """The 3D Dice of each volume of a SliceSet from its predicted label maps (N, H, W), in the order of
    ``slices.cases``: [{"case", "patient", "dice", "dice_<class>"...}], None where a Dice is undefined."""
    counts = slice_counts(prediction.to(slices.labels.device), slices.labels, num_classes)
    dice = dice_from_counts(*volume_counts(counts, slices.volume_index, len(slices.cases)).unbind(1)).tolist()
    rows = []
    for case, per_class in zip(slices.cases, dice):
        mean = nanmean(per_class)
        row = {"case": case.get("case"), "patient": case.get("patient"), "dice": None if math.isnan(mean) else mean}
        row.update({f"dice_{name}": None if math.isnan(d) else d for name, d in zip(class_names, per_class)})
        rows.append(row)
    return rows


def nanmean(values: list[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def evaluate(model: torch.nn.Module, slices, num_classes: int, class_names: list[str],
             batch_size: int = 16, domain: torch.Tensor | None = None,
             world=None) -> tuple[dict[str, float], torch.Tensor]:
    """Dice of ``model`` on a SliceSet, and its predictions; the model is put in eval mode.

    ``domain`` (N,): each slice's domain id, for conditional normalizations. ``world``
    (``seg.runtime.distributed.World``, data-parallel runs): each rank predicts its share of the
    slices; the shares' counts and predictions are summed over ranks, so all get the same result.
    """
    model.eval()
    rows = slice(None) if world is None else world.rows(len(slices))
    prediction = predict(model, slices.images[rows], batch_size, None if domain is None else domain[rows])
    counts = slice_counts(prediction, slices.labels[rows], num_classes)
    if world is not None and world.size > 1:
        counts = world.gather_rows(counts, len(slices))
        prediction = world.gather_rows(prediction.to(torch.uint8), len(slices))
    return summarize_counts(counts, slices.volume_index, len(slices.cases), class_names), prediction
