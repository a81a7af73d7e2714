"""The authors' published normalization code, re-implemented from reading it, for the comparisons of
the layer tests and of tests/test_fidelity.py.

Each function follows the named official file step by step (the same statistics, the same order of
operations, the same constants, its quirks included), written here in plain PyTorch on NCHW tensors;
nothing is copied. Options named ``*_fixed`` or ``with_*`` switch one documented departure of this
project on, so that each departure's effect can be measured alone. Parameters are taken from the
project's layers, so that both sides compute with the same values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def moments(x: torch.Tensor, dims, unbiased: bool = False):
    """(mean, variance) over ``dims``, kept as broadcastable dimensions."""
    mean = x.mean(dims, keepdim=True)
    count = math.prod(x.shape[d] for d in dims)
    var = (x - mean).square().sum(dims, keepdim=True) / (count - 1 if unbiased else count)
    return mean, var


# ---------------------------------------------------------------------------- the study's plain layers


class BatchNorm:
    """Batch normalization as torch.nn.BatchNorm2d defines it (Ioffe & Szegedy 2015 give no code):
    biased batch variance to normalize, running mean and unbiased running variance with momentum 0.1."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, dtype=torch.float64):
        self.eps, self.momentum = eps, momentum
        self.running_mean = torch.zeros(channels, dtype=dtype)
        self.running_var = torch.ones(channels, dtype=dtype)

    def __call__(self, x, weight, bias, training: bool):
        if training:
            mean, var = moments(x, (0, 2, 3))
            count = x.shape[0] * x.shape[2] * x.shape[3]
            with torch.no_grad():
                self.running_mean.lerp_(mean.flatten(), self.momentum)
                self.running_var.lerp_(var.flatten() * count / (count - 1), self.momentum)
        else:
            mean, var = per_channel(self.running_mean), per_channel(self.running_var)
        return (x - mean) / torch.sqrt(var + self.eps) * per_channel(weight) + per_channel(bias)


def instance_norm(x, weight, bias, eps=1e-5):
    """DmitryUlyanov/texture_nets InstanceNormalization.lua: batch norm of the (1, N*C, H, W) view in
    training mode (biased variance over H, W), then a per-channel affine."""
    mean, var = moments(x, (2, 3))
    return (x - mean) / torch.sqrt(var + eps) * per_channel(weight) + per_channel(bias)


