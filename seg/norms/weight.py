"""Weight normalization of every convolution (``norm=wn``): no feature normalization at all."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .registry import conv_norm_only, register_norm


class WNConv2d(nn.Conv2d):
    """A 'same'-padded convolution (weight-normed by ``WeightNormalization.conv_norm``)."""

    def forward(self, x, cond=None):
        return super().forward(x)


class WNConvTranspose2d(nn.ConvTranspose2d):
    """A stride-k k x k transposed convolution (weight-normed by ``WeightNormalization.conv_norm``)."""

    def forward(self, x, cond=None):
        return super().forward(x)


@register_norm("wn")
class WeightNormalization(nn.Module):
    """Weight normalization (Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks", NeurIPS 2016, arXiv 1602.07868).

    Every convolution's weight is w = g * v / ||v|| per output channel, with torch's
    ``weight_norm`` parametrization (parameters ``parametrizations.weight.original0`` = g,
    ``original1`` = v); the block is conv -> ReLU with no feature normalization. It replaces the
    pair convolution + normalization (``make_conv_norm``); ``make_norm("wn", C)`` alone is an error.

    Per output channel means ``dim=0`` for a Conv2d (weight (C_out, C_in, k, k)) and ``dim=1`` for
    the up-convolution's ConvTranspose2d (weight (C_in, C_out, k, k)). Initialisation: the U-Net's
    scheme sets the effective weight w (``seg.model.unet.initialize`` writes it through the
    parametrization, so v = w and g = ||w||); the paper's data-dependent initialisation is not done
    (the one departure from the official code, openai/weightnorm; the forward pass matches).
    """

    kind = "conv_pair"

    def __init__(self, *args, **kwargs):
        raise conv_norm_only("wn")

    @classmethod
    def conv_norm(cls, in_channels: int, out_channels: int, kernel_size: int, *, transpose: bool) -> nn.Module:
        if transpose:
            return weight_norm(WNConvTranspose2d(in_channels, out_channels, kernel_size, stride=kernel_size), dim=1)
        return weight_norm(WNConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), dim=0)
