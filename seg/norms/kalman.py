"""Batch Kalman Normalization (``norm=bkn``): batch statistics combined with a prior from the layer before.

The prior needs two things a plain norm layer does not have: the weights of the convolution it
follows, and what the preceding BKN layer knew. The first is why BKN replaces the pair
convolution + normalization (``conv_norm``). The second travels with the activations: every BKN
pair tags its output tensor (in training) with its affine parameters (gamma, beta) and the
statistics it normalized with; the U-Net's in-place ReLU keeps the tensor object (and so the
tag), and the next BKN pair that receives exactly that tensor uses it for its prior. Anything in
between that makes a new tensor (max-pool, the skip concatenation, a non-in-place activation)
drops the tag, and that pair falls back to plain batch statistics -- as does the first
convolution of the network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fused import compute_dtype, full_precision, instance_affine
from .mixed import batch_stats
from .registry import conv_norm_only, make_conv, register_norm

PRIORS = ("sampled", "analytic")
# the official guard: when the prior's variance is on average this many times the batch variance,
# the layer uses the batch statistics alone
PRIOR_VARIANCE_LIMIT = 100.0

# attribute of an output tensor: what the BKN layer that produced it hands to the next one,
# (gamma, beta, mean, var) -- its affine parameters and the statistics it normalized with
PRIOR_ATTRIBUTE = "_bkn_prior_source"


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
    conv output y (``fused.instance_affine``; the batch statistics are pooled from them); the
    prior's moments enter the small per-channel graph as inputs, so gradients reach through them
    (into this conv's weights and the preceding layer's parameters and statistics).
    """

    def __init__(self, conv: nn.Module, p: float = 0.9, eps: float = 1e-5, momentum: float = 0.1,
                 prior: str = "sampled"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"bkn: prior={prior!r} is not valid; choose one of: {', '.join(PRIORS)}")
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        if self.transposed and conv.stride != conv.kernel_size:
            raise ValueError("bkn: a transposed convolution must have stride = kernel size (non-overlapping taps)")
        if conv.bias is None:
            raise ValueError("bkn: the convolution needs a bias")
        self.conv = conv
        self.p, self.eps, self.momentum, self.prior = p, eps, momentum, prior
        channels = conv.out_channels
        self.weight = nn.Parameter(torch.ones(channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def analytic_prior(self, source_gamma: torch.Tensor, source_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prior=analytic``: the preceding layer's normalized output gamma * x_hat + beta taken as
        N(beta, gamma^2) per channel, through ReLU (rectified-Gaussian moments) and this convolution
        (analytically, ``conv_output_moments``). Mean and variance, (C_out,) each."""
        relu_mean, relu_var = rectified_gaussian_moments(source_beta, source_gamma.abs())
        return conv_output_moments(self.conv.weight, self.conv.bias, self.transposed, relu_mean, relu_var)

    def sampled_prior(self, x: torch.Tensor, source_mean: torch.Tensor,
                      source_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prior=sampled`` (the official estimate): one image of Gaussian noise at the size of this
        conv's input x, with the mean and variance the preceding layer normalized with, through ReLU
        and this convolution (zero padding included); the mean and biased variance of the result
        over its positions. (C_out,) each; random in every training step."""
        shape = (1, source_mean.shape[0], *x.shape[2:])
        noise = torch.randn(shape, dtype=source_mean.dtype, device=source_mean.device)
        sample = torch.relu(source_mean[:, None, None] + source_var.sqrt()[:, None, None] * noise)
        out = compute_dtype(self.conv(sample.to(x.dtype)))
        with full_precision(out):
            var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        return mean, var

    def prior_moments(self, x: torch.Tensor, source) -> tuple[torch.Tensor, ...]:
        """(prior mean, prior variance) from the tag of the input, or () without a preceding BKN layer."""
        if source is None or self.p <= 0:
            return ()
        gamma, beta, mean, var = source
        return self.sampled_prior(x, mean, var) if self.prior == "sampled" else self.analytic_prior(gamma, beta)

    def statistics(self, var_in, mean_in, *prior):
        """(mean, var) to normalize with, from the instance statistics (N, C) of the conv output and
        the prior's (mean, var) (or none: plain batch statistics, biased variance).

        As the official code, the prior is used only while the mean over channels of
        prior variance / batch variance stays below ``PRIOR_VARIANCE_LIMIT`` (100)."""
        batch_var, batch_mean = batch_stats(var_in, mean_in)
        if not prior:
            return batch_mean, batch_var
        prior_mean, prior_var = prior
        p = self.p
        mean = p * prior_mean + (1 - p) * batch_mean
        var = p * prior_var + (1 - p) * batch_var + p * (1 - p) * (batch_mean - prior_mean).square()
        trusted = (prior_var.detach() / batch_var.detach()).mean() < PRIOR_VARIANCE_LIMIT
        return torch.where(trusted, mean, batch_mean), torch.where(trusted, var, batch_var)

    def coefficients(self, var_in, mean_in, weight, bias, *prior):
        """(scale, shift) per channel of y * scale + shift in training."""
        mean, var = self.statistics(var_in, mean_in, *prior)
        scale = weight * torch.rsqrt(var + self.eps)
        return scale, bias - mean * scale

    def forward(self, x, cond=None):
        source = getattr(x, PRIOR_ATTRIBUTE, None)
        y = self.conv(x)
        if not self.training:
            y = compute_dtype(y)
            with full_precision(y):
                scale = self.weight * torch.rsqrt(self.running_var + self.eps)
                shift = self.bias - self.running_mean * scale
                return torch.addcmul(shift[:, None, None], y, scale[:, None, None])
        prior = self.prior_moments(x, source)
        out, var_in, mean_in = instance_affine(y, self.coefficients, self.weight, self.bias, *prior)
        # the statistics this layer reports, as the official layer: moving averages for evaluation
        # and the next layer's sampled prior are made from them
        with full_precision(var_in):
            mean, var = self.statistics(var_in, mean_in, *prior)
        if not prior:
            # TF's fused batch norm (the official layer without a prior) reports the unbiased batch
            # variance and passes no gradient through its reported statistics
            count = y.shape[0] * y.shape[2] * y.shape[3]
            mean, var = mean.detach(), var.detach() * (count / max(count - 1, 1))
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        setattr(out, PRIOR_ATTRIBUTE, (self.weight, self.bias, mean, var))
        return out


@register_norm("bkn")
class BatchKalmanNormalization(nn.Module):
    """Batch Kalman Normalization (Wang, Peng, Luo, Wang & Lin, "Batch Kalman Normalization: Towards
    Training Deep Neural Networks with Micro-Batches", 2018, arXiv 1802.03133; official code
    wanggrun/Kalman-Normalization, TensorFlow: ``KalmanNorm/kalman_norm.py`` and the prior of
    ``KalmanNorm/cifar-kn-microbatch.py``).

    In training, the batch statistics (mu_b, var_b) of a conv output (biased variance) are combined
    with a prior (mu_p, var_p) predicted from the preceding BKN layer:
        mu = p mu_p + (1 - p) mu_b,   var = p var_p + (1 - p) var_b + p (1 - p) (mu_b - mu_p)^2,
    p = 0.9 as in the official code, and y = gamma (x - mu) / sqrt(var + eps) + beta. As there, the
    prior is dropped for a step (batch statistics alone) when the mean over channels of
    var_p / var_b reaches 100. Moving averages (momentum 0.1) of the statistics used are kept for
    evaluation: the combined ones (biased) where there was a prior, the unbiased batch variance
    where there was none -- the statistics the official layer reports (TF's fused batch norm, which
    it uses without a prior, reports the unbiased variance and no gradient through it). It replaces
    the pair convolution + normalization (``make_conv_norm``); ``make_norm("bkn", C)`` alone is an
    error.

    The prior (``prior``):
    * ``sampled`` (default; the official estimate): an image of Gaussian noise N(mu, var) per
      channel, with the statistics the preceding BKN layer normalized with, through ReLU and this
      convolution; the prior is the mean and biased variance of that image over its positions.
      The same random draw gives the official layer's outputs and gradients exactly.
    * ``analytic`` (this project's alternative, deterministic): the preceding layer's normalized
      output gamma x_hat + beta taken as N(beta, gamma^2), through ReLU with rectified-Gaussian
      moments and through this convolution assuming independent channels and positions (borders
      ignored). It models what the next convolution actually receives (the official sample ignores
      the preceding layer's normalization and affine), but it is not the authors' estimate: in
      docs/layers.md's measurement (two chained pairs, float64) its training output differs from the
      official layer's by up to 12 and its evaluation output by up to 110, where ``sampled`` agrees
      to 1e-9.

    Departures (each measured in docs/layers.md by tests/test_fidelity.py):
    * The preceding layer is known only when this pair's input is exactly the ReLU'd output of a
      BKN pair (see the module docstring); otherwise (first conv, after max-pool or the skip
      concatenation) the pair uses plain batch statistics. The official ResNet also carries the
      statistics through its residual sums; a U-Net has no residual sums. The 2x2 up-convolution
      (which the official network does not have) samples its prior the same way.
    * Not ported: the micro-batch splitting (``split_num``): the batch is one micro-batch.
    * eps is ``eps`` everywhere; TF's fused batch norm, which the official layer uses where it has
      no prior, raises any eps below 1.001e-5 to that value (effect on the outputs: below 1e-9).
    """

    kind = "conv_pair"
    batch_statistics = True

    def __init__(self, *args, **kwargs):
        raise conv_norm_only("bkn")

    @classmethod
    def conv_norm(cls, in_channels: int, out_channels: int, kernel_size: int, *, transpose: bool,
                  p: float = 0.9, eps: float = 1e-5, momentum: float = 0.1, prior: str = "sampled") -> nn.Module:
        conv = make_conv(in_channels, out_channels, kernel_size, transpose=transpose)
        return KalmanConvNorm(conv, p=p, eps=eps, momentum=momentum, prior=prior)
