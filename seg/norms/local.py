"""Normalizations with per-position statistics: positional (PN) and local context (LCN) normalization."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .fused import _MAX_MEAN_SQUARED_OVER_VAR, compute_dtype, full_precision, scale_shift
from .registry import register_norm
from .standard import check_runs


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(bias[:, None, None], x, weight[:, None, None])


@register_norm("pn")
class PositionalNorm(nn.Module):
    """Positional Normalization (Li, Wu, Weinberger & Belongie, "Positional Normalization",
    NeurIPS 2019, arXiv 1907.04312).

    Parameter-free normalization over the channels at each (n, h, w) (biased variance), then a
    per-channel affine y = gamma * x_hat + beta. The paper's "moment shortcut" (feeding the removed
    mean and std to a later layer) is not part of this layer.

    Departures from the official code (Boyiliee/Positional-Normalization, ``pono_ms_torch.py``),
    measured in docs/layers.md by tests/test_fidelity.py: the variance over the channels is the
    biased one, as everywhere in this project (the official PONO uses torch's unbiased default; at 16
    channels the outputs differ by up to 0.13); and the affine is per channel (the official PONO has
    none, or one per position, which would fix the input size).

    Implementation: that is exactly layer norm over the last axis of the (N, H, W, C) view, so
    torch's fused layer-norm kernel does it for channels_last input (a free view), on other devices
    and under torch.compile and torch.func. A contiguous CPU tensor would need a copy of x and of
    its gradient into that layout: ``_PositionalContiguous`` computes the same in the NCHW layout
    instead, from per-pixel sums over the channels. Stacked (``runs`` = R > 1): over the last axis of
    the (N, H, W, R, C) view, each run's own channels, then the per-channel affine.
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, eps: float = 1e-5, runs: int = 1):
        super().__init__()
        check_runs(num_channels, runs, "pn")
        self.eps, self.runs = eps, runs
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x, cond=None):
        x = compute_dtype(x)
        with full_precision(x):
            if self.runs > 1:
                n, c, h, w = x.shape
                per_run = x.permute(0, 2, 3, 1).reshape(n, h, w, self.runs, c // self.runs)
                normalized = F.layer_norm(per_run, (c // self.runs,), eps=self.eps).view(n, h, w, c)
                return _affine(normalized.permute(0, 3, 1, 2), self.weight, self.bias)
            if (x.device.type == "cpu" and x.is_contiguous() and not torch.compiler.is_compiling()
                    and not torch._C._are_functorch_transforms_active()):
                moments = pixel_moments(x, self.eps)
                if moments is not None:  # else |mean| >> std somewhere: the layer-norm kernel's exact route
                    return _PositionalContiguous.apply(x, self.weight, self.bias, *moments)
            channels_last = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return channels_last.permute(0, 3, 1, 2)


def pixel_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and 1 / sqrt(biased variance + eps) over the channels of every pixel of a contiguous (N, C, H, W)
    tensor: two (N, H, W) tensors, from the sums of x and x^2 (one channel plane at a time, no full-size
    temporary). None where E[x^2] - E[x]^2 could lose precision (mean^2 > 1e3 var at some pixel)."""
    channels = x.shape[1]
    x = x.detach()
    mean = x.sum(1).div_(channels)
    var = torch.mul(x[:, 0], x[:, 0])
    for k in range(1, channels):
        var.addcmul_(x[:, k], x[:, k])
    var = var.div_(channels).addcmul_(mean, mean, value=-1).clamp_min_(0)
    if bool((mean.square() > _MAX_MEAN_SQUARED_OVER_VAR * var).any()):
        return None
    return mean, var.add_(eps).rsqrt_()


class _PositionalContiguous(torch.autograd.Function):
    """PN on a contiguous (N, C, H, W) tensor, given the per-pixel mean m and inverse deviation r (N, H, W):
    y = gamma_c (x - m) r + beta_c, two elementwise passes forward, x the only full-size tensor kept.
    Backward, per pixel, with P = sum_c gamma_c g_c, S = sum_c gamma_c g_c x_c, Q = r (S - m P):
        dx_c = gamma_c r g_c - x_c r^2 Q / C + (m r^2 Q - r P) / C
        d gamma_c = sum_{n,h,w} g_c x_c r - sum_{n,h,w} g_c m r,   d beta_c = sum_{n,h,w} g_c
    The channel-weighted sums P and S and the sums over the pixels are batched matrix products (S and
    the sums of g x r over the product g x, written into the buffer that then becomes dx); dx is the only
    full-size tensor written.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv):
        y = torch.addcmul((-mean * inv)[:, None], x, inv[:, None])
        n, c = x.shape[:2]
        y = scale_shift(y, weight.expand(n, c), bias.expand(n, c), out=y)  # the affine in place, one pass
        ctx.save_for_backward(x, weight, mean, inv)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, inv = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad.contiguous()
        gammas = weight.tolist()
        flat = grad.view(n, c, h * w)
        columns = torch.stack([torch.ones_like(inv), mean * inv], dim=-1).view(n, h * w, 2)
        grad_bias, shifted = torch.bmm(flat, columns).sum(0).unbind(-1)  # sum g, sum g m r
        weighted = torch.bmm(weight.to(grad.dtype).view(1, 1, c).expand(n, 1, c), flat).view(n, h, w)  # P
        # g x, in the buffer that becomes dx: S and the sums of g x r are two more matrix products
        grad_x = torch.mul(grad, x)
        products = grad_x.view(n, c, h * w)
        sums = torch.bmm(weight.to(grad.dtype).view(1, 1, c).expand(n, 1, c), products).view(n, h, w)  # S
        scaled = torch.bmm(products, inv.view(n, h * w, 1)).sum(0).view(c)  # sum g x r per channel
        if not ctx.needs_input_grad[0]:
            grad_x = None
        else:
            q = sums.sub_(mean * weighted).mul_(inv)
            slope = -(inv * inv * q) / c
            offset = (mean * inv * inv * q - inv * weighted) / c
            grad_x = torch.addcmul(offset[:, None], x, slope[:, None], out=grad_x)
            for k in range(c):
                grad_x[:, k].addcmul_(grad[:, k], inv, value=gammas[k])
        return grad_x, scaled - shifted, grad_bias, None, None


def check_channels_per_group(num_channels: int, channels_per_group: int, layer: str) -> None:
    """Refuse a channel count that is not a multiple of the group size, naming both."""
    if channels_per_group < 1 or num_channels % channels_per_group != 0:
        raise ValueError(
            f"{layer}: {num_channels} channels cannot be split into groups of {channels_per_group} channels "
            f"(the channel count must be a multiple of channels_per_group)"
        )


def window_sums(t: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the window x window neighbourhood of every pixel of (..., H, W), clipped to the image.

    A separable box filter by cumulative sums: per axis, the sum over [i - r, i + r] clipped to
    [0, L) is P[min(i + r + 1, L)] - P[max(i - r, 0)] for the prefix sums P (P[0] = 0), so the
    cost does not depend on the window size. Padding P with r zeros in front and r copies of its
    last value behind turns both look-ups into plain slices. Differentiable (the plain formulation,
    under torch.compile and torch.func); ``box_sums`` computes the same without autograd.
    """
    radius = window // 2
    for dim in (-2, -1):
        length = t.shape[dim]
        prefix = t.cumsum(dim)
        zeros = torch.zeros_like(prefix.narrow(dim, 0, 1)).expand(*_sized(prefix.shape, dim, radius + 1))
        last = prefix.narrow(dim, length - 1, 1).expand(*_sized(prefix.shape, dim, radius))
        padded = torch.cat([zeros, prefix, last], dim)  # padded[j] = P[clip(j - r, 0, L)]
        t = padded.narrow(dim, 2 * radius + 1, length) - padded.narrow(dim, 0, length)
    return t


def box_sums(t: torch.Tensor, window: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``window_sums`` in place, without autograd: ``t`` (..., H, W) is overwritten by its window sums
    and returned; ``scratch`` (t's shape, contiguous; a new tensor if None) is overwritten.

    Per axis, the prefix sums C (C[i] = P[i + 1]) and the window sums C[min(i + r, L - 1)] minus
    C[i - r - 1] where that index exists, the axis split where either look-up changes form
    (``_segments``). Along H the prefix sums are one in-place add per row on the CPU (vectorized
    along W; torch's cumsum over a non-last axis is a scalar loop, several times slower). The rows
    whose window starts at the first row need no difference: their sums along H are rows of C, so
    the prefix sums along W (torch's cumsum, over the contiguous axis) read those rows directly; the
    other rows are differenced into ``scratch`` and summed along W there. The differences along W
    write back into ``t``. So the filter writes each of ``t`` and ``scratch`` about twice and
    allocates nothing. The row-by-row prefix sums accumulate in t's dtype (torch's cumsum carries
    float32 sums in float64): float32 results move by rounding, float64 ones not at all.
    """
    radius = window // 2
    if scratch is None:
        scratch = torch.empty_like(t)
    if t.device.type == "cpu":
        rows = t.unbind(-2)
        torch._foreach_add_(rows[1:], rows[:-1])  # on the CPU a loop in list order: row i += row i - 1
    else:  # on a GPU the foreach kernels run the rows in parallel
        t.cumsum_(-2)
    for start, size, upper, lower in _segments(t, -2, radius):
        target = scratch.narrow(-2, start, size)
        if lower is None:
            torch.cumsum(upper, -1, out=target)
        else:
            torch.sub(upper, lower, out=target).cumsum_(-1)
    for start, size, upper, lower in _segments(scratch, -1, radius):
        target = t.narrow(-1, start, size)
        if lower is None:
            target.copy_(upper)
        else:
            torch.sub(upper, lower, out=target)
    return t


def _segments(prefix: torch.Tensor, dim: int, radius: int):
    """The window sums of a tensor along ``dim`` from its prefix sums C there, by segments of the axis:
    (start, size, upper, lower) with views such that the sums at [start, start + size) are upper - lower
    (C[min(i + r, L - 1)] and C[i - r - 1]), or upper alone (lower None) where the window starts at the
    first pixel."""
    length = prefix.shape[dim]
    cuts = sorted({0, length, min(radius + 1, length), max(length - radius, 0)})
    for start, stop in zip(cuts, cuts[1:]):
        size = stop - start
        if start + radius <= length - 1:
            upper = prefix.narrow(dim, start + radius, size)
        else:  # the window reaches past the last pixel
            upper = prefix.narrow(dim, length - 1, 1).expand(*_sized(prefix.shape, dim, size))
        lower = prefix.narrow(dim, start - radius - 1, size) if start >= radius + 1 else None
        yield start, size, upper, lower


def _sized(shape: torch.Size, dim: int, size: int) -> list[int]:
    """``shape`` with ``shape[dim]`` replaced by ``size``."""
    shape = list(shape)
    shape[dim] = size
    return shape


def window_counts(height: int, width: int, window: int, device=None) -> torch.Tensor:
    """Number of image pixels in each pixel's clipped window: (H, W)."""
    radius = window // 2
    counts = []
    for length in (height, width):
        index = torch.arange(length, device=device)
        counts.append((index + radius + 1).clamp(max=length) - (index - radius).clamp(min=0))
    return counts[0][:, None] * counts[1][None, :]


@register_norm("lcn")
class LocalContextNorm(nn.Module):
    """Local Context Normalization (Ortiz, Robinson, Morris, Hicks, Christian & Schlosser, "Local
    Context Normalization: Revisiting Local Normalization", CVPR 2020, arXiv 1912.05845; official
    code anthonymlortiz/lcn, ``local_context_norm.py``).

    Every value is normalized by the mean and biased variance of its channel group
    (``channels_per_group`` channels) over a ``window`` x ``window`` neighbourhood centred on it;
    then a per-channel affine. Statistics come from box filters (cumulative sums, separable), never
    from an unfolded copy of the tensor, so any window size costs the same.

    Defaults are the official code's: 2 channels per group, a 227 x 227 window. At this U-Net's
    sizes (256 px at the top, halving per level) such a window covers most of the feature map, and
    once it spans the whole map (window >= 2 * max(H, W) - 1) the layer is group norm with
    C / channels_per_group groups; a smaller window (e.g. 7 or 31) makes it local everywhere.

    Departures from the official code, each measured in docs/layers.md by tests/test_fidelity.py
    (float64, a 256 x 256 map, window 227, inputs N(1, 4): largest differences of output / input
    gradient):
    * Gradient through the statistics (default ``stop_stat_grad: false``): the official layer
      computes the local mean and variance without gradient wherever the window is smaller than
      the map, so its backward treats them as constants; this layer differentiates through them,
      which is the gradient of its forward pass. ``stop_stat_grad: true`` gives the official
      behaviour: the statistics are constants for the backward wherever the window is smaller
      than the map in both directions (where the official code switches to group norm, the
      gradient flows there too). The forward pass is the same either way; the input gradient
      differs by up to 1.4e-2 (2.3e-2 in evaluation): training differs at the 256-px level.
    * Window positions: the official code sums its windows from an integral image without a zero
      first row and column, so every window is shifted one pixel down and right of its centre and
      row and column 0 never enter any statistic. That is a bug and is not copied: windows here
      are centred (effect of the shift: 4.9e-3 / 2.4e-3).
    * Borders: each pixel's window is clipped to the image and the statistics are those of the
      pixels inside it (as avg_pool2d with count_include_pad=False). The official code uses only
      the windows that fit entirely and copies their statistics outwards to the border pixels
      (replicate padding; effect 3.1e-2 / 1.4e-2); where the window is not smaller than the map it
      falls back to group norm with the unbiased variance (this layer stays local until the window
      spans the map from every pixel, then equals group norm with the biased variance; at 128 px:
      1.1e-2 / 1.2e-2).
    Where the window spans the map torch's group norm computes the layer (the same statistics and
    gradient: tests/test_norm_rewrites.py). The window must be odd (centred). Stacked runs (``runs``) need nothing more: a group of
    ``channels_per_group`` consecutive channels never straddles two runs when it divides each run's width.
    """

    kind = "post_conv"
    can_stack = True

    def __init__(self, num_channels: int, channels_per_group: int = 2, window: int = 227, eps: float = 1e-5,
                 stop_stat_grad: bool = False, runs: int = 1):
        super().__init__()
        check_channels_per_group(check_runs(num_channels, runs, "lcn"), channels_per_group, "lcn")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"lcn: the window must be a positive odd number of pixels, got {window}")
        self.channels_per_group, self.window, self.eps = channels_per_group, window, eps
        self.stop_stat_grad = stop_stat_grad
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x, cond=None):
        x = compute_dtype(x)
        h, w = x.shape[2:]
        constant = self.stop_stat_grad and self.window < h and self.window < w  # the official rule
        with full_precision(x):
            if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
                return lcn_reference(x, self.weight, self.bias, self.channels_per_group, self.window, self.eps,
                                     constant)
            if self.window >= 2 * max(h, w) - 1:  # every window holds the whole map: exactly group norm
                return F.group_norm(x, x.shape[1] // self.channels_per_group, self.weight, self.bias, self.eps)
            return _LocalContext.apply(x, self.weight, self.bias, self.channels_per_group, self.window, self.eps,
                                       constant)


def lcn_reference(x, weight, bias, channels_per_group: int, window: int, eps: float, constant: bool):
    """The layer in plain autograd (under torch.compile and torch.func); ``constant``: no gradient through the
    local statistics."""
    n, c, h, w = x.shape
    grouped = x.view(n, c // channels_per_group, channels_per_group, h, w)
    # centring on the group's global mean m keeps E[x^2] - E[x]^2 well conditioned; the
    # local variance does not depend on m, and (x - m) - local_mean(x - m) = x - local_mean(x)
    centred = grouped - grouped.mean(dim=(2, 3, 4), keepdim=True).detach()
    with torch.no_grad() if constant else contextlib.nullcontext():
        count = window_counts(h, w, window, x.device) * channels_per_group
        mean = window_sums(centred.sum(2), window) / count
        mean_sq = window_sums(centred.square().sum(2), window) / count
        var = (mean_sq - mean.square()).clamp_min(0)
    normalized = (centred - mean.unsqueeze(2)) * torch.rsqrt(var + eps).unsqueeze(2)
    return _affine(normalized.reshape(n, c, h, w), weight, bias)


class _LocalContext(torch.autograd.Function):
    """LCN with a hand-written backward: group-sized (N, G, H, W) temporaries only, reused in place;
    full-size work is the output (and in backward the input gradient) written once and updated in
    place with group statistics broadcast over the group's channels.

    Per group g of k = ``channels_per_group`` channels, with x centred on the group's global mean m
    (detached: it cancels), S1 = sum_c (x_c - m) and S2 = sum_c (x_c - m)^2 per pixel (one channel
    at a time), each box-filtered (``box_sums``, in place): mean = B(S1) / n, var = B(S2) / n -
    mean^2 (clamped at 0), inv = 1 / sqrt(var + eps) for the pixel counts n; y = gamma xhat + beta
    with xhat = (x - m - mean) inv (mean: the local mean of x - m). Backward, gg = g * gamma:
        d gamma = sum g * xhat, d beta = sum g           (g * xhat in dx's storage)
        Q = sum_c gg * xhat, P = sum_c gg                 (per group and pixel: ``channel_sums``)
        V = Q inv^2 (0 where the clamp acted)             (d var = -V / 2)
        d mean = -P inv - 2 mean d var = -(P inv - mean V)
        dx = gg inv + B(d mean / n) + 2 (x - m) B(d var / n)      (B is symmetric: its own transpose)
           = gg inv + x W + (M - m W),   M = B(-(P inv - mean V) / n), W = B(-V / n)
    The signs are folded into the divisions by -n, so each step is one in-place operation. With
    ``constant`` (stop_stat_grad) the two box-filter terms are left out: dx = gg inv.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, per_group, window, eps, constant):
        n, c, h, w = x.shape
        grouped = x.view(n, c // per_group, per_group, h, w)
        centre = grouped.mean(dim=(2, 3, 4))[..., None, None]  # (N, G, 1, 1)
        y = torch.empty_like(x)
        sums, squares = x.new_empty(n, c // per_group, h, w), x.new_empty(n, c // per_group, h, w)
        scratch = group_scratch(y, c // per_group)  # y is written only once the statistics are done
        torch.sub(grouped[:, :, 0], centre, out=sums)
        torch.mul(sums, sums, out=squares)
        for k in range(1, per_group):
            centred = torch.sub(grouped[:, :, k], centre, out=scratch)
            sums.add_(centred)
            squares.addcmul_(centred, centred)
        count = window_counts(h, w, window, x.device).to(x.dtype) * per_group
        mean = box_sums(sums, window, scratch).div_(count)  # of x - m
        var = box_sums(squares, window, scratch).div_(count).addcmul_(mean, mean, value=-1)
        # where the clamp acts its gradient is 0; rounding makes var < 0 rarely, so no mask is kept then
        clamped = var < 0 if ctx.needs_input_grad[0] and not constant and var.numel() and var.min() < 0 else None
        inv = var.clamp_min_(0).add_(eps).rsqrt_()
        mean.add_(centre)  # the local mean of x itself
        normalized(x, per_group, mean, inv, out=y)
        y.mul_(weight[:, None, None]).add_(bias[:, None, None])
        ctx.save_for_backward(x, weight, centre, mean, inv, clamped, count)
        ctx.options = (per_group, window, constant)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, centre, mean, inv, clamped, count = ctx.saved_tensors
        per_group, window, constant = ctx.options
        n, c, h, w = x.shape
        groups = c // per_group
        with full_precision(x):
            grad_x = normalized(x, per_group, mean, inv, out=torch.empty_like(x))  # xhat, then dx in place
            grad_x.mul_(grad)  # g * xhat
            grad_weight, grad_bias = grad_x.sum(dim=(0, 2, 3)), grad.sum(dim=(0, 2, 3))
            if not ctx.needs_input_grad[0]:
                return None, grad_weight, grad_bias, None, None, None, None
            dx = grad_x.view(n, groups, per_group, h, w)
            if not constant:
                v, p = x.new_empty(n, groups, h, w), x.new_empty(n, groups, h, w)
                channel_sums(grad_x, weight, per_group, out=v)  # Q = sum_c gamma g xhat
                channel_sums(grad, weight, per_group, out=p)
                scratch = group_scratch(grad_x, groups)  # until dx is written
                v.mul_(inv).mul_(inv)
                if clamped is not None:
                    v.masked_fill_(clamped, 0)
                # d mean / n = -(P inv - (mean - m) V) / n
                p.mul_(inv).addcmul_(mean, v, value=-1).addcmul_(v, centre).div_(-count)
                box_mean = box_sums(p, window, scratch)
                box_var = box_sums(v.div_(-count), window, scratch)  # 2 B(d var / n)
                offset = box_mean.addcmul_(box_var, centre, value=-1)
            torch.mul(grad, weight[:, None, None], out=grad_x)  # gg
            dx.mul_(inv[:, :, None])
            if not constant:
                dx.addcmul_(x.view(n, groups, per_group, h, w), box_var[:, :, None]).add_(offset[:, :, None])
        return grad_x, grad_weight, grad_bias, None, None, None, None


def channel_sums(t: torch.Tensor, weight: torch.Tensor, per_group: int, out: torch.Tensor) -> torch.Tensor:
    """sum_c weight_c t_c over the channels c of each group of ``per_group`` channels of t (N, C, H, W), into
    ``out`` (N, G, H, W), channel by channel (fewer passes than a product and a sum over the channels)."""
    n, c, h, w = t.shape
    grouped, per_channel = t.view(n, c // per_group, per_group, h, w), weight.view(c // per_group, per_group, 1, 1)
    torch.mul(grouped[:, :, 0], per_channel[:, 0], out=out)
    for k in range(1, per_group):
        out.addcmul_(grouped[:, :, k], per_channel[:, k])
    return out


def group_scratch(full: torch.Tensor, groups: int) -> torch.Tensor:
    """A contiguous (N, G, H, W) tensor in the storage of ``full`` (N, C, H, W), a new tensor from
    empty_like (so its storage is exactly its elements), G <= C: scratch space until ``full`` is
    written, which costs no allocation (fresh memory is paid for page by page)."""
    n, c, h, w = full.shape
    return full.as_strided((n, groups, h, w), (groups * h * w, h * w, w, 1))


def normalized(x: torch.Tensor, per_group: int, mean: torch.Tensor, inv: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
    """(x - mean) * inv for x (N, C, H, W) and the statistics (N, G, H, W) of its groups of ``per_group``
    channels, into ``out`` (x's shape and memory format): two passes."""
    n, c, h, w = x.shape
    grouped = out.view(n, c // per_group, per_group, h, w)
    torch.sub(x.view(n, c // per_group, per_group, h, w), mean[:, :, None], out=grouped).mul_(inv[:, :, None])
    return out
