"""Layers that learn a mix of normalizations: instance-layer (ILN), batch-instance (BIN), switchable (SN).

Their statistics come from a single reduction over (H, W): the instance statistics. Layer, batch
and group statistics are exact functions of them (means of means; variances by the law of total
variance), so no second full-size pass over the feature map and no full-size intermediate per
ingredient is needed -- each output is one fused ``x * scale + shift`` with per-(sample, channel)
scale and shift, computed by ``fused.instance_affine`` (hand-written backward).

All three stack (``can_stack``, seg/training/stacked.py): with ``runs=R`` over R*C channels, the layer and
group statistics are pooled over each run's own C channels (``per_run``), the batch statistics
are per channel anyway, and SN's mixing weights are R triples.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .fused import instance_affine
from .registry import register_norm
from .standard import check_groups, check_runs
from .sync import global_batch_stats, synchronized


def pooled_stats(var: torch.Tensor, mean: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of ``groups`` equal channel groups from per-channel statistics (N, C).

    For channels c of a group with equal pixel counts: mean_g = mean_c(mean_c) and
    var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2) (the law of total variance, which
    avoids the cancellation of E[x^2] - E[x]^2). Returns (N, groups) tensors.
    """
    n = var.shape[0]
    var, mean = var.reshape(n, groups, -1), mean.reshape(n, groups, -1)
    pooled_mean = mean.mean(-1)
    pooled_var = var.mean(-1) + (mean - pooled_mean.unsqueeze(-1)).square().mean(-1)
    return pooled_var, pooled_mean


def per_run(t: torch.Tensor, runs: int, channels: int) -> torch.Tensor:
    """A per-run statistic (N, runs) spread over each run's channels: (N, runs * channels); with one
    run, (N, 1) as it is (it broadcasts)."""
    return t if runs == 1 else t.repeat_interleave(channels, dim=1)