def group_norm(x, groups, weight, bias, eps=1e-5):
    """Wu & He 2018, Fig. 3 (TensorFlow code in the paper): reshape to (N, G, C/G, H, W), moments over
    the last three axes (biased), normalize, reshape back, per-channel affine. Layer norm as read by
    the GN paper is groups = 1."""
    n, c, h, w = x.shape
    grouped = x.reshape(n, groups, c // groups, h, w)
    mean, var = moments(grouped, (2, 3, 4))
    normalized = ((grouped - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return normalized * per_channel(weight) + per_channel(bias)


# ---------------------------------------------------------------------------- bin, iln, sn


class BatchInstanceNorm:
    """hyseob/Batch-Instance-Normalization, models/batchinstancenorm.py: a _BatchNorm whose batch part
    has weight gamma * gate and whose instance part (batch norm of the (1, N*C) view, always in
    training mode) has weight gamma * (1 - gate); the bias is added once (by the batch part)."""

    def __init__(self, channels, eps=1e-5, momentum=0.1):
        self.batch = BatchNorm(channels, eps, momentum)
        self.eps = eps

    def __call__(self, x, gate, weight, bias, training):
        out_bn = self.batch(x, weight * gate, bias, training)
        mean, var = moments(x, (2, 3))
        out_in = (x - mean) / torch.sqrt(var + self.eps) * per_channel(weight * (1 - gate))
        return out_bn + out_in


def iln_paper(x, rho, alpha, beta, groups=16, eps=1e-5):
    """Zhou et al. 2019 (no code published): F_I = IN(x), F_L = LN(x), F_IL = sigmoid(rho) F_I +
    (1 - sigmoid(rho)) F_L, F_ILN = GN_groups(F_IL), y = alpha F_ILN + beta."""
    ones, zeros = torch.ones_like(alpha), torch.zeros_like(alpha)
    s = per_channel(torch.sigmoid(rho))
    mixed = s * instance_norm(x, ones, zeros, eps) + (1 - s) * group_norm(x, 1, ones, zeros, eps)
    return group_norm(mixed, groups, alpha, beta, eps)


class SwitchNorm2d(nn.Module):
    """switchablenorms/Switchable-Normalization, devkit/ops/switchable_norm.py (SwitchNorm2d with its
    defaults using_moving_average=True, using_bn=True, last_gamma=False); ``unbiased`` is the flag of
    its var_in (the official code uses torch's default, unbiased)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.9, unbiased=True):
        super().__init__()
        self.eps, self.momentum, self.unbiased = eps, momentum, unbiased
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        flat = x.view(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True, unbiased=self.unbiased)
        mean_ln = mean_in.mean(1, keepdim=True)
        second = var_in + mean_in ** 2
        var_ln = second.mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        wm, wv = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        return ((flat - mean) / (var + self.eps).sqrt()).view(n, c, h, w) * self.weight + self.bias


# ---------------------------------------------------------------------------- kn, wn, pn


def knconv(x, weight, bias, eps=1e-5, dropout_p=0.0, training=True):
    """reza-nasirigerdeh/norm-torch, layers/knconv.py (KNConv2d, 'same' padding): zero-pad, the plain
    convolution of the padded input, dropout of the padded input (F.dropout: on whatever the mode),
    unfold into windows, biased mean and variance of every C_in x k x k window, then
    (conv - mean * sum(W)) / sqrt(var + eps) + bias."""
    k = weight.shape[-1]
    padded = F.pad(x, (k // 2,) * 4)
    out = F.conv2d(padded, weight)
    source = F.dropout(padded, dropout_p, training=training) if dropout_p > 0 else padded
    windows = source.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H, W, k, k)
    mean = windows.mean((1, 4, 5))[:, None]
    var = (windows - mean[..., None, None]).square().mean((1, 4, 5))[:, None]
    out = (out - mean * weight.sum((1, 2, 3))[None, :, None, None]) / torch.sqrt(var + eps)
    return out + per_channel(bias)


def kernel_norm_1x1_then_transposed_conv(x, weight, bias, eps=1e-5):
    """norm-torch's KernelNorm2d1x1 (statistics over the channels of each position, biased) followed
    by the up-convolution -- KNConv2d1x1's recipe for a stride-k k x k transposed convolution, whose
    windows are single positions (the official networks have no transposed KNConv)."""
    mean, var = moments(x, (1,))
    return F.conv_transpose2d((x - mean) / torch.sqrt(var + eps), weight, bias, stride=weight.shape[-1])


def weight_normed(v, g, dim):
    """Salimans & Kingma 2016 (openai/weightnorm): w = g v / ||v||, the norm over every axis but ``dim``."""
    other = tuple(d for d in range(v.ndim) if d != dim)
    return g * v / v.square().sum(other, keepdim=True).sqrt()


def pono(x, eps=1e-5, unbiased=True):
    """Boyiliee/Positional-Normalization, pono_ms_torch.py (PONO): mean and variance over the channels
    at every position -- torch's default unbiased variance -- then (x - mean) / sqrt(var + eps)."""
    mean, var = moments(x, (1,), unbiased=unbiased)
    return (x - mean) / torch.sqrt(var + eps)


def frn_tlu(x, gamma, beta, tau, eps=1e-6):
    """The FRNLayer listing of Singh & Krishnan 2020 (TensorFlow, NHWC; here NCHW): nu2 = the mean of x^2
    over the spatial axes, x * rsqrt(nu2 + |eps|), then the TLU max(gamma * x + beta, tau)."""
    nu2 = x.square().mean((2, 3), keepdim=True)
    x = x * torch.rsqrt(nu2 + abs(eps))
    return torch.maximum(per_channel(gamma) * x + per_channel(beta), per_channel(tau))


# ---------------------------------------------------------------------------- lcn


def _valid_box_sums(t, window):
    """Sums over every window x window box that fits in (..., H, W): (..., H - window + 1, W - window + 1)."""
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:])
    sums = F.avg_pool2d(F.avg_pool2d(flat, (window, 1), stride=1), (1, window), stride=1) * window * window
    return sums.reshape(*lead, *sums.shape[-2:])


def _clipped_box_means(t, window):
    """Mean over each pixel's window x window box clipped to the image (separable, exact)."""
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:])
    r = window // 2
    rows = F.avg_pool2d(flat, (window, 1), stride=1, padding=(r, 0), count_include_pad=False)
    means = F.avg_pool2d(rows, (1, window), stride=1, padding=(0, r), count_include_pad=False)
    return means.reshape(*lead, *means.shape[-2:])


