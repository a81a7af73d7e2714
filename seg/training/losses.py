"""Losses by name: the table that the top-level ``loss`` key chooses from.

A loss is a function ``(logits (N, C, H, W) float32, labels (N, H, W) int64) -> scalar``; ``LOSSES``
maps each name to the function that builds it. The config's valid choices are this table's names, so
a new loss is one builder here (and, should it take options, one YAML with a check beside it).

* ``ce``: cross-entropy on the logits, the ILN study's loss;
* ``dice_ce``: MONAI's ``DiceCELoss`` (softmax, labels one-hot): cross-entropy plus the Dice loss over
  the classes, background included.

``auxiliary_loss`` is the loss of a conditioner's low-resolution head (sean's coarse regions), added
with weight ``model.aux_weight`` by the training step (seg/training/step.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config.schema import check_choice

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy() -> Loss:
    return F.cross_entropy


def dice_ce() -> Loss:
    from monai.losses import DiceCELoss  # MONAI's losses import slowly: only when chosen

    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    return lambda logits, labels: loss(logits, labels.unsqueeze(1))


LOSSES: dict[str, Callable[[], Loss]] = {"ce": cross_entropy, "dice_ce": dice_ce}


def check_loss(name) -> None:
    """``loss`` must name a loss of the table."""
    check_choice("loss", name, LOSSES)


def build_loss(name: str) -> Loss:
    """The loss function named ``name`` (checked by ``check_loss``)."""
    return LOSSES[name]()


def auxiliary_loss(aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a low-resolution prediction against each class's share of the pixels of its cell."""
    target = F.one_hot(labels.long(), aux_logits.shape[1]).permute(0, 3, 1, 2).float()
    return F.cross_entropy(aux_logits.float(), F.adaptive_avg_pool2d(target, aux_logits.shape[-2:]))
