"""Dice as documented: per-volume 3D (primary) and per-slice 2D, checked against MONAI's DiceMetric; the
per-volume rows of metrics.json."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric

from seg.data.slices import SliceSet
from seg.evaluation.dice import per_volume_dice, slice_counts, summarize_counts


def random_masks(num_slices, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (num_slices, 24, 20), generator=g)
    noise = torch.randint(0, num_classes, target.shape, generator=g)
    prediction = torch.where(torch.rand(target.shape, generator=g) < 0.3, noise, target)
    return prediction, target


def onehot(labels, num_classes):
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("num_classes", [2, 4])
def test_agrees_with_monai_dice_metric(num_classes):
    prediction, target = random_masks(12, num_classes, seed=num_classes)
    volume_index = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    names = [f"c{i}" for i in range(1, num_classes)]
    result = summarize_counts(slice_counts(prediction, target, num_classes), volume_index, 3, names)

    # 2D: MONAI per slice, then mean over slices and classes
    per_slice = DiceMetric(include_background=False, reduction="none")(onehot(prediction, num_classes),
                                                                        onehot(target, num_classes))
    assert result["dice_2d"] == pytest.approx(per_slice.mean().item(), abs=1e-6)
    # MONAI's own rule for empty slices (ignore_empty=True, its default): a slice with an empty truth is skipped
    monai_rule = DiceMetric(include_background=False, reduction="mean_batch")(onehot(prediction, num_classes),
                                                                            onehot(target, num_classes))
    assert result["dice_2d_monai"] == pytest.approx(monai_rule.mean().item(), abs=1e-6)
    # 3D: MONAI on restacked volumes (N, C, H, W, D)
    per_volume = []
    for v in range(3):
        sel = volume_index == v
        p3 = onehot(prediction[sel], num_classes).permute(1, 2, 3, 0).unsqueeze(0)
        t3 = onehot(target[sel], num_classes).permute(1, 2, 3, 0).unsqueeze(0)
        per_volume.append(DiceMetric(include_background=False, reduction="none")(p3, t3))
    per_volume = torch.cat(per_volume)  # (volumes, classes)
    assert result["dice"] == pytest.approx(per_volume.mean().item(), abs=1e-6)
    for i, name in enumerate(names):
        assert result[f"dice_{name}"] == pytest.approx(per_volume[:, i].mean().item(), abs=1e-6)


def test_empty_classes_follow_the_documented_convention():
    target = torch.zeros(3, 8, 8, dtype=torch.long)
    prediction = torch.zeros_like(target)
    target[0, :4, :4] = 1
    prediction[0, :4, :4] = 1          # slice 0: perfect
    prediction[1, 0, 0] = 1            # slice 1: empty truth, a false positive -> 0
    # slice 2: both empty -> NaN, skipped
    counts = slice_counts(prediction, target, 2)
    result = summarize_counts(counts, torch.tensor([0, 0, 1]), 2, ["rv"])
    assert result["dice_2d"] == pytest.approx(0.5)          # mean of 1 and 0; slice 2 skipped
    assert result["dice_2d_monai"] == pytest.approx(1.0)    # MONAI skips every slice with an empty truth
    assert (result["slices_rv_total"], result["slices_rv_empty_truth"], result["slices_rv_false_positive"]) == (3, 2, 1)
    # volume 0 = slices 0,1: 2*16 / (17 + 16); volume 1 (slice 2) is empty-vs-empty: skipped
    assert result["dice"] == pytest.approx(32 / 33)
    everything_empty = summarize_counts(slice_counts(target[2:], target[2:], 2), torch.tensor([0]), 1, ["rv"])
    assert math.isnan(everything_empty["dice"])


def test_per_volume_dice_is_the_volumes_of_the_3d_dice():
    """metrics.json's per_volume rows: each volume's 3D Dice with its case and patient; their mean per class
    is the run's dice_<class>; a class empty in both prediction and truth is None, not 0 or 1."""
    prediction, target = random_masks(12, 3, seed=7)
    target[9:] = 0  # volume 2 (slices 9-11): no foreground at all ...
    prediction[9:] = torch.where(prediction[9:] == 2, 2, 0)  # ... and only class 2 predicted
    volume_index = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    cases = [{"case": f"patient00{i}_ED", "patient": f"patient00{i}"} for i in range(3)]
    slices = SliceSet(torch.zeros(12, 1, 24, 20), target.to(torch.uint8), volume_index, cases)
    rows = per_volume_dice(prediction, slices, 3, ["a", "b"])
    result = summarize_counts(slice_counts(prediction, target, 3), volume_index, 3, ["a", "b"])
    assert [r["case"] for r in rows] == ["patient000_ED", "patient001_ED", "patient002_ED"]
    assert rows[1]["patient"] == "patient001"
    for name in ("a", "b"):
        defined = [r[f"dice_{name}"] for r in rows if r[f"dice_{name}"] is not None]
        assert sum(defined) / len(defined) == pytest.approx(result[f"dice_{name}"], abs=1e-12)
    assert rows[2]["dice_a"] is None and rows[2]["dice_b"] == 0.0 and rows[2]["dice"] == 0.0
    assert rows[0]["dice"] == pytest.approx((rows[0]["dice_a"] + rows[0]["dice_b"]) / 2)
