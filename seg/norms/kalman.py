"""Batch Kalman Normalization (``norm=bkn``): batch statistics combined with a prior from the layer before.

The prior needs two things a plain norm layer does not have: the weights of the convolution it
follows, and the output distribution of the preceding BKN layer. The first is why BKN replaces
the pair convolution + normalization (``conv_norm``). The second travels with the activations:
every BKN pair tags its output tensor (in training) with its affine parameters (gamma, beta); the U-Net's
in-place ReLU keeps the tensor object (and so the tag), and the next BKN pair that receives
exactly that tensor uses it as its prior. Anything in between that makes a new tensor (max-pool,
the skip concatenation, a non-in-place activation) drops the tag, and that pair falls back to plain
batch statistics -- as does the first convolution of the network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fused import compute_dtype, full_precision, instance_affine
from .mixed import batch_stats
from .registry import conv_norm_only, make_conv, register_norm

# attribute of an output tensor: (gamma, beta) of the BKN layer that produced it
PRIOR_ATTRIBUTE = "_bkn_output_affine"


def rectified_gaussian_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ReLU(z) for z ~ N(mean, std^2), elementwise (the rectified Gaussian)."""
    std = std.clamp_min(1e-12)
    t = mean / std
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-0.5 * t.square()) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean.square() + std.square()) * cdf + mean * std * pdf
    return first, (second - first.square()).clamp_min(0)


