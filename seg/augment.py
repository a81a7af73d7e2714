"""Batched data augmentation on the training device: random rotation (as in the ILN study) and flips.

One affine grid per batch, applied with ``grid_sample``: bilinear for images, nearest for labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, labels: torch.Tensor, *, rotate_deg: float, flip: bool,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by a uniform angle in [-rotate_deg, rotate_deg] and, if ``flip``, mirror it
    left-right and/or up-down with probability 1/2 each. images (N, 1, H, W) float, labels (N, H, W)."""
    if rotate_deg <= 0 and not flip:
        return images, labels
    n, device = images.shape[0], images.device
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(rotate_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = sy = torch.ones(n, device=device)
    if flip:
        sx = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        sy = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    zero = torch.zeros(n, device=device)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, zero], 1), torch.stack([sin * sx, cos * sy, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels.unsqueeze(1).to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return images, labels[:, 0].to(torch.uint8)