def lcn(x, weight, bias, channels_per_group=2, window=227, eps=1e-5, shift_fixed=False, clipped_borders=False,
        with_stat_grad=False):
    """anthonymlortiz/lcn, local_context_norm.py (LocalContextNorm).

    Where the window is smaller than the map in both directions: integral images of x and x^2
    (cumulative sums without a zero first row and column), each window's sum from four corners with a
    dilated 2x2 kernel -- so the windows cover rows and columns j+1 .. j+window, never row or column
    0 -- summed over each channel group, under no_grad; mean = S / n and
    var = (S2 - S^2 / n) / n with n = window^2 * channels_per_group; the (H - window) x (W - window)
    statistics are replicate-padded to H x W (floor of the difference before, ceil after); then
    (x - mean) / sqrt(var + eps) per group. Elsewhere: group norm with C / channels_per_group groups
    and the unbiased variance (with gradient). Then the per-channel affine.

    ``shift_fixed``: windows j .. j + window - 1 (every valid window, centred after padding).
    ``clipped_borders``: every pixel's own centred window clipped to the image (this project's rule;
    implies the shift fix). ``with_stat_grad``: the statistics keep their gradient.
    """
    n, c, h, w = x.shape
    groups = c // channels_per_group
    if not (window < h and window < w):
        flat = x.reshape(n, groups, -1)
        mean, var = flat.mean(-1, keepdim=True), flat.var(-1, keepdim=True)
        out = ((flat - mean) / (var + eps).sqrt()).reshape(n, c, h, w)
        return out * per_channel(weight) + per_channel(bias)
    grouped = x.reshape(n, groups, channels_per_group, h, w)
    with torch.enable_grad() if with_stat_grad else torch.no_grad():
        if clipped_borders:
            mean = _clipped_box_means(grouped.mean(2), window)
            var = _clipped_box_means(grouped.square().mean(2), window) - mean.square()
        else:
            source = grouped if shift_fixed else grouped[..., 1:, 1:]
            count = window * window * channels_per_group
            sums = _valid_box_sums(source.sum(2), window)
            squares = _valid_box_sums(source.square().sum(2), window)
            mean, var = sums / count, (squares - sums * sums / count) / count
            dh, dw = h - mean.shape[-2], w - mean.shape[-1]
            pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
            mean = F.pad(mean, pad, mode="replicate")
            var = F.pad(var, pad, mode="replicate")
    out = (grouped - mean[:, :, None]) / torch.sqrt(var[:, :, None] + eps)
    return out.reshape(n, c, h, w) * per_channel(weight) + per_channel(bias)


# ---------------------------------------------------------------------------- bkn


FUSED_BN_MIN_EPS = 1.001e-5  # TF's fused_batch_norm raises a smaller eps to this (a cuDNN requirement)


