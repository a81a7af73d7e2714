"""Kernel normalization fused with the convolution that follows it: KNConv (``norm=kn``).

KernelNorm normalizes every kernel window -- the C_in x kh x kw input elements one output position
of a convolution sees -- by the window's own mean and variance. Because those are scalars per
window, KernelNorm followed by the convolution equals the convolution followed by a correction:

    out[o] = (conv(x)[o] - mu_w * sum(W[o])) / sqrt(var_w + eps) + b[o]

and mu_w, var_w are box filters over the channel-summed x and x^2. This costs one ordinary
convolution plus two small (N, 1, H, W) box filters, instead of normalizing unfolded windows.

On the CPU the layer is memory-bound, so the hand-written backwards avoid full-size temporaries:
per-pixel sums over the channels go one L2-sized block of channel planes at a time into (N, 1, H, W)
accumulators or through matrix products, the dropout keeps its 0/1 mask (uint8 where the loops read it)
with 1/(1-p) folded into the small sums, and the statistics' input gradient is added into the
convolution's in place. torch.compile and torch.func take the plain autograd formulation instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fused import compute_dtype, full_precision
from .registry import conv_norm_only, register_norm


def correction_reference(out, mean, var, weight_sums, bias, eps):
    """(out - mean * sum(W[o])) / sqrt(var + eps) + b[o] in plain autograd (torch.compile, torch.func)."""
    out = (out - mean * weight_sums[None, :, None, None]) * torch.rsqrt(var + eps)
    return out + bias[None, :, None, None]


def _channel_matrices(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """t (N, C, H, W) as a batch of matrices without a copy: (N, C, HW) for a contiguous t (channels first,
    True), (N, HW, C) for a channels_last one (False); None for other strides."""
    n, c, h, w = t.shape
    if t.is_contiguous():
        return t.view(n, c, h * w), True
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c), False
    return None


def channel_combination(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_c t[:, c] v[c] per pixel, (N, 1, H, W): one matrix product (einsum copies t first)."""
    n, _, h, w = t.shape
    matrices = _channel_matrices(t)
    if matrices is None:
        return torch.einsum("nchw,c->nhw", t, v).unsqueeze(1)
    m, channels_first = matrices
    return (torch.bmm(v.expand(n, 1, -1), m) if channels_first else m @ v).view(n, 1, h, w)