def conv_output_moments(weight: torch.Tensor, bias: torch.Tensor, transposed: bool, in_mean: torch.Tensor,
                        in_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance, over output positions, of a convolution's output for inputs
    whose channels are independent with the given means and variances at every position, each
    position independent of the others (zero padding at the borders is ignored). Two (C_out,) tensors.

    ``transposed``: a stride = kernel ConvTranspose2d (weight (C_in, C_out, kh, kw)), else a 'same'
    Conv2d (weight (C_out, C_in, kh, kw)).
    """
    if transposed:
        # each output pixel sees one input position through one tap (i, j); the output
        # distribution is the equal mixture over the kh * kw taps
        tap_mean = torch.einsum("c,coij->oij", in_mean, weight) + bias[:, None, None]
        tap_var = torch.einsum("c,coij->oij", in_var, weight.square())
        return tap_mean.mean((1, 2)), tap_var.mean((1, 2)) + tap_mean.var((1, 2), correction=0)
    # every output pixel sums all kh * kw taps of every input channel
    return weight.sum((2, 3)) @ in_mean + bias, weight.square().sum((2, 3)) @ in_var


class KalmanConvNorm(nn.Module):
    """A convolution followed by batch Kalman normalization (see ``BatchKalmanNormalization``).

    In training the output is one fused ``y * scale + shift`` from the instance statistics of the
    conv output y (``fused.instance_affine``; the batch statistics are pooled from them), with the
    prior computed inside the small per-channel graph, so gradients reach the conv weights and the
    preceding layer's gamma, beta through it.
    """

    def __init__(self, conv: nn.Module, p: float = 0.9, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        if self.transposed and conv.stride != conv.kernel_size:
            raise ValueError("bkn: a transposed convolution must have stride = kernel size (non-overlapping taps)")
        if conv.bias is None:
            raise ValueError("bkn: the convolution needs a bias")
        self.conv = conv
        self.p, self.eps, self.momentum = p, eps, momentum
        channels = conv.out_channels
        self.weight = nn.Parameter(torch.ones(channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def prior(self, conv_weight, conv_bias, source_gamma, source_beta) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of this conv's output predicted from the preceding BKN layer: its
        normalized output gamma * x_hat + beta taken as N(beta, gamma^2) per channel, through ReLU
        (rectified-Gaussian moments) and this convolution (analytically)."""
        relu_mean, relu_var = rectified_gaussian_moments(source_beta, source_gamma.abs())
        return conv_output_moments(conv_weight, conv_bias, self.transposed, relu_mean, relu_var)

    def kalman_statistics(self, var_in, mean_in, *prior_inputs, count: int = 0):
        """(mean, var) to normalize with, and the variance for the running average (batch term
        unbiased over ``count`` values), from the instance statistics (N, C) of the conv output.
        ``prior_inputs`` = (conv weight, conv bias, preceding gamma, preceding beta), or none."""
        batch_var, batch_mean = batch_stats(var_in, mean_in)
        unbiased_batch_var = batch_var * (count / max(count - 1, 1))
        if not prior_inputs:  # no preceding BKN layer: plain batch statistics
            return batch_mean, batch_var, unbiased_batch_var
        p = self.p
        prior_mean, prior_var = self.prior(*prior_inputs)
        spread = p * (1 - p) * (batch_mean - prior_mean).square()
        mean = p * prior_mean + (1 - p) * batch_mean
        return mean, p * prior_var + (1 - p) * batch_var + spread, p * prior_var + (1 - p) * unbiased_batch_var + spread

    def coefficients(self, var_in, mean_in, weight, bias, *prior_inputs):
        """(scale, shift) per channel of y * scale + shift in training."""
        mean, var, _ = self.kalman_statistics(var_in, mean_in, *prior_inputs)
        scale = weight * torch.rsqrt(var + self.eps)
        return scale, bias - mean * scale

    def forward(self, x, cond=None):
        source_affine = getattr(x, PRIOR_ATTRIBUTE, None)
        y = self.conv(x)
        if not self.training:
            y = compute_dtype(y)
            with full_precision(y):
                scale = self.weight * torch.rsqrt(self.running_var + self.eps)
                shift = self.bias - self.running_mean * scale
                return torch.addcmul(shift[:, None, None], y, scale[:, None, None])
        use_prior = source_affine is not None and self.p > 0
        prior_inputs = (self.conv.weight, self.conv.bias, *source_affine) if use_prior else ()
        out, var_in, mean_in = instance_affine(y, self.coefficients, self.weight, self.bias, *prior_inputs)
        with torch.no_grad():  # moving averages for evaluation, as nn.BatchNorm2d
            count = y.shape[0] * y.shape[2] * y.shape[3]
            mean, _, running_var = self.kalman_statistics(var_in, mean_in, *prior_inputs, count=count)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(running_var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        setattr(out, PRIOR_ATTRIBUTE, (self.weight, self.bias))
        return out


@register_norm("bkn")
class BatchKalmanNormalization(nn.Module):
    """Batch Kalman Normalization (Wang, Peng, Luo, Wang & Lin, "Batch Kalman Normalization: Towards
    Training Deep Neural Networks with Micro-Batches", 2018, arXiv 1802.03133; official code
    wanggrun/Kalman-Normalization, TensorFlow).

    In training, the batch statistics (mu_b, var_b) of a conv output are combined with a prior
    (mu_p, var_p) predicted from the preceding layer:
        mu = p mu_p + (1 - p) mu_b,   var = p var_p + (1 - p) var_b + p (1 - p) (mu_b - mu_p)^2,
    p = 0.9 as in the official code; y = gamma (x - mu) / sqrt(var + eps) + beta. Moving averages
    of (mu, var) (momentum 0.1, the batch variance term unbiased as in nn.BatchNorm2d) are used in
    evaluation. It replaces the pair convolution + normalization (``make_conv_norm``);
    ``make_norm("bkn", C)`` alone is an error.

    Decisions (pragmatic, documented):
    * The prior is computed analytically rather than by the official Monte-Carlo sample: the
      preceding BKN layer's normalized output is taken as N(beta, gamma^2) per channel, carried
      through ReLU with rectified-Gaussian moments and through this convolution assuming
      independent channels and positions (borders ignored). The official code samples a Gaussian
      (with the preceding layer's pre-normalization statistics) through ReLU and the same conv.
      Gradients flow through the prior into the conv weights and the preceding gamma, beta.
    * The preceding layer is known only when this pair's input is exactly the ReLU'd output of a
      BKN pair (see the module docstring); otherwise (first conv, after max-pool or the skip
      concatenation) the pair uses plain batch statistics. The 2x2 up-convolution's prior uses the
      mixture over its four non-overlapping taps.
    * Not ported: the official guard that falls back to batch statistics when the prior variance
      exceeds 100x the batch variance, and its micro-batch splitting (``split_num``).
    """

    def __init__(self, num_channels: int, p: float = 0.9, eps: float = 1e-5, momentum: float = 0.1):
        raise conv_norm_only("bkn")

    @classmethod
    def conv_norm(cls, in_channels: int, out_channels: int, kernel_size: int, *, transpose: bool,
                  p: float = 0.9, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
        conv = make_conv(in_channels, out_channels, kernel_size, transpose=transpose)
        return KalmanConvNorm(conv, p=p, eps=eps, momentum=momentum)
