"""Filter response normalization with its thresholded linear unit (``norm=frn``): no batch and no mean."""

from __future__ import annotations

import torch
from torch import nn

from .fused import compute_dtype, full_precision, product_sums, scale_shift
from .registry import register_norm
from .standard import check_runs


def frn_reference(x, weight, bias, tau, eps):
    """The layer in plain autograd (under torch.compile, which fuses it by itself, and torch.func)."""
    nu2 = x.square().mean(dim=(2, 3), keepdim=True)
    y = torch.addcmul(bias[:, None, None], x * torch.rsqrt(nu2 + eps), weight[:, None, None])
    tau = tau[:, None, None]
    return torch.maximum(y, tau) - tau.clamp(max=0)


def square_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum over (H, W) of x^2, (N, C): one pass, no full-size temporary."""
    return product_sums(x, x)[0]


class _FilterResponse(torch.autograd.Function):
    """z' = max(x * s + beta, tau) - min(tau, 0), s = gamma / sqrt(mean_hw(x^2) + eps), with a hand-written backward.

    Forward: one reduction (the sums of x^2), then one pass that writes z' as
    max(x * s + (beta - min(tau, 0)), max(tau, 0)). Backward, with y = x * s + beta and the mask
    m = 1 where y > tau, 1/2 where y = tau (torch.maximum's rule), 0 elsewhere:
        gy = g * m,   A = sum_hw(gy * x),   B = sum_hw(gy),   G = sum_hw(g)   (per sample and channel)
        d gamma = sum_n A / sqrt(nu2 + eps),   d beta = sum_n B,   d tau = [tau > 0] sum_n G - sum_n B
        dx = gy * s - x * gamma A / (sqrt(nu2 + eps)^3 H W)
    x is the only full-size tensor kept; the mask is recomputed from it, as 2 m = 1 + sign(y - tau)
    (two vectorized passes that write 2 gy in place; torch's heaviside is a scalar loop).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        count = x.shape[2] * x.shape[3]
        inv = torch.rsqrt(square_sums(x) / count + eps)  # (N, C)
        scale = weight * inv
        z = scale_shift(x, scale, (bias - tau.clamp(max=0)).expand_as(scale))
        z = torch.maximum(z, tau.clamp(min=0)[:, None, None], out=z)
        ctx.save_for_backward(x, inv, weight, bias, tau)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, inv, weight, bias, tau = ctx.saved_tensors
        with full_precision(x):
            scale = weight * inv
            # 2 m = 1 + sign(y - tau): 1 + 1, 1 + 0 or 1 - 1, so gy2 = 2 gy = g + sign(y - tau) g, in place
            gy2 = scale_shift(x, scale, (bias - tau).expand_as(scale)).sign_()
            gy2 = torch.addcmul(grad, gy2, grad, out=gy2)
            a, b = product_sums(gy2, x)
            a, b = a / 2, b / 2
            # d tau needs G = sum g only where tau > 0 (the usual tau <= 0 saves that pass over g)
            grad_tau = -b.sum(0)
            if bool((tau > 0).any()):
                grad_tau = grad_tau + torch.where(tau > 0, grad.sum(dim=(2, 3)).sum(0), 0)
            grad_x = None
            if ctx.needs_input_grad[0]:
                slope = -weight * a * inv.pow(3) / (x.shape[2] * x.shape[3])
                grad_x = gy2.mul_(scale[..., None, None] / 2).addcmul_(x, slope[..., None, None])
            return grad_x, (a * inv).sum(0), b.sum(0), grad_tau, None


@register_norm("frn")
class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, "Filter
    Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural
    Networks", CVPR 2020, arXiv 1911.09737; the paper's own listing, TensorFlow, is the reference).

    Per sample and channel, over the H x W positions, with nu^2 = mean(x^2) (no mean is subtracted):
        x_hat = x / sqrt(nu^2 + eps),   y = gamma * x_hat + beta,   z = max(y, tau)  (the TLU),
    gamma, beta, tau learned per channel, initialised to 1, 0, 0; eps = 1e-6 as in the paper's
    listing. The same computation in training and evaluation, for any batch size.

    The TLU and this U-Net's ReLU. The paper's FRN layer ends in the TLU in place of the network's
    ReLU; here every normalization is followed by the U-Net's ReLU, and ReLU(max(y, tau)) =
    max(y, max(tau, 0)): wherever tau <= 0 the TLU would be replaced by a plain ReLU and tau would get
    no gradient -- from tau's initial 0 it would never move (torch's ReLU passes no gradient at 0),
    leaving FRN + ReLU, the combination whose missing mean centring the TLU exists to repair. So the
    layer returns
        z' = max(y, tau) - min(tau, 0) = ReLU(y - tau) + max(tau, 0),
    which is never negative, so the ReLU after it changes nothing:
    * for tau >= 0, z' is the paper's z exactly;
    * for tau < 0, z' = z - tau: the TLU without its constant per-channel offset tau. The next
      convolution takes a constant per-channel offset into its bias (exactly, except at the zero
      padding of the image border), so the network can compute the same functions; but tau's
      gradient there lacks the offset's part (-1 where y > tau instead of +1 where y < tau): the
      training dynamics are not the paper's.
    Against the paper's listing (docs/layers.md, tests/test_fidelity.py): the outputs differ by
    exactly -min(tau, 0), the input gradients not at all.

    Not offered: the learned eps (1e-6 + |eps_l|) the paper proposes for 1 x 1 activation maps, which
    this U-Net has only at its deepest level when data.image_size = 2**model.depth. Without mean
    centring, the paper finds some networks sensitive to the initial learning rate, notably those
    with several max-pool layers (as this U-Net), and advises a learning-rate warm-up, which the
    trainer's schedules do not have.

    Implementation: one reduction (the sums of x^2) and one pass writing z' forward; a hand-written
    backward (``_FilterResponse``) that keeps only x and recomputes the TLU's mask from it. Under
    torch.compile and torch.func the plain formulation (``frn_reference``) is used; the two are
    tested against each other (tests/test_norm_rewrites.py).
    """

    kind = "post_conv"
    can_stack = True  # per sample and channel: stacked runs (``runs``) change nothing but the width

    def __init__(self, num_channels: int, eps: float = 1e-6, runs: int = 1):
        super().__init__()
        check_runs(num_channels, runs, "frn")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_channels))  # beta
        self.tau = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x, cond=None):
        x = compute_dtype(x)
        with full_precision(x):
            if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
                return frn_reference(x, self.weight, self.bias, self.tau, self.eps)
            return _FilterResponse.apply(x, self.weight, self.bias, self.tau, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
