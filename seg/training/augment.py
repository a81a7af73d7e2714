"""Batched data augmentation on the training device: random rotation (as in the ILN study) and flips.

One affine grid per batch, applied with ``grid_sample``: bilinear for images, nearest for labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, labels: torch.Tensor, *, rotate_deg: float, flip: bool,
                  generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by a uniform angle in [-rotate_deg, rotate_deg] and, if ``flip``, mirror it
    left-right and/or up-down with probability 1/2 each. images (N, 1, H, W) float, labels (N, H, W).

    ``shard=(rank, size)``: the batch is rows rank, rank + size, ... of a global batch of size x N
    samples (data-parallel training). The random numbers are drawn for the whole global batch and
    this shard's rows taken, so the ranks' generators stay in step and together augment exactly as
    one process with the global batch would.
    """
    if rotate_deg <= 0 and not flip:
        return images, labels
    rank, size = shard
    draws = draw_augmentation(images.shape[0] * size, generator, images.device, rotate_deg, flip)
    return rotate_and_flip(images, labels, *(t[rank::size] for t in draws))


def draw_augmentation(n: int, generator: torch.Generator, device, rotate_deg: float, flip: bool):
    """The random numbers of n samples' augmentation, in the order ``augment_batch`` draws them: the
    rotation's (cos, sin) and the mirrorings (sx, sy) in {-1, 1}, each (n,)."""
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(rotate_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = sy = torch.ones(n, device=device)
    if flip:
        sx = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        sy = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return cos, sin, sx, sy


def rotate_and_flip(images: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    sx: torch.Tensor, sy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The geometry, sample by sample: bilinear with border padding for the images (N, C, H, W), nearest
    with zeros for the labels (N, H, W) uint8."""
    zero = torch.zeros(cos.shape[0], device=images.device)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, zero], 1), torch.stack([sin * sx, cos * sy, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels.unsqueeze(1).to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return images, labels[:, 0].to(torch.uint8)