class KalmanNorm:
    """wanggrun/Kalman-Normalization, KalmanNorm/kalman_norm.py (KalmanNorm, split_num 1) with the prior
    of KalmanNorm/cifar-kn-microbatch.py.

    Without a prior: TF's fused batch norm in training mode (eps raised to 1.001e-5; biased variance
    to normalize; it reports the mean and the unbiased variance, through which TF passes no
    gradient). With a prior (mean_p, var_p): batch moments (tf.nn.moments, biased); if the mean over
    channels of var_p / var_b is below 100 the Kalman combination with p_rate p, else the batch
    moments; tf.nn.batch_normalization with eps; it reports the statistics used (with gradient).
    Moving averages of the reported statistics with decay 0.9 (no debiasing) are used in evaluation.
    """

    def __init__(self, channels, p=0.9, eps=1e-5, decay=0.9, fused_eps_floor=True, dtype=torch.float64):
        self.p, self.eps, self.decay = p, eps, decay
        self.fused_eps = max(eps, FUSED_BN_MIN_EPS) if fused_eps_floor else eps
        self.moving_mean = torch.zeros(channels, dtype=dtype)
        self.moving_var = torch.ones(channels, dtype=dtype)

    def __call__(self, y, gamma, beta, prior=None, training=True):
        if not training:
            return ((y - per_channel(self.moving_mean)) / torch.sqrt(per_channel(self.moving_var) + self.eps)
                    * per_channel(gamma) + per_channel(beta)), None
        mean_b, var_b = (t.flatten() for t in moments(y, (0, 2, 3)))
        if prior is None:
            eps = self.fused_eps
            mean, var = mean_b, var_b
            count = y.shape[0] * y.shape[2] * y.shape[3]
            reported = (mean_b.detach(), (var_b * count / (count - 1)).detach())
        else:
            eps = self.eps
            prior_mean, prior_var = prior
            if float((prior_var / var_b).mean().detach()) < 100:
                p = self.p
                mean = p * prior_mean + (1 - p) * mean_b
                var = p * prior_var + (1 - p) * var_b + p * (1 - p) * (mean_b - prior_mean).square()
            else:
                mean, var = mean_b, var_b
            reported = (mean, var)
        out = (y - per_channel(mean)) / torch.sqrt(per_channel(var) + eps) * per_channel(gamma) + per_channel(beta)
        with torch.no_grad():
            self.moving_mean.mul_(self.decay).add_((1 - self.decay) * reported[0])
            self.moving_var.mul_(self.decay).add_((1 - self.decay) * reported[1])
        return out, reported


def kalman_sampled_prior(conv: nn.Module, input_shape, mean, var):
    """cifar-kn-microbatch.py's state_input and the conv that follows: one image of standard normal
    noise (drawn here as one NCHW image of the conv input's size), times sqrt(var) plus mean of the
    preceding layer's reported statistics, ReLU, the same convolution (its zero padding included);
    the prior is the image's mean and biased variance over its positions (tf.nn.moments)."""
    noise = torch.randn(1, mean.shape[0], *input_shape[2:], dtype=mean.dtype)
    out = conv(torch.relu(noise * per_channel(var.sqrt()) + per_channel(mean)))
    return out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=False)


# ---------------------------------------------------------------------------- conditional layers


def conditional_instance_norm(x, labels, gamma_table, beta_table, eps=1e-5):
    """magenta/magenta, magenta/models/image_stylization/ops.py (conditional_instance_norm): gather the
    (gamma, beta) rows of each label, moments over H, W (biased), tf.nn.batch_normalization, eps 1e-5."""
    mean, var = moments(x, (2, 3))
    gamma, beta = gamma_table[labels][:, :, None, None], beta_table[labels][:, :, None, None]
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def adaptive_instance_norm(x, target_std, target_mean, eps=1e-5):
    """xunhuang1995/AdaIN-style, lib/AdaptiveInstanceNormalization.lua: SpatialBatchNormalization of the
    (1, N*C, H, W) view in training mode (biased variance, eps 1e-5) with weight = the style's std and
    bias = the style's mean (there computed from a style image; given here). Its updateGradInput is
    not implemented: the input gradient compared is that of this forward formula."""
    mean, var = moments(x, (2, 3))
    return (x - mean) / torch.sqrt(var + eps) * target_std[:, :, None, None] + target_mean[:, :, None, None]


