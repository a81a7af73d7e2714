"""Filter response normalization with its thresholded linear unit (``norm=frn``): no batch and no mean."""

from __future__ import annotations

import torch
from torch import nn

from .fused import compute_dtype, full_precision
from .registry import register_norm
from .standard import check_runs


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
            nu2 = x.square().mean(dim=(2, 3), keepdim=True)
            y = torch.addcmul(self.bias[:, None, None], x * torch.rsqrt(nu2 + self.eps), self.weight[:, None, None])
            tau = self.tau[:, None, None]
            return torch.maximum(y, tau) - tau.clamp(max=0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
