"""Kernel normalization fused with the convolution that follows it: KNConv (``norm=kn``).

KernelNorm normalizes every kernel window -- the C_in x kh x kw input elements one output position
of a convolution sees -- by the window's own mean and variance. Because those are scalars per
window, KernelNorm followed by the convolution equals the convolution followed by a correction:

    out[o] = (conv(x)[o] - mu_w * sum(W[o])) / sqrt(var_w + eps) + b[o]

and mu_w, var_w are box filters over the channel-summed x and x^2. This costs one ordinary
convolution plus two small (N, 1, H, W) box filters, instead of normalizing unfolded windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import compute_dtype, full_precision
from .registry import conv_norm_only, register_norm


def dropped_out(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The copy of x that the statistics are computed on: dropout (with 1/(1-p) scaling, as the
    official F.dropout) in training only."""
    return F.dropout(x, p) if training and p > 0 else x


def correction_reference(out, mean, var, weight_sums, bias, eps):
    """(out - mean * sum(W[o])) / sqrt(var + eps) + b[o] in plain autograd (torch.compile, torch.func)."""
    out = (out - mean * weight_sums[None, :, None, None]) * torch.rsqrt(var + eps)
    return out + bias[None, :, None, None]


class _Correction(torch.autograd.Function):
    """y = (out - mean * s) inv + b, inv = 1 / sqrt(var + eps), for the conv output ``out`` (N, O, H, W), the
    window statistics ``mean``, ``var`` (N, 1, H, W) and per-channel s = sum(W[o]), b: two passes forward,
    the conv output the only full-size tensor kept. Backward, per pixel and over the channels o:
        d out = g inv,   d mean = -inv sum_o g s,   d var = -inv^3 / 2 (sum_o g out - mean sum_o g s)
        d s = -sum_{n,h,w} g mean inv,   d b = sum_{n,h,w} g
    """

    @staticmethod
    def forward(ctx, out, mean, var, weight_sums, bias, eps):
        inv = torch.rsqrt(var + eps)
        y = torch.addcmul(bias[None, :, None, None], out, inv, out=torch.empty_like(out))
        y.addcmul_(mean * inv, weight_sums[None, :, None, None], value=-1)
        ctx.save_for_backward(out, mean, inv, weight_sums)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, mean, inv, weight_sums = ctx.saved_tensors
        with full_precision(out):
            weighted = torch.einsum("nohw,o->nhw", grad, weight_sums).unsqueeze(1)  # sum_o g s
            grad_out = torch.mul(grad, inv, out=torch.empty_like(out))
            grad_inv = (grad * out).sum(1, keepdim=True).sub_(mean * weighted)
            grad_var = grad_inv.mul_(inv.pow(3)).mul_(-0.5)
            grad_mean = -inv * weighted
            grad_sums = -torch.einsum("nohw,nhw->o", grad, (mean * inv).squeeze(1))
            return grad_out, grad_mean, grad_var, grad_sums, grad.sum(dim=(0, 2, 3)), None


def dropout_noise(x: torch.Tensor, p: float) -> torch.Tensor:
    """The multiplier of ``F.dropout(x, p)`` (0 or 1 / (1 - p) per element), drawn as torch draws it on the CPU
    (the same random numbers: a seeded run drops the same elements)."""
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


class _ChannelMoments(torch.autograd.Function):
    """Per pixel, the sums over the channels of s and s^2, s = x * keep (the dropped-out copy; x itself where
    ``keep`` is None): (N, 1, H, W) each, without keeping s. Backward, keep being 0 or k = 1 / (1 - p):
        dx = keep (d S1 + 2 k x d S2)   (without dropout: d S1 + 2 x d S2)
    """

    @staticmethod
    def forward(ctx, x, keep, k):
        source = x if keep is None else x * keep
        sums = source.sum(1, keepdim=True)
        square_sums = torch.linalg.vector_norm(source, 2, dim=1, keepdim=True).square_()
        ctx.save_for_backward(x, keep)
        ctx.k = 1.0 if keep is None else k
        return sums, square_sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums, grad_square_sums):
        x, keep = ctx.saved_tensors
        grad_x = torch.addcmul(grad_sums, x, grad_square_sums, value=2 * ctx.k, out=torch.empty_like(x))
        return (grad_x if keep is None else grad_x.mul_(keep)), None, None