def batch_stats(var: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel statistics over (N, H, W) from instance statistics (N, C): two (C,) tensors."""
    batch_mean = mean.mean(0)
    return var.mean(0) + (mean - batch_mean).square().mean(0), batch_mean


@register_norm("iln")
class InstanceLayerNorm(nn.Module):
    """Instance-Layer Normalization (Zhou, Li, Wang & Yang, "U-Net Training with Instance-Layer
    Normalization", MMMI 2019, arXiv 1908.08466; no official code is published: the reference is
    the paper's formulas).

    F_IL = s * IN(x) + (1 - s) * LN(x) with s = sigmoid(rho) per channel (IN and LN
    parameter-free), then F_ILN = GN_G(F_IL) parameter-free with G = ``groups`` = 16 (the paper's
    groups g = 1..16), and y = alpha * F_ILN + beta. The sigmoid replaces BIN's clip of the mixing
    weight; the cascaded group norm restores a normalized distribution after the mix.

    Decisions where the paper is open: rho is per channel and initialised to 0 so that the mixing
    weight s starts at 0.5 (the paper's "rho initialised to 0.5" read as the weight); eps = 1e-5 in
    each of the three normalizations. Not U-GAT-IT's "ILN" (clip, no GN).

    Where channels == groups, rho has no effect. Then every group of the cascaded group norm is
    one channel. Per sample and channel c, IN(x) = (x - m_c) / sqrt(v_c + eps) and
    LN(x) = (x - m) / sqrt(v + eps) are both affine maps of x_c, so their mix is one too:
    F_IL = a_c x_c + b_c with a_c = s / sqrt(v_c + eps) + (1 - s) / sqrt(v + eps) > 0. The
    single-channel group norm of an affine map removes it:
        GN(F_IL)_c = a_c (x_c - m_c) / sqrt(a_c^2 v_c + eps) = (x_c - m_c) / sqrt(v_c + eps / a_c^2),
    which is IN(x) up to the eps term: s (and rho) only moves eps / a_c^2, a relative change of
    the order of eps / v_c. Its gradient is that small too, so rho does not learn there and stays
    near its initial value: ``mixing_weights_inert`` then names the reason, for whoever reports
    the weights. In this U-Net (widths 16 * 2^level) ``groups`` in 1, 2, 4, 8 keeps rho effective
    at every width (16 to 256 channels); the paper's 16 groups make it inert at every 16-channel
    layer.

    Implementation: every step is affine per (sample, channel), so the layer is computed as
    x * scale + shift from the instance statistics alone (LN and GN statistics of the mix are
    derived from them exactly); the result equals the three-step formula to float precision.
    Stacked (``runs`` > 1): the LN statistics and the ``groups`` groups are those of each run.
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, groups: int = 16, eps: float = 1e-5, rho_init: float = 0.0,
                 runs: int = 1):
        super().__init__()
        check_groups(check_runs(num_channels, runs, "iln"), groups, "iln")
        self.groups, self.eps, self.runs = groups, eps, runs
        self.rho = nn.Parameter(torch.full((num_channels,), float(rho_init)))
        self.weight = nn.Parameter(torch.ones(num_channels))  # alpha
        self.bias = nn.Parameter(torch.zeros(num_channels))  # beta
        # why the mixing weights have no effect in this layer, or None where they act
        self.mixing_weights_inert = "rho has no effect (channels = groups)" if num_channels == groups * runs else None

    def mixing_weights(self) -> dict[str, torch.Tensor]:
        """The learned choice, logged per layer: s = sigmoid(rho), the weight of IN in the mix
        (meaningless where ``mixing_weights_inert`` is set)."""
        return {"sigmoid_rho": torch.sigmoid(self.rho)}

    def coefficients(self, var_in, mean_in, rho, weight, bias):
        """(scale, shift) of y = x * scale + shift, per (sample, channel), from instance statistics."""
        channels = var_in.shape[1] // self.runs  # of one run
        var_ln, mean_ln = (per_run(t, self.runs, channels) for t in pooled_stats(var_in, mean_in, self.runs))
        inv_in = torch.rsqrt(var_in + self.eps)
        inv_ln = torch.rsqrt(var_ln + self.eps)
        s = torch.sigmoid(rho)
        # F_IL = a * x + b per (sample, channel)
        a = s * inv_in + (1 - s) * inv_ln
        b = -(s * mean_in * inv_in + (1 - s) * mean_ln * inv_ln)
        # per-channel statistics of F_IL, pooled into the cascaded group norm's groups
        var_il, mean_il = a.square() * var_in, a * mean_in + b
        var_g, mean_g = pooled_stats(var_il, mean_il, self.groups * self.runs)
        per_group = channels // self.groups
        inv_g = torch.rsqrt(var_g + self.eps).repeat_interleave(per_group, dim=1)
        mean_g = mean_g.repeat_interleave(per_group, dim=1)
        scale = weight * a * inv_g
        shift = weight * (b - mean_g) * inv_g + bias
        return scale, shift

    def forward(self, x, cond=None):
        y, _, _ = instance_affine(x, self.coefficients, self.rho, self.weight, self.bias)
        return y


@register_norm("bin")
class BatchInstanceNorm(nn.Module):
    """Batch-Instance Normalization (Nam & Kim, "Batch-Instance Normalization for Adaptively
    Style-Invariant Neural Networks", NeurIPS 2018, arXiv 1805.07925; official code
    hyseob/Batch-Instance-Normalization).

    y = (rho * BN(x) + (1 - rho) * IN(x)) * gamma + beta, BN and IN parameter-free, rho per
    channel, initialised to 1 (pure BN) and clipped to [0, 1] after every optimizer step
    (``after_optimizer_step``). As in the official training script, rho has its own optimizer
    group: ``rho_lr_scale`` x the learning rate (10) and weight decay ``rho_weight_decay`` (0).

    The BN part keeps running statistics exactly as ``nn.BatchNorm2d`` (momentum 0.1, unbiased
    running variance, starting at mean 0 / variance 1); evaluation uses them for the BN part only,
    the IN part always uses the instance statistics.

    Deliberately not a ``_BatchNorm`` subclass: ``nn.SyncBatchNorm.convert_sync_batchnorm`` would
    replace it by a plain SyncBatchNorm and silently drop rho. ``sync: true`` synchronizes the BN
    part instead: under torchrun its statistics (and running statistics) are those of the global
    batch (``sync.global_batch_stats``), rho and the IN part unchanged.

    Implementation: the batch statistics are derived from the instance statistics (mean over N of
    the means; variance by the law of total variance), and the output is one fused
    x * scale + shift (see ``fused.instance_affine``). Every statistic is per channel, so stacked
    runs (``runs``) change nothing but the width.
    """

    kind = "post_conv"
    batch_statistics = True
    can_sync = True
    can_stack = True

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1, rho_lr_scale: float = 10.0,
                 rho_weight_decay: float = 0.0, sync: bool = False, runs: int = 1):
        super().__init__()
        check_runs(num_channels, runs, "bin")
        self.eps, self.momentum, self.sync = eps, momentum, sync
        self.rho = nn.Parameter(torch.ones(num_channels))
        self.rho.optim_group = {"lr_scale": float(rho_lr_scale), "weight_decay": float(rho_weight_decay)}
        self.weight = nn.Parameter(torch.ones(num_channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_channels))  # beta
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def mixing_weights(self) -> dict[str, torch.Tensor]:
        """The learned choice, logged per layer: rho, the weight of BN in the mix."""
        return {"rho": self.rho}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the gate in [0, 1] (the clip that the ILN paper replaces by a sigmoid)."""
        self.rho.clamp_(0.0, 1.0)

    def bn_part_statistics(self, var_in, mean_in):
        """The BN part's (variance, mean) and sample count: of this batch, or with ``sync`` of the global batch."""
        if self.sync and synchronized():
            return global_batch_stats(var_in, mean_in)
        return (*batch_stats(var_in, mean_in), var_in.shape[0])

    def coefficients(self, var_in, mean_in, rho, weight, bias, *running):
        """(scale, shift) per (sample, channel); ``running`` = (mean, var) in evaluation."""
        if running:
            mean_bn, var_bn = running
        else:
            var_bn, mean_bn, _ = self.bn_part_statistics(var_in, mean_in)
        inv_in = torch.rsqrt(var_in + self.eps)
        inv_bn = torch.rsqrt(var_bn + self.eps)
        scale = weight * (rho * inv_bn + (1 - rho) * inv_in)
        shift = bias - weight * (rho * mean_bn * inv_bn + (1 - rho) * mean_in * inv_in)
        return scale, shift

    def forward(self, x, cond=None):
        if not self.training:
            y, _, _ = instance_affine(x, self.coefficients, self.rho, self.weight, self.bias, self.running_mean,
                                      self.running_var)
            return y
        y, var_in, mean_in = instance_affine(x, self.coefficients, self.rho, self.weight, self.bias)
        with torch.no_grad():  # the BN part's running statistics, as nn.BatchNorm2d
            var_bn, mean_bn, samples = self.bn_part_statistics(var_in, mean_in)
            count = samples * x.shape[2] * x.shape[3]  # a tensor when synchronized
            unbiased_var = var_bn * (count / (count - 1).clamp(min=1) if torch.is_tensor(count)
                                     else count / max(count - 1, 1))
            self.running_mean.lerp_(mean_bn.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y


@register_norm("sn")
class SwitchableNorm(nn.Module):
    """Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via Switchable
    Normalization", ICLR 2019, arXiv 1806.10779; official code switchablenorms/Switchable-Normalization,
    transcribed in seed 001).

    mean = sum_k softmax(lambda_mean)_k mean_k and var = sum_k softmax(lambda_var)_k var_k over
    k in (IN, LN, BN), y = gamma * (x - mean) / sqrt(var + eps) + beta; lambda_mean, lambda_var
    initialised to ones (each weight 1/3).

    As the official ``SwitchNorm2d`` (the defaults match it to float tolerance):
    * ``unbiased`` (default true): var_in is torch's default *unbiased* variance over (H, W), and
      the LN and BN variances are built from it (var_ln = mean_c(var_in + mean_in^2) - mean_ln^2,
      the same for BN over N). ``unbiased: false`` uses the biased variance of docs/layers.md's notation.
    * running BN statistics by moving average in the official convention
      running = momentum * running + (1 - momentum) * batch with ``momentum`` = 0.9 (= torch's
      momentum 0.1), buffers starting at 0 (also the variance); no unbiasing of the batch variance
      beyond var_in's. In evaluation only the BN term switches to the running statistics.
    Not ported: the official options using_moving_average=False, using_bn=False, last_gamma. For a
    1x1 feature map the unbiased factor is taken as 1 (the official code returns NaN there).

    Implementation: LN and BN statistics are derived from the instance statistics (law of total
    variance, algebraically the official formulas without their cancellation) and the output is
    one fused x * scale + shift (see ``fused.instance_affine``). Stacked (``runs`` = R > 1): the LN
    statistics are each run's, and the mixing weights are R triples, (3 R,) = run 0's three, run 1's...
    """

    kind = "post_conv"
    batch_statistics = True
    can_stack = True
    STATISTICS = ("in", "ln", "bn")  # the order of the mixing weights

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.9, unbiased: bool = True,
                 runs: int = 1):
        super().__init__()
        check_runs(num_channels, runs, "sn")
        self.eps, self.momentum, self.unbiased, self.runs = eps, momentum, unbiased, runs
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.mean_weight = nn.Parameter(torch.ones(3 * runs))  # lambda_mean over (in, ln, bn), per run
        self.var_weight = nn.Parameter(torch.ones(3 * runs))  # lambda_var over (in, ln, bn), per run
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.zeros(num_channels))

    def mixing_weights(self) -> dict[str, torch.Tensor]:
        """The learned choice, logged per layer: the softmaxed weights of IN, LN and BN (stacked: each
        a vector, one weight per run)."""
        means, variances = (torch.softmax(w.view(self.runs, 3), 1).t().squeeze(1)
                            for w in (self.mean_weight, self.var_weight))
        return {**{f"mean_{k}": means[i] for i, k in enumerate(self.STATISTICS)},
                **{f"var_{k}": variances[i] for i, k in enumerate(self.STATISTICS)}}

    def per_run_weights(self, weights: torch.Tensor, channels: int) -> torch.Tensor:
        """The softmaxed mixing weights: (3,) with one run; stacked, (3, R * channels), each run's
        three weights spread over its channels."""
        if self.runs == 1:
            return torch.softmax(weights, 0)
        return torch.softmax(weights.view(self.runs, 3), 1).t().repeat_interleave(channels, dim=1)

    def unbiased_factor(self, count: int) -> float:
        return count / max(count - 1, 1) if self.unbiased else 1.0

    def coefficients(self, count, var_in, mean_in, mean_weight, var_weight, weight, bias, *running):
        """(scale, shift) per (sample, channel) for ``count`` = H * W pixels per instance;
        ``running`` = (mean, var) in evaluation."""
        var_in = var_in * self.unbiased_factor(count)
        channels = var_in.shape[1] // self.runs  # of one run
        var_ln, mean_ln = (per_run(t, self.runs, channels) for t in pooled_stats(var_in, mean_in, self.runs))
        if running:
            mean_bn, var_bn = running
        else:
            var_bn, mean_bn = batch_stats(var_in, mean_in)
        wm, wv = (self.per_run_weights(w, channels) for w in (mean_weight, var_weight))
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        scale = weight * torch.rsqrt(var + self.eps)
        return scale, bias - mean * scale

    def forward(self, x, cond=None):
        count = x.shape[2] * x.shape[3]
        coefficients = functools.partial(self.coefficients, count)
        params = (self.mean_weight, self.var_weight, self.weight, self.bias)
        if not self.training:
            y, _, _ = instance_affine(x, coefficients, *params, self.running_mean, self.running_var)
            return y
        y, var_in, mean_in = instance_affine(x, coefficients, *params)
        with torch.no_grad():  # official convention: running = momentum * running + (1 - momentum) * batch
            var_bn, mean_bn = batch_stats(var_in * self.unbiased_factor(count), mean_in)
            self.running_mean.lerp_(mean_bn.to(self.running_mean.dtype), 1 - self.momentum)
            self.running_var.lerp_(var_bn.to(self.running_var.dtype), 1 - self.momentum)
        return y
