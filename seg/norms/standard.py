"""The plain layers of the ILN study: no normalization, batch, instance, layer and group norm.

Each is torch's own kernel behind the registry protocol (``forward(x, cond=None)``, options as
keyword arguments). Instance and layer norm are expressed as group norm (C groups, 1 group),
which is mathematically the same layer with a per-channel affine and uses torch's fast fused
group-norm kernel.
"""

from __future__ import annotations

from torch import nn

from .registry import register_norm


def check_groups(num_channels: int, groups: int, layer: str) -> None:
    """Refuse a channel count that the group count does not divide, naming both."""
    if groups < 1 or num_channels % groups != 0:
        raise ValueError(
            f"{layer}: {num_channels} channels cannot be split into {groups} groups "
            f"(the channel count must be a multiple of the group count)"
        )


@register_norm("none")
class NoNorm(nn.Identity):
    """No normalization: the block is conv -> ReLU (the study's baseline)."""

    def __init__(self, num_channels: int):
        super().__init__()

    def forward(self, x, cond=None):
        return x


@register_norm("bn")
class BatchNorm(nn.BatchNorm2d):
    """Batch normalization (Ioffe & Szegedy, ICML 2015, arXiv 1502.03167).

    Statistics over (N, H, W) per channel in training; running mean and unbiased running
    variance (momentum 0.1) in evaluation -- exactly ``torch.nn.BatchNorm2d``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_channels, eps=eps, momentum=momentum)

    def forward(self, x, cond=None):
        return super().forward(x)


class _GroupNormLayer(nn.GroupNorm):
    """torch's GroupNorm behind the registry protocol (ignores ``cond``)."""

    def forward(self, x, cond=None):
        return super().forward(x)


@register_norm("in")
class InstanceNorm(_GroupNormLayer):
    """Instance normalization (Ulyanov et al. 2016, arXiv 1607.08022).

    Statistics over (H, W) per sample and channel, the same in training and evaluation, with a
    per-channel affine: ``InstanceNorm2d(C, affine=True)`` computed as ``GroupNorm(C, C)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, num_channels, eps=eps)


@register_norm("ln")
class LayerNorm(_GroupNormLayer):
    """Layer normalization (Ba et al. 2016, arXiv 1607.06450) for feature maps.

    Statistics over (C, H, W) per sample; per-channel affine, i.e. ``GroupNorm(1, C)`` -- the
    convolutional reading used by the GN and ILN papers (the original LN has a per-element affine).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)


@register_norm("gn")
class GroupNorm(_GroupNormLayer):
    """Group normalization (Wu & He, ECCV 2018, arXiv 1803.08494).

    Statistics over (H, W) and a group of C/G channels per sample; per-channel affine.
    ``groups`` defaults to 16 (the ILN study's setting); C must be a multiple of it.
    """

    def __init__(self, num_channels: int, groups: int = 16, eps: float = 1e-5):
        check_groups(num_channels, groups, "gn")
        super().__init__(groups, num_channels, eps=eps)