def pixel_weighted_sums(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_{n,h,w} t[n, c] s[n, 0] per channel c, for s (N, 1, H, W): one batched matrix-vector product."""
    n, _, h, w = t.shape
    matrices = _channel_matrices(t)
    if matrices is None:
        return torch.einsum("nchw,nhw->c", t, s.squeeze(1))
    m, channels_first = matrices
    s = s.reshape(n, h * w)
    return (m @ s.unsqueeze(2) if channels_first else s.unsqueeze(1) @ m).sum(0).flatten()


# elements per operation in the plane-wise loops: enough to amortize the call, few enough to stay in the L2 cache
_PLANE_ELEMENTS = 1 << 16


def block_step(*tensors: torch.Tensor) -> int | None:
    """How many images g make one (g, H, W) block of channel planes (g H W ~ _PLANE_ELEMENTS) for the
    plane-wise loops over contiguous (N, C, H, W) tensors; None where the tensors are not all contiguous or
    too small for the per-call overhead to pay (there full-size temporaries are cheap)."""
    n, _, h, w = tensors[0].shape
    if n * h * w < _PLANE_ELEMENTS // 2 or not all(t.is_contiguous() for t in tensors):
        return None
    return max(1, _PLANE_ELEMENTS // (h * w))


def channel_blocks(t: torch.Tensor, step: int) -> list[torch.Tensor]:
    """The (g, H, W) blocks of t (N, C, H, W): images in chunks of ``step`` outer (so that an accumulator's
    block stays cached), channels inner; views, made in two calls per chunk rather than by indexing."""
    return [plane for chunk in t.split(step) for plane in chunk.unbind(1)]


def accumulator_blocks(acc: torch.Tensor, step: int, channels: int) -> list[torch.Tensor]:
    """The (g, H, W) blocks of an (N, 1, H, W) accumulator that go with ``channel_blocks`` of a tensor with
    ``channels`` channels."""
    return [chunk for chunk in acc[:, 0].split(step) for _ in range(channels)]


def pixel_dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_c a[:, c] b[:, c] per pixel, (N, 1, H, W), added to ``out`` when given: one addcmul_ per block of
    channel planes into the accumulator (no full-size temporary; torch's reduction over dim 1 of the
    product is several times slower), or (a * b).sum(1) where ``block_step`` declines."""
    if out is None:
        out = a.new_zeros(a.shape[0], 1, *a.shape[2:])
    step = block_step(a, b)
    if step is None:
        return out.add_((a * b).sum(1, keepdim=True))
    for acc, a_block, b_block in zip(accumulator_blocks(out, step, a.shape[1]), channel_blocks(a, step),
                                     channel_blocks(b, step)):
        acc.addcmul_(a_block, b_block)
    return out


class _Correction(torch.autograd.Function):
    """y = (out - mean * s) inv + b for the conv output ``out`` (N, O, H, W), per-channel s = sum(W[o]), b and
    the window means of the elements and of their squares, ``mean`` and ``mean_sq`` (N, 1, H, W):
        d = mean_sq - mean^2,   var = max(d, 0),   inv = 1 / sqrt(var + eps)
    Two passes forward, the conv output the only full-size tensor kept. Backward, per pixel and over o:
        d out = g inv,   d s = -sum_{n,h,w} g mean inv,   d b = sum_{n,h,w} g
        d var = -inv^3 / 2 (sum_o g out - mean sum_o g s),   d d = d var [d >= 0]   (clamp_min's gradient)
        d mean = -inv sum_o g s - 2 mean d d,   d mean_sq = d d
    The channel sums are matrix products (sum_o g s, and d s against mean inv) or, for sum_o g out, one
    addcmul_ per block of channel planes into an (N, 1, H, W) accumulator: the only full-size tensor made
    is d out.
    """

    @staticmethod
    def forward(ctx, out, mean, mean_sq, weight_sums, bias, eps):
        spread = torch.addcmul(mean_sq, mean, mean, value=-1)
        inv = torch.rsqrt(spread.clamp_min(0).add_(eps))
        mean_inv = mean * inv
        y = torch.addcmul(bias[None, :, None, None], out, inv, out=torch.empty_like(out))
        y.addcmul_(mean_inv, weight_sums[None, :, None, None], value=-1)
        ctx.save_for_backward(out, mean, inv, mean_inv, spread >= 0, weight_sums)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, mean, inv, mean_inv, unclamped, weight_sums = ctx.saved_tensors
        with full_precision(out):
            weighted = channel_combination(grad, weight_sums)  # sum_o g s
            grad_out = torch.mul(grad, inv, out=torch.empty_like(out))
            grad_inv = pixel_dot(grad, out).addcmul_(mean, weighted, value=-1)  # sum_o g (out - mean s)
            grad_spread = grad_inv.mul_(inv.pow(3)).mul_(-0.5).mul_(unclamped)
            grad_mean = weighted.mul_(inv).neg_().addcmul_(mean, grad_spread, value=-2)
            grad_weight_sums = pixel_weighted_sums(grad, mean_inv).neg_()
            return grad_out, grad_mean, grad_spread, grad_weight_sums, grad.sum(dim=(0, 2, 3)), None


# elements drawn per call of the CPU sampler (its uniforms stay in the L2 cache)
_DRAW_CHUNK = 1 << 18


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 mask like x that keeps each element with probability 1 - p, independently (the multiplier of
    ``F.dropout(x, p)`` is mask / (1 - p)); uint8 where the plane-wise loops read it (``block_step``: a quarter
    of the bytes), else x's dtype (float32 for half-precision x).

    On the CPU torch's samplers are serial (one Mersenne-Twister number after another, whatever the thread
    count), and ``bernoulli_``, as ``F.dropout`` draws, takes two of them per element: it was the largest cost
    of the layer after its convolution (docs/results/bench_norms.md). The mask is drawn instead from numpy's
    PCG64, seeded by one number from torch's generator, as float32 uniforms compared with 1 - p, in chunks, in
    the order of x's memory: several times faster, and still governed by ``torch.manual_seed`` and the
    generator state a checkpoint saves, so a seeded run and a resumed one draw the same masks. The distribution is F.dropout's; the draw is another (the
    official code's is another again: it draws over the padded input). Elsewhere (CUDA, MPS) torch's own
    parallel ``bernoulli_``."""
    keep = 1 - p
    dtype = torch.uint8 if block_step(x) else x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    mask = torch.empty_like(x, dtype=dtype)
    if x.device.type != "cpu":
        return mask.bernoulli_(keep)
    rng = np.random.Generator(np.random.PCG64(int(torch.randint(0, 2**62, ()))))
    flat = mask.as_strided((mask.numel(),), (1,)).numpy()  # the storage in memory order (empty_like: dense)
    uniforms = np.empty(min(flat.size, _DRAW_CHUNK), np.float32)
    for start in range(0, flat.size, _DRAW_CHUNK):
        part = flat[start:start + _DRAW_CHUNK]
        drawn = rng.random(out=uniforms[:part.size], dtype=np.float32)
        np.less(drawn, np.float32(keep), out=part, casting="unsafe")
    return mask


def dropped_out(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The copy of x that the statistics are computed on: dropout with 1/(1-p) scaling, as the official F.dropout,
    in training only; its mask from ``dropout_mask``. Under torch.compile and torch.func (the plain formulation)
    ``F.dropout`` itself: those transforms draw their own random numbers either way."""
    if not training or p <= 0:
        return x
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return F.dropout(x, p)
    return x * dropout_mask(x, p).to(x.dtype).mul_(1 / (1 - p))  # the multiplier in the mask's own tensor