class KNConv2d(nn.Conv2d):
    """A k x k convolution with 'same' zero padding whose every input window is kernel-normalized.

    Window statistics (biased variance) cover C_in x k x k elements including the zero padding, as
    in the official code; in training they are computed on a dropped-out copy of x (dropout
    ``dropout_p``), while the original elements are the ones normalized.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dropout_p: float = 0.05,
                 eps: float = 1e-5):
        if kernel_size % 2 != 1:
            raise ValueError(f"KNConv2d needs an odd kernel size for 'same' padding, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.dropout_p, self.eps = dropout_p, eps

    def window_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of every kernel window: two (N, 1, H, W) tensors."""
        x = compute_dtype(x)
        with full_precision(x):
            if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
                source = dropped_out(x, self.dropout_p, self.training)
                sums, square_sums = source.sum(1, keepdim=True), source.square().sum(1, keepdim=True)
            else:
                keep = dropout_noise(x, self.dropout_p) if self.training and self.dropout_p > 0 else None
                sums, square_sums = _ChannelMoments.apply(x, keep, 1 / (1 - self.dropout_p))
            box = dict(kernel_size=self.kernel_size, stride=1, padding=self.padding, count_include_pad=True)
            # avg_pool2d divides by kh*kw (padding included); the channel sum needs a further 1/C_in
            mean = F.avg_pool2d(sums, **box) / self.in_channels
            mean_sq = F.avg_pool2d(square_sums, **box) / self.in_channels
            return mean, (mean_sq - mean.square()).clamp_min(0)

    def forward(self, x, cond=None):
        out = F.conv2d(x, self.weight, None, padding=self.padding)
        mean, var = self.window_moments(x)
        weight_sums = self.weight.sum(dim=(1, 2, 3))
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return correction_reference(out, mean, var, weight_sums, self.bias, self.eps)
        with full_precision(mean):  # under autocast: the statistics' precision, as type promotion gave before
            dtype = torch.promote_types(out.dtype, mean.dtype)
            return _Correction.apply(out.to(dtype), mean, var, weight_sums.to(dtype), self.bias.to(dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, eps={self.eps}"


class KNConvTranspose2d(nn.ConvTranspose2d):
    """The 2x2 stride-2 up-convolution with kernel normalization.

    In a k x k transposed convolution with stride k every output pixel is computed from exactly one
    input position (the kernel windows do not overlap), so the unit that KernelNorm normalizes is
    that position's C_in-vector: KernelNorm with a 1 x 1 window (the official ``KernelNorm2d1x1``,
    statistics over the channels of each position, on a dropped-out copy in training), then the
    plain transposed convolution -- as the official ``KNConv2d1x1`` does for 1x1 convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, *, dropout_p: float = 0.05,
                 eps: float = 1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size)
        self.dropout_p, self.eps = dropout_p, eps

    def forward(self, x, cond=None):
        source = compute_dtype(dropped_out(x, self.dropout_p, self.training))
        with full_precision(source):
            var, mean = torch.var_mean(source, dim=1, keepdim=True, correction=0)
            normalized = (compute_dtype(x) - mean) * torch.rsqrt(var + self.eps)
        return super().forward(normalized)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, eps={self.eps}"


@register_norm("kn")
class KernelNormalization(nn.Module):
    """Kernel normalization, KNConv (Nasirigerdeh, Torkzadehmahani, Rueckert & Kaissis, "Kernel
    Normalized Convolutional Networks", TMLR 2024, arXiv 2205.10089; official code
    reza-nasirigerdeh/norm-torch).

    It replaces the pair convolution + normalization: ``make_conv_norm("kn", C_in, C_out, 3)``
    builds a ``KNConv2d`` (3x3, padding 1; the U-Net follows it with ReLU, there is no separate
    norm layer), and the 2x2 up-convolution becomes a ``KNConvTranspose2d`` (KernelNorm over each
    input position's channels, then the transposed conv). ``make_norm("kn", C)`` alone is an error.

    Options: ``dropout_p`` = 0.05 (the dropout of the copy the statistics come from), ``eps`` = 1e-5.
    Deliberate departure: the dropout is active in training only; the official code leaves it on
    in evaluation, which makes inference random (with p = 0.05 its evaluation output differs from
    the deterministic one by up to 0.11: docs/layers.md, tests/test_fidelity.py). Its dropout mask is
    drawn over the padded input, here over the input (the padding zeros stay zero either way: the
    same distribution, another draw). Without dropout it matches the official KNConv2d to 1e-9.
    """

    kind = "conv_pair"

    def __init__(self, *args, **kwargs):
        raise conv_norm_only("kn")

    @classmethod
    def conv_norm(cls, in_channels: int, out_channels: int, kernel_size: int, *, transpose: bool,
                  dropout_p: float = 0.05, eps: float = 1e-5) -> nn.Module:
        layer = KNConvTranspose2d if transpose else KNConv2d
        return layer(in_channels, out_channels, kernel_size, dropout_p=dropout_p, eps=eps)