def spade_modulation(segmap, shared_conv, gamma_conv, beta_conv, size):
    """NVlabs/SPADE, models/networks/normalization.py (SPADE): the map resized to the activation's size
    (nearest), mlp_shared = 3x3 conv + ReLU, then mlp_gamma and mlp_beta (3x3 convs)."""
    segmap = F.interpolate(segmap, size=size, mode="nearest")
    hidden = torch.relu(F.conv2d(segmap, shared_conv.weight, shared_conv.bias, padding=1))
    return (F.conv2d(hidden, gamma_conv.weight, gamma_conv.bias, padding=1),
            F.conv2d(hidden, beta_conv.weight, beta_conv.bias, padding=1))


def spade(x, segmap, layer, batch_norm: BatchNorm, training):
    """NVlabs/SPADE (SPADE.forward): parameter-free batch norm of x, then x_hat (1 + gamma) + beta."""
    ones, zeros = torch.ones(x.shape[1], dtype=x.dtype), torch.zeros(x.shape[1], dtype=x.dtype)
    normalized = batch_norm(x, ones, zeros, training)
    modulation = layer.modulation
    gamma, beta = spade_modulation(segmap, modulation.shared[0], modulation.gamma, modulation.beta, x.shape[2:])
    return normalized * (1 + gamma) + beta


def ace(x, segmap, style_codes, layer, batch_norm: BatchNorm, training, with_noise=True, with_region_fc=True,
        noise_in_eval=True, spade_map=None):
    """ZPdesu/SEAN, models/networks/normalization.py (ACE.forward, status 'train', use_rgb):

    noise = (randn(N, W, H, 1) * noise_var).transpose(1, 3), added to x before the parameter-free
    batch norm -- in every mode; the label map resized to x (nearest); for every sample i and label
    j present in it, relu(fc_mu<j>(style_codes[i][j])) scattered into that label's pixels (zeros
    elsewhere), then conv_gamma / conv_beta (3x3); SPADE's gamma, beta from the label map; blended
    by sigmoid(blending_gamma), sigmoid(blending_beta); out = x_hat (1 + gamma) + beta.
    ``with_noise`` / ``with_region_fc`` false leave that step out (this project's options);
    ``noise_in_eval`` false adds the noise in training only (this project's rule); ``spade_map``: the
    map SPADE's branch reads, if not the label map (this project conditions it on the image)."""
    n, c, h, w = x.shape
    if with_noise and (training or noise_in_eval):
        noise = (torch.randn(n, w, h, 1, dtype=x.dtype) * layer.noise_var).transpose(1, 3)
        x = x + noise
    ones, zeros = torch.ones(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype)
    normalized = batch_norm(x, ones, zeros, training)
    segmap = F.interpolate(segmap, size=(h, w), mode="nearest")
    middle = torch.zeros(n, style_codes.shape[-1], h, w, dtype=x.dtype)
    for i in range(n):
        for j in range(segmap.shape[1]):
            mask = segmap[i, j].bool()
            if mask.any():
                code = style_codes[i, j]
                mu = torch.relu(F.linear(code, layer.region_fc[j].weight, layer.region_fc[j].bias)) \
                    if with_region_fc else code
                middle[i, :, mask] = mu[:, None]
    gamma_avg = F.conv2d(middle, layer.style_gamma.weight, layer.style_gamma.bias, padding=1)
    beta_avg = F.conv2d(middle, layer.style_beta.weight, layer.style_beta.bias, padding=1)
    modulation = layer.modulation
    gamma_spade, beta_spade = spade_modulation(segmap if spade_map is None else spade_map, modulation.shared[0],
                                               modulation.gamma, modulation.beta, (h, w))
    a_gamma, a_beta = torch.sigmoid(layer.blend_gamma), torch.sigmoid(layer.blend_beta)
    gamma = a_gamma * gamma_avg + (1 - a_gamma) * gamma_spade
    beta = a_beta * beta_avg + (1 - a_beta) * beta_spade
    return normalized * (1 + gamma) + beta