def padded_pair(like: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero (N, 2, H + size - 1, W + size - 1) buffer for ``box_sums`` and its (N, 2, H, W) interior, into
    which the two (N, 1, H, W) maps to filter are written (no separate padding copy)."""
    n, _, h, w = like.shape
    r = size // 2
    padded = like.new_zeros(n, 2, h + 2 * r, w + 2 * r)
    return padded, padded[..., r:r + h, r:r + w]


def box_sums(padded: torch.Tensor, size: int) -> torch.Tensor:
    """The sum of every size x size window of the zero-padded (N, C, H + size - 1, W + size - 1) ``padded``:
    (N, C, H, W), shifted slices added along W, then along H (several times faster than avg_pool2d's
    per-window loop). With zero padding and a symmetric kernel the operator is its own adjoint."""
    h, w = (n - size + 1 for n in padded.shape[-2:])
    rows = padded[..., :w] if size == 1 else padded[..., :w] + padded[..., 1:w + 1]
    for d in range(2, size):
        rows += padded[..., d:d + w]
    out = rows[..., :h, :] if size == 1 else rows[..., :h, :] + rows[..., 1:h + 1, :]
    for d in range(2, size):
        out += rows[..., d:d + h, :]
    return out


def channel_moment_sums(x: torch.Tensor, mask: torch.Tensor | None, sums: torch.Tensor,
                        square_sums: torch.Tensor) -> None:
    """sum_c m x and sum_c m x^2 per pixel (m = 1 where ``mask`` is None) into the zero (N, 1, H, W) ``sums``
    and ``square_sums``, without making m x (for contiguous x formed one block of channel planes at a time)."""
    if mask is None:
        torch.sum(x, 1, keepdim=True, out=sums)
        pixel_dot(x, x, out=square_sums)
    elif (step := block_step(x, mask)) is not None:
        kept, keep = (x.new_empty(min(x.shape[0], step), *x.shape[2:]) for _ in range(2))
        c = x.shape[1]
        for s1, s2, x_block, m_block in zip(accumulator_blocks(sums, step, c), accumulator_blocks(square_sums, step, c),
                                            channel_blocks(x, step), channel_blocks(mask, step)):
            m_block = keep[:len(x_block)].copy_(m_block)  # x's dtype (a uint8 mask: mixed-dtype ops are slow)
            block = torch.mul(x_block, m_block, out=kept[:len(x_block)])
            s1.add_(block)
            s2.addcmul_(block, x_block)
    else:
        kept = x * mask
        torch.sum(kept, 1, keepdim=True, out=sums)
        pixel_dot(kept, x, out=square_sums)


def window_moment_grad(x, mask, k, size, grad_mean, grad_mean_sq, grad_x=None) -> torch.Tensor:
    """The input gradient of mean = k box(sum_c m x) / n, mean_sq = k^2 box(sum_c m x^2) / n, n = size^2 C
    (``_WindowMoments``):
        dx = m (k / n box(d mean) + 2 k^2 / n x box(d mean_sq))
    box being its own adjoint; added to ``grad_x`` in place when given (one block of channel planes at a time
    for contiguous tensors: no full-size temporary), else a new tensor."""
    padded, interior = padded_pair(grad_mean, size)
    interior[:, :1].copy_(grad_mean)
    interior[:, 1:].copy_(grad_mean_sq)
    grads = box_sums(padded, size)
    n = size * size * x.shape[1]
    a, b = grads[:, :1].mul_(k / n), grads[:, 1:].mul_(2 * k * k / n)
    if grad_x is None:
        grad_x = torch.addcmul(a, x, b, out=torch.empty_like(x))
        return grad_x if mask is None else grad_x.mul_(mask)
    step = block_step(grad_x, x) if mask is None else block_step(grad_x, x, mask)
    if step is None:
        part = torch.addcmul(a, x, b)
        return grad_x.add_(part) if mask is None else grad_x.addcmul_(part, mask)
    (buffer, keep), c = (x.new_empty(min(x.shape[0], step), *x.shape[2:]) for _ in range(2)), x.shape[1]
    masks = [None] * len(grad_x) * c if mask is None else channel_blocks(mask, step)
    for g_block, x_block, m_block, a_block, b_block in zip(
            channel_blocks(grad_x, step), channel_blocks(x, step), masks,
            accumulator_blocks(a, step, c), accumulator_blocks(b, step, c)):
        part = torch.addcmul(a_block, x_block, b_block, out=buffer[:len(x_block)])
        if m_block is None:
            g_block.add_(part)
        else:
            g_block.addcmul_(part, keep[:len(x_block)].copy_(m_block))
    return grad_x


class _WindowMoments(torch.autograd.Function):
    """Per window (size x size positions, all C channels, zero padding: n = size^2 C elements), the means of s
    and of s^2 for the dropped-out copy s = k m x (mask m 0 or 1, k = 1 / (1 - p); s = x, k = 1 where
    ``mask`` is None):
        mean = k / n box(sum_c m x),   mean_sq = k^2 / n box(sum_c m x^2)     ((N, 1, H, W) each)
    without making s (``channel_moment_sums``; one box sum filters both). Backward, box being its own adjoint:
        dx = m (k / n box(d mean) + 2 k^2 / n x box(d mean_sq))     (``window_moment_grad``)
    """

    @staticmethod
    def moments(ctx, x, mask, k, size):
        ctx.k, ctx.size = (1.0 if mask is None else k), size
        padded, interior = padded_pair(x, size)
        channel_moment_sums(x, mask, interior[:, :1], interior[:, 1:])
        both, n = box_sums(padded, size), size * size * x.shape[1]
        return both[:, :1].mul_(ctx.k / n), both[:, 1:].mul_(ctx.k * ctx.k / n)

    @staticmethod
    def forward(ctx, x, mask, k, size):
        ctx.save_for_backward(x, mask)
        return _WindowMoments.moments(ctx, x, mask, k, size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_mean_sq):
        x, mask = ctx.saved_tensors
        return window_moment_grad(x, mask, ctx.k, ctx.size, grad_mean, grad_mean_sq), None, None, None


class _ConvWindowMoments(torch.autograd.Function):
    """The 'same' convolution out = conv(x, W) (stride 1, no bias) together with ``_WindowMoments``' mean and
    mean_sq of x, so that backward adds the statistics' input gradient into the convolution's in place (one
    full-size tensor and one pass fewer than autograd summing the two):
        dx = conv_input_grad(d out) + m (k / n box(d mean) + 2 k^2 / n x box(d mean_sq)),
        dW = conv_weight_grad(d out)
    """

    @staticmethod
    def forward(ctx, x, weight, mask, k, size):
        out = F.conv2d(x, weight, None, padding=size // 2)
        ctx.save_for_backward(x, weight, mask)
        return (out, *_WindowMoments.moments(ctx, x, mask, k, size))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_mean, grad_mean_sq):
        x, weight, mask = ctx.saved_tensors
        pad = ctx.size // 2
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_x is not None:
            grad_x = window_moment_grad(x, mask, ctx.k, ctx.size, grad_mean, grad_mean_sq, grad_x)
        return grad_x, grad_weight, None, None, None


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

    def forward(self, x, cond=None):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            out = F.conv2d(x, self.weight, None, padding=self.padding)
            mean, var = self.plain_window_moments(x)
            return correction_reference(out, mean, var, self.weight.sum(dim=(1, 2, 3)), self.bias, self.eps)
        size, stats_x = self.kernel_size[0], compute_dtype(x)
        mask = dropout_mask(stats_x, self.dropout_p) if self.training and self.dropout_p > 0 else None
        if x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type):
            out, mean, mean_sq = _ConvWindowMoments.apply(x, self.weight, mask, self.dropout_keep_scale, size)
        else:  # the convolution in x's (or autocast's) precision, the statistics in at least float32
            out = F.conv2d(x, self.weight, None, padding=self.padding)
            with full_precision(x):
                mean, mean_sq = _WindowMoments.apply(stats_x, mask, self.dropout_keep_scale, size)
        with full_precision(mean):  # under autocast: the statistics' precision, as type promotion gave before
            dtype = torch.promote_types(out.dtype, mean.dtype)
            weight_sums = self.weight.sum(dim=(1, 2, 3)).to(dtype)
            return _Correction.apply(out.to(dtype), mean, mean_sq, weight_sums, self.bias.to(dtype), self.eps)

    @property
    def dropout_keep_scale(self) -> float:
        return 1 / (1 - self.dropout_p)

    def plain_window_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of every kernel window, two (N, 1, H, W) tensors, in plain autograd
        (torch.compile, torch.func)."""
        x = compute_dtype(x)
        with full_precision(x):
            source = dropped_out(x, self.dropout_p, self.training)
            sums, square_sums = source.sum(1, keepdim=True), source.square().sum(1, keepdim=True)
            box = dict(kernel_size=self.kernel_size, stride=1, padding=self.padding, count_include_pad=True)
            # avg_pool2d divides by kh*kw (padding included); the channel sum needs a further 1/C_in
            mean = F.avg_pool2d(sums, **box) / self.in_channels
            mean_sq = F.avg_pool2d(square_sums, **box) / self.in_channels
            return mean, (mean_sq - mean.square()).clamp_min(0)

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
