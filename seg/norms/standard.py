"""The plain layers of the ILN study: no normalization, batch, instance, layer and group norm.

Each is torch's own kernel behind the registry protocol (``forward(x, cond=None)``, options as
keyword arguments); batch norm also offers its frozen (BN*) and synchronized variants. Instance
and layer norm are expressed as group norm (C groups, 1 group), which is mathematically the same
layer with a per-channel affine and uses torch's fast fused group-norm kernel (except for a large
channels_last tensor in an eager training step on the CPU, where that kernel's backward is slow and
the same layer is computed from instance statistics: ``_GroupNormLayer``).

All of them stack (``can_stack``, seg/training/stacked.py): with ``runs=R`` over R*C channels, batch and
instance norm are per channel already, and layer and group norm take R times as many groups, so
that no group straddles two runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import instance_affine
from .registry import register_norm
from .sync import global_batch_stats, synchronized


def check_runs(num_channels: int, runs: int, layer: str) -> int:
    """The channels of one run of a stacked layer (``runs`` runs side by side on ``num_channels``); refuses
    a count that ``runs`` does not divide, naming both."""
    if runs < 1 or num_channels % runs != 0:
        raise ValueError(f"{layer}: {num_channels} channels cannot hold {runs} stacked runs of equal width")
    return num_channels // runs


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

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, runs: int = 1):
        super().__init__()
        check_runs(num_channels, runs, "none")

    def forward(self, x, cond=None):
        return x


@register_norm("bn")
class BatchNorm(nn.BatchNorm2d):
    """Batch normalization (Ioffe & Szegedy, ICML 2015, arXiv 1502.03167).

    Statistics over (N, H, W) per channel in training; running mean and unbiased running
    variance (momentum 0.1) in evaluation -- exactly ``torch.nn.BatchNorm2d``.

    ``freeze: true`` is "BN*", the frozen BN of the Group Normalization paper (Wu & He, ECCV 2018,
    arXiv 1803.08494): the layer is the per-channel linear map y = gamma (x - mu) / sigma + beta with
    the running mu, sigma^2 used and never updated, in training too; with ``freeze_affine: true``
    (the default) gamma and beta are frozen as well (requires_grad false). It is only meaningful when
    fine-tuning from a BN-trained checkpoint (``model.init_from=<checkpoint.pt>``): from scratch the
    running statistics are just 0 and 1.

    ``sync: true`` gives SyncBatchNorm semantics (cross-GPU BN, Peng et al., "MegDet", CVPR 2018,
    arXiv 1711.07240): when torch.distributed is initialized with more than one process (torchrun),
    training statistics, and the running statistics they update, are those of the global batch
    (``sync.global_batch_stats``; any device, gloo or NCCL). Otherwise the layer is exactly BN.
    Convert with this option rather than ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would
    drop ``freeze`` and needs CUDA.
    """

    kind = "post_conv"
    batch_statistics = True
    can_sync = True
    can_stack = True  # per channel: R runs are R*C channels, nothing else changes

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1, freeze: bool = False,
                 freeze_affine: bool = True, sync: bool = False, runs: int = 1):
        check_runs(num_channels, runs, "bn")
        super().__init__(num_channels, eps=eps, momentum=momentum)
        self.freeze, self.sync = freeze, sync
        if freeze and freeze_affine:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)

    def forward(self, x, cond=None):
        if self.freeze:  # BN*: the running statistics, never updated
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                                eps=self.eps)
        if self.sync and self.training and synchronized():
            return self.sync_forward(x)
        return super().forward(x)

    def sync_forward(self, x):
        """Training step with statistics over the global batch of all processes."""
        y, var_in, mean_in = instance_affine(x, self.sync_coefficients, self.weight, self.bias)
        with torch.no_grad():  # running statistics as nn.BatchNorm2d's, of the global batch
            var, mean, count = global_batch_stats(var_in, mean_in)
            pixels = count * x.shape[2] * x.shape[3]
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * pixels / (pixels - 1).clamp(min=1)).to(self.running_var.dtype),
                                   self.momentum)
            self.num_batches_tracked.add_(1)
        return y

    def sync_coefficients(self, var_in, mean_in, weight, bias):
        """(scale, shift) of y = x * scale + shift from the global batch's statistics."""
        var, mean, _ = global_batch_stats(var_in, mean_in)
        scale = weight * torch.rsqrt(var + self.eps)
        return scale, bias - mean * scale


class _GroupNormLayer(nn.GroupNorm):
    """torch's GroupNorm behind the registry protocol (ignores ``cond``).

    One exception, for speed only: a large channels_last tensor on the CPU, in an eager step that
    needs gradients. torch's CPU group-norm backward for that layout is several times slower than for
    contiguous ones (forward + backward 46 against 18 ms on (8, 16, 256, 256)), and the U-Net runs
    channels_last by default; there the layer is computed by ``instance_affine`` from the instance
    statistics, the group's mean and variance being exact functions of them (``group_coefficients``).
    The same layer to float rounding (tests/test_norms.py compares both with torch's).
    """

    def forward(self, x, cond=None):
        if (x.device.type == "cpu" and x.dim() == 4 and x.numel() >= 1 << 16 and self.affine
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()):
            return instance_affine(x, self.group_coefficients, self.weight, self.bias)[0]
        return super().forward(x)

    def group_coefficients(self, var_in, mean_in, weight, bias):
        """(scale, shift) per sample and channel from the instance statistics (N, C): each group's mean is the
        mean of its channels' means, its variance the mean of their variances plus the variance of their means."""
        n, c = var_in.shape
        shape = (n, self.num_groups, c // self.num_groups)
        var, mean = var_in.view(shape), mean_in.view(shape)
        group_mean = mean.mean(-1, keepdim=True)
        group_var = (var + (mean - group_mean).square()).mean(-1, keepdim=True)
        scale = torch.rsqrt(group_var + self.eps) * weight.view(shape[1:])
        return scale.view(n, c), bias - (group_mean * scale).view(n, c)


@register_norm("in")
class InstanceNorm(_GroupNormLayer):
    """Instance normalization (Ulyanov et al. 2016, arXiv 1607.08022).

    Statistics over (H, W) per sample and channel, the same in training and evaluation, with a
    per-channel affine: ``InstanceNorm2d(C, affine=True)`` computed as ``GroupNorm(C, C)``.
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, eps: float = 1e-5, runs: int = 1):
        check_runs(num_channels, runs, "in")
        super().__init__(num_channels, num_channels, eps=eps)


@register_norm("ln")
class LayerNorm(_GroupNormLayer):
    """Layer normalization (Ba et al. 2016, arXiv 1607.06450) for feature maps.

    Statistics over (C, H, W) per sample; per-channel affine, i.e. ``GroupNorm(1, C)`` -- the
    convolutional reading used by the GN and ILN papers (the original LN has a per-element affine).
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, eps: float = 1e-5, runs: int = 1):
        check_runs(num_channels, runs, "ln")
        super().__init__(runs, num_channels, eps=eps)  # one group per run


@register_norm("gn")
class GroupNorm(_GroupNormLayer):
    """Group normalization (Wu & He, ECCV 2018, arXiv 1803.08494).

    Statistics over (H, W) and a group of C/G channels per sample; per-channel affine.
    ``groups`` defaults to 16 (the ILN study's setting); C must be a multiple of it.
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, groups: int = 16, eps: float = 1e-5, runs: int = 1):
        check_groups(check_runs(num_channels, runs, "gn"), groups, "gn")
        super().__init__(groups * runs, num_channels, eps=eps)  # ``groups`` per run
