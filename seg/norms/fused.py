"""One-pass normalization from instance statistics: ``y = x * scale + shift``, with a hand-written backward.

The mixed layers (ILN, BIN, SN), and batch Kalman norm in training, all have the same shape: the
instance statistics (mean and biased variance over H, W per sample and channel) are computed from
x once; every other statistic they need (layer, batch, group) is an exact function of those (N, C)
tensors; and the output is ``x * scale + shift`` with per-(sample, channel) ``scale`` and
``shift``. Only the small "coefficient" function (instance statistics, parameters) -> (scale,
shift) differs between layers.

``instance_affine(x, coefficients, *params)`` runs that pattern. Left to autograd, the backward
goes through ``var_mean``, the broadcast multiply and the add, with several full-size
intermediates; the custom ``_InstanceAffine`` function below needs two sums (one pass over g and
x, ``product_sums``) and two elementwise passes that write only ``dx``:

    d scale = sum_hw(g * x),  d shift = sum_hw(g)                   (per sample and channel)
    d var, d mean, d params  = autograd through the small coefficient graph only
    dx = g * scale + (2 * d var * (x - mean) + d mean) / (H W)

The instance statistics are returned too, differentiable: a caller that builds more on them
(batch Kalman norm hands its statistics to the next layer) gets their gradient added to dx by the
same elementwise pass (d var / dx = 2 (x - mean) / (H W), d mean / dx = 1 / (H W)).

It is used when a gradient is needed and the code runs eagerly; under ``torch.compile`` (which fuses
the plain formulation by itself), under torch.func transforms (``vmap``, ``grad``: the function has no
batching rule, and its forward branches on the data) and without gradients the plain formulation is
used. The two are tested against each other (gradcheck in float64).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

Coefficients = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# E[x^2] - E[x]^2 loses about log10(mean^2 / var) of float32's 7 digits; beyond this ratio the
# moments are recomputed with torch.var_mean (one-pass Welford, exact but slower on CPU).
_MAX_MEAN_SQUARED_OVER_VAR = 1e3
# below this size the batch-norm kernel's thread-pool start-up costs more than the pass it saves
_SINGLE_PASS_MIN_NUMEL = 1 << 16


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: statistics of half-precision activations are computed in float32
    (as torch's own norms do under autocast); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the statistics (autocast would run the BLAS reductions in bfloat16)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over (H, W): two (N, C) tensors.

    On CPU, torch.var_mean is a scalar Welford loop, several times slower than one vectorized pass
    for the sums of x and x^2 (``product_sums(x, x)``).
    That route is taken on CPU, except where cancellation in E[x^2] - E[x]^2 could cost precision
    (|mean| >> std): those inputs fall back to var_mean. Elsewhere (CUDA, and under torch.compile)
    var_mean is used directly.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.var_mean(x, dim=(2, 3), correction=0)
    count = x.shape[2] * x.shape[3]
    sum_sq, total = product_sums(x, x)
    mean = total / count
    var = (sum_sq / count - mean.square()).clamp_min(0)
    if bool((mean.square() > _MAX_MEAN_SQUARED_OVER_VAR * var).any()):
        return torch.var_mean(x, dim=(2, 3), correction=0)
    return var, mean


def product_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over (H, W) of a * b, sum over (H, W) of a): two (N, C) tensors, no full-size temporary.

    On CPU, torch's batch-norm backward kernel reduces both sums in a single pass over a and b:
    on the (1, N*C, H, W) view, with grad a, input b, mean 0 and inverse std 1, its weight and bias
    gradients are exactly these sums (for channels_last tensors: one call per sample, on its
    channels_last (1, C, H, W) view; torch's own reductions over H, W of such a tensor are several
    times slower). Elsewhere: a batched dot product (or a product and a sum)
    and a sum.
    """
    n, c, h, w = a.shape
    kernel = (a.device.type == "cpu" and a.numel() >= _SINGLE_PASS_MIN_NUMEL and a.dtype == b.dtype
              and not torch.compiler.is_compiling())
    if kernel and a.is_contiguous() and b.is_contiguous():
        ones, zeros = a.new_ones(n * c), a.new_zeros(n * c)
        _, dot, total = torch.ops.aten.native_batch_norm_backward(
            a.view(1, n * c, h, w), b.view(1, n * c, h, w), ones, None, None, zeros, ones, True, 0.0,
            [False, True, True])
        return dot.view(n, c), total.view(n, c)
    last = torch.channels_last
    if kernel and a.is_contiguous(memory_format=last) and b.is_contiguous(memory_format=last):
        # channels_last: no (1, N*C, H, W) view exists, but each sample is a channels_last (1, C, H, W)
        # tensor, which the kernel's channels_last path reduces per channel in one vectorized pass
        ones, zeros = a.new_ones(c), a.new_zeros(c)
        sums = [torch.ops.aten.native_batch_norm_backward(a[i:i + 1], b[i:i + 1], ones, None, None, zeros, ones,
                                                          True, 0.0, [False, True, True])[1:] for i in range(n)]
        return torch.stack([dot for dot, _ in sums]), torch.stack([total for _, total in sums])
    if a.is_contiguous() and b.is_contiguous():
        dot = torch.bmm(a.view(n * c, 1, h * w), b.view(n * c, h * w, 1)).view(n, c)
    elif a is b:  # x with itself (its sum of squares): a norm, no full-size product
        dot = torch.linalg.vector_norm(a, 2, dim=(2, 3)).square()
    else:
        dot = (a * b).sum(dim=(2, 3))
    return dot, a.sum(dim=(2, 3))


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    return t[..., None, None]


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * scale + shift`` for (N, C, H, W) ``x`` and (N, C) ``scale``, ``shift``: one pass, new tensor.

    On CPU, for a large contiguous tensor, torch's batch-norm inference kernel does this faster
    than ``addcmul`` with broadcast operands (measured 1.9 vs 2.9 ms on (8, 16, 256, 256)): on the
    (1, N*C, H*W) view, with running mean 0, running variance 1 and eps 0 it computes exactly
    x * weight + bias per row. Elsewhere (CUDA, channels_last, small tensors, under
    torch.compile): ``addcmul``.

    The result is never a view: the kernel writes (its ``out=`` form) into a fresh (N, C, H, W)
    tensor through a view of it, and that tensor is returned. A custom autograd Function's output
    that is a view cannot be modified in place, and the network's ReLU(inplace=True) modifies it.
    ``out`` (x's shape and memory format; it may be x itself: the pass is elementwise) is written
    instead of a fresh tensor and returned.
    """
    n, c, h, w = x.shape
    fast = (x.device.type == "cpu" and x.numel() >= _SINGLE_PASS_MIN_NUMEL and x.is_contiguous()
            and x.dtype in (torch.float32, torch.float64) and scale.dtype == x.dtype and shift.dtype == x.dtype
            and not torch.compiler.is_compiling())
    if fast:
        zeros, ones = x.new_zeros(n * c), x.new_ones(n * c)
        y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
        torch.ops.aten.native_batch_norm.out(x.view(1, n * c, h * w), scale.reshape(-1), shift.reshape(-1), zeros,
                                             ones, False, 0.0, 0.0, out=y.view(1, n * c, h * w),
                                             save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
        return y
    if out is not None:
        return torch.addcmul(_broadcast(shift), x, _broadcast(scale), out=out)
    return torch.addcmul(_broadcast(shift), x, _broadcast(scale))


class _InstanceAffine(torch.autograd.Function):
    """y = x * scale + shift, (scale, shift) = coefficients(var_in, mean_in, *params).

    Returns (y, var_in, mean_in); the statistics are returned for the caller's bookkeeping
    (running averages, Kalman priors) and are differentiable outputs too.
    """

    @staticmethod
    def forward(ctx, x, coefficients, *params):
        var, mean = instance_moments(x)
        # The small (N, C) graph from the statistics and parameters to (scale, shift) is built
        # here, on detached leaves, and differentiated by autograd in backward.
        with torch.enable_grad():
            var_leaf = var.detach().requires_grad_()
            mean_leaf = mean.detach().requires_grad_()
            param_leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            scale, shift = (t.expand_as(var_leaf) for t in coefficients(var_leaf, mean_leaf, *param_leaves))
        ctx.save_for_backward(x)
        ctx.graph = (var_leaf, mean_leaf, param_leaves, scale, shift)
        y = scale_shift(x, scale.detach(), shift.detach())
        return y, var, mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_var_out, grad_mean_out):
        (x,) = ctx.saved_tensors
        var_leaf, mean_leaf, param_leaves, scale, shift = ctx.graph
        with full_precision(x):
            grad_scale, grad_shift = product_sums(grad_y, x)
            wanted = [var_leaf, mean_leaf] + [p for p in param_leaves if p.requires_grad]
            grads = torch.autograd.grad((scale, shift), wanted, (grad_scale, grad_shift), allow_unused=True,
                                        retain_graph=True)
            grad_var, grad_mean = (g if g is not None else torch.zeros_like(var_leaf) for g in grads[:2])
            # gradients that reach the returned statistics directly (zeros when unused)
            grad_var, grad_mean = grad_var + grad_var_out, grad_mean + grad_mean_out
            grad_x = None
            if ctx.needs_input_grad[0]:
                count = x.shape[2] * x.shape[3]
                slope = 2 * grad_var / count  # d var / dx = 2 (x - mean) / count
                offset = grad_mean / count - slope * mean_leaf.detach()
                grad_x = scale_shift(x, slope, offset)
                grad_x.addcmul_(grad_y, _broadcast(scale.detach()))
        param_grads = iter(grads[2:])
        return (grad_x, None, *(next(param_grads) if p.requires_grad else None for p in param_leaves))


def instance_affine_reference(x: torch.Tensor, coefficients: Coefficients, *params: torch.Tensor):
    """The plain autograd formulation of ``instance_affine`` (under torch.compile and torch.func, without
    gradients)."""
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    scale, shift = coefficients(var, mean, *params)
    return torch.addcmul(_broadcast(shift), x, _broadcast(scale)), var, mean


def instance_affine(x: torch.Tensor, coefficients: Coefficients, *params: torch.Tensor):
    """``(x * scale + shift, var_in, mean_in)`` with ``(scale, shift) = coefficients(var_in, mean_in, *params)``.

    ``x`` is (N, C, H, W); ``var_in``, ``mean_in`` are its biased instance statistics, (N, C), in at
    least float32 (differentiable); ``coefficients`` returns ``scale`` and ``shift`` of shape (N, C)
    or broadcastable to it. The statistics are computed once, from x alone: no pass and no
    full-size tensor per ingredient.
    """
    x = compute_dtype(x)
    with full_precision(x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if needs_grad and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
            return _InstanceAffine.apply(x, coefficients, *params)
        return instance_affine_reference(x, coefficients, *params)
