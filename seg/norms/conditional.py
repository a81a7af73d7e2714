"""Conditional normalization (seed 002): the affine parameters come from a condition, not a fixed pair.

In a segmentation network the condition must exist at test time, so each layer reads a signal
the network has for every image (see ``registry.Condition``):

    cin    a (gamma, beta) row per domain id -- the vendor / scanner recorded with the image
    adain  gamma, beta per image from a style code of the input (shared encoder)
    spade  spatially varying gamma, beta from the input image itself, resized to the layer
    sean   spade + per-region style codes, the regions being the network's own coarse
           prediction from a low-resolution auxiliary head (shared, trained with its own loss)

The U-Net runs a layer's ``conditioner`` once per forward pass and hands the resulting
``Condition`` to every layer; the levels of the U-Net know nothing of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import compute_dtype, instance_affine
from .registry import Condition, register_norm, required

BASES = ("bn", "in")


def parameter_free_norm(base: str, num_channels: int, eps: float, momentum: float, layer: str) -> nn.Module:
    """The normalization under a modulation: BN (running statistics in eval) or IN, without affine."""
    if base == "bn":
        return nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum, affine=False)
    if base == "in":
        return _InstanceNormNoAffine(num_channels, eps)
    raise ValueError(f"{layer}: base={base!r} is not valid; choose one of: {', '.join(BASES)}")


class _InstanceNormNoAffine(nn.Module):
    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps

    def forward(self, x):
        return F.group_norm(x, self.num_channels, eps=self.eps)  # C groups: instance statistics


def instance_norm_affine(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """IN(x) * gamma + beta with a (gamma, beta) per sample and channel, (N, C) each: one fused
    ``x * scale + shift`` from the instance statistics (``fused.instance_affine``), no full-size
    intermediate for IN(x)."""

    def coefficients(var, mean, gamma, beta):
        scale = gamma * torch.rsqrt(var + eps)
        return scale, beta - mean * scale

    y, _, _ = instance_affine(x, coefficients, gamma, beta)
    return y


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class Modulation(nn.Module):
    """SPADE's modulation network: a shared 3x3 conv + ReLU, then a 3x3 conv each for gamma and beta.

    The gamma and beta convs read the same hidden map, so they run as one convolution with their
    weights stacked (2 C output channels: one pass over the 128-wide hidden map instead of two).
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.shared = nn.Sequential(conv3x3(in_channels, hidden), nn.ReLU(inplace=True))
        self.gamma = conv3x3(hidden, out_channels)
        self.beta = conv3x3(hidden, out_channels)

    def stacked(self, m: torch.Tensor, gamma_scale=1.0, beta_scale=1.0, gamma_offset: float = 0.0) -> torch.Tensor:
        """(gamma_scale gamma + gamma_offset, beta_scale beta) stacked on the channel axis, (N, 2 C, H, W): the
        scales and the offset folded into the stacked conv's weights and bias (no pass of their own)."""
        hidden = self.shared(m)
        scale = torch.cat([torch.as_tensor(gamma_scale, dtype=hidden.dtype).expand(self.gamma.out_channels),
                           torch.as_tensor(beta_scale, dtype=hidden.dtype).expand(self.beta.out_channels)])
        weight = torch.cat([self.gamma.weight, self.beta.weight]) * scale[:, None, None, None]
        bias = torch.cat([self.gamma.bias * scale[:self.gamma.out_channels] + gamma_offset,
                          self.beta.bias * scale[self.gamma.out_channels:]])
        return F.conv2d(hidden, weight, bias, padding=1)

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stacked(m).chunk(2, dim=1)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last where x is stored so (and not also contiguous), else the contiguous format."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def modulate(normalized: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """normalized * gamma' + beta for ``stacked`` = (gamma', beta) on the channel axis: one pass, a new tensor
    in the memory format of ``normalized`` (``stacked`` is brought to it first if it is stored otherwise)."""
    gamma, beta = stacked.contiguous(memory_format=memory_format(normalized)).chunk(2, dim=1)
    return torch.addcmul(beta, normalized, gamma)


def resize_to(m: torch.Tensor, x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """``m`` at the spatial size of ``x`` (unchanged if it already is)."""
    if m.shape[-2:] == x.shape[-2:]:
        return m
    return F.interpolate(m, size=x.shape[-2:], mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


# ---------------------------------------------------------------------------- CIN


@register_norm("cin")
class ConditionalInstanceNorm(nn.Module):
    """Conditional instance normalization (Dumoulin, Shlens & Kudlur, "A learned representation for
    artistic style", ICLR 2017, arXiv 1610.07629; official code magenta/magenta,
    ``magenta/models/image_stylization/ops.py``, which it matches for seen domains):
    y = gamma_s IN(x) + beta_s with a (gamma, beta) row per condition s.

    Computed as one fused x * scale + shift from the instance statistics (as the mixed layers).
    Here s is the image's domain id -- its vendor/scanner as recorded by the dataset (the phantom's
    and M&Ms' vendors; ``data.domain_key`` picks the field), numbered in the order of the training
    domains. The table has one row per training domain (``num_domains``, set by the trainer).
    Departure: a domain id of -1 -- a vendor never seen in training, as in a leave-one-vendor-out
    test -- uses the mean of the learned rows; the paper has no unseen styles at test time.
    """

    kind = "conditional"
    condition_inputs = ("domain",)

    def __init__(self, num_channels: int, eps: float = 1e-5, num_domains: int = 1):
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"cin needs at least one domain, got num_domains={num_domains}")
        self.num_channels, self.num_domains, self.eps = num_channels, num_domains, eps
        self.weight = nn.Parameter(torch.ones(num_domains, num_channels))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_channels))

    def affine(self, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) of each image, (N, C) each; id -1 (unseen domain) takes the mean row."""
        weight = torch.cat([self.weight, self.weight.mean(0, keepdim=True)])
        bias = torch.cat([self.bias, self.bias.mean(0, keepdim=True)])
        row = torch.where(domain < 0, self.num_domains, domain)
        return weight[row], bias[row]

    def forward(self, x, cond=None):
        domain = required(cond, "domain", "cin")
        gamma, beta = self.affine(domain)
        return instance_norm_affine(x, gamma, beta, self.eps)


# ---------------------------------------------------------------------------- AdaIN


class StyleEncoder(nn.Module):
    """Image -> style code (N, style_dim): two 3x3 convs at 1/4 resolution, the mean and standard
    deviation of each feature over the image, then a two-layer MLP."""

    def __init__(self, image_channels: int, style_dim: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(nn.AvgPool2d(4), conv3x3(image_channels, width), nn.ReLU(inplace=True),
                                      conv3x3(width, 2 * width, stride=2), nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(nn.Linear(4 * width, style_dim), nn.ReLU(inplace=True),
                                 nn.Linear(style_dim, style_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = compute_dtype(self.features(image))
        var, mean = torch.var_mean(features, dim=(2, 3), correction=0)
        return self.mlp(torch.cat([mean, (var + 1e-5).sqrt()], dim=1))


class StyleConditioner(nn.Module):
    """The condition of AdaIN: a style code per image from the shared ``StyleEncoder``."""

    def __init__(self, image_channels: int, style_dim: int):
        super().__init__()
        self.encoder = StyleEncoder(image_channels, style_dim)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> Condition:
        return Condition(image=image, domain=domain, style=self.encoder(image))


@register_norm("adain")
class AdaptiveInstanceNorm(nn.Module):
    """Adaptive instance normalization (Huang & Belongie, ICCV 2017, arXiv 1703.06868; official code
    xunhuang1995/AdaIN-style, ``lib/AdaptiveInstanceNormalization.lua``, which it matches given the
    same sigma(y), mu(y)): AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y), no learned affine
    of its own.

    In the paper sigma(y), mu(y) are the statistics of a style image's features. Here the style
    is the input image itself, the way the network sees its appearance: a shared encoder
    (``StyleEncoder``: pooled conv features -> MLP) gives a style code per image and each layer
    maps it linearly to its (sigma(y), mu(y)) -- the AdaIN of StyleGAN (Karras et al., CVPR 2019).
    That map starts at zero weights and bias (1, 0), so training begins from plain IN.
    Departure: sigma(y) is predicted, not a standard deviation, and is not forced positive.
    """

    kind = "conditional"
    condition_inputs = ("style",)

    def __init__(self, num_channels: int, style_dim: int = 64, eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.to_affine = nn.Linear(style_dim, 2 * num_channels)
        nn.init.zeros_(self.to_affine.weight)
        with torch.no_grad():
            self.to_affine.bias.copy_(torch.cat([torch.ones(num_channels), torch.zeros(num_channels)]))

    @classmethod
    def conditioner(cls, image_channels: int, num_classes: int, *, style_dim: int, **_) -> nn.Module:
        return StyleConditioner(image_channels, style_dim)

    def forward(self, x, cond=None):
        style = required(cond, "style", "adain")
        sigma, mu = self.to_affine(style).chunk(2, dim=1)
        return instance_norm_affine(x, sigma, mu, self.eps)


# ---------------------------------------------------------------------------- SPADE


@register_norm("spade")
class SPADE(nn.Module):
    """Spatially-adaptive denormalization (Park et al., "Semantic image synthesis with
    spatially-adaptive normalization", CVPR 2019, arXiv 1903.07291; official code NVlabs/SPADE,
    ``models/networks/normalization.py``, which it matches given the same map):
    y = x_hat (1 + gamma(m)) + beta(m), x_hat a parameter-free normalization of x (BN by default,
    ``base: in`` for IN), m the conditioning map resized (nearest) to x, and gamma, beta 3x3 convs
    from a shared 3x3 conv with ``hidden`` (128) channels and ReLU.

    Departure: the paper's m is a semantic label map given as input; a segmentation network has
    no such map at test time, so m is the input image itself (``image_channels`` channels).
    """

    kind = "conditional"
    condition_inputs = ("image",)
    batch_statistics = True  # with base: bn (the default)

    def __init__(self, num_channels: int, hidden: int = 128, base: str = "bn", eps: float = 1e-5,
                 momentum: float = 0.1, image_channels: int = 1):
        super().__init__()
        self.norm = parameter_free_norm(base, num_channels, eps, momentum, "spade")
        self.modulation = Modulation(image_channels, hidden, num_channels)

    def forward(self, x, cond=None):
        image = required(cond, "image", "spade")
        # y = x_hat (1 + gamma) + beta: the 1 is folded into the gamma conv's bias
        return modulate(self.norm(x), self.modulation.stacked(resize_to(image, x).to(x.dtype), gamma_offset=1.0))


# ---------------------------------------------------------------------------- SEAN


class RegionConditioner(nn.Module):
    """The condition of SEAN: regions from the network's own coarse prediction, and a style code per region.

    At 1/``scale`` of the input resolution, four dilated 3x3 convs (dilation 1, 2, 4, 8: a receptive
    field of 31 low-resolution pixels, 124 input pixels at scale 4) give features; a 1x1 conv
    predicts the classes (``aux_logits``, trained by the trainer's auxiliary loss against the
    downsampled labels), whose softmax, detached, is the soft region mask (N, K, h, w); another
    1x1 conv gives style features, averaged inside each region into its code (N, K, style_dim).
    """

    def __init__(self, image_channels: int, num_regions: int, style_dim: int, width: int = 32, scale: int = 4):
        super().__init__()
        layers, channels = [nn.AvgPool2d(scale)], image_channels
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.classes = nn.Conv2d(width, num_regions, 1)
        self.style = nn.Conv2d(width, style_dim, 1)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> Condition:
        features = self.trunk(image)
        logits = self.classes(features)
        regions = torch.softmax(compute_dtype(logits), dim=1).detach()
        codes = region_codes(regions, compute_dtype(self.style(features)))
        return Condition(image=image, domain=domain, regions=regions, region_codes=codes, aux_logits=logits)


def region_codes(regions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Average of ``features`` (N, D, h, w) inside each soft region of ``regions`` (N, K, h, w): (N, K, D)."""
    total = torch.einsum("nkhw,ndhw->nkd", regions, features)
    return total / regions.sum((2, 3)).clamp(min=1e-6).unsqueeze(-1)


@register_norm("sean")
class SEAN(nn.Module):
    """Semantic region-adaptive normalization (Zhu, Abdal, Qin & Wonka, "SEAN: image synthesis with
    semantic region-adaptive normalization", CVPR 2020, arXiv 1911.12861; official code ZPdesu/SEAN,
    ``models/networks/normalization.py``, class ACE).

    As the official ACE block:
    * a learned per-channel noise (``noise``, initialised to zero) is added before the
      normalization: x + z * noise_var with one standard normal z per sample and pixel, shared by
      the channels;
    * x_hat = a parameter-free normalization of it (BN by default);
    * each region k's style code passes through its own fully connected layer and ReLU
      (``region_fc``; the official ``fc_mu<k>``) and is broadcast into the region's mask: the style
      map; 3x3 convs of it give (gamma_s, beta_s);
    * SPADE's modulation gives (gamma_o, beta_o) from the conditioning map;
    * they are blended by learned weights a_gamma = sigmoid(w_gamma), a_beta = sigmoid(w_beta),
      initialised at 0.5:
      y = x_hat (1 + a_gamma gamma_s + (1 - a_gamma) gamma_o) + a_beta beta_s + (1 - a_beta) beta_o.
    ``region_fc: false`` broadcasts the codes as they are, ``noise: false`` adds no noise (the
    layer as this project had it before following the official code).

    Departures (each measured in docs/layers.md by tests/test_fidelity.py):
    * Conditioning: the paper's regions are a given label map and its codes come from a style
      image. A segmentation network has neither at test time: here the regions are the network's
      own coarse prediction of the classes (a low-resolution auxiliary head, ``RegionConditioner``,
      trained with its own loss; soft masks, upsampled bilinearly where the official code resizes
      a hard label map with nearest neighbours), the codes are pooled from the input image's
      features inside those regions, and the SPADE branch is conditioned on the input image (as
      in ``spade``). With a hard one-hot map at the layer's size the style map is the official one.
    * The noise is added in training only: the official code adds it in evaluation too, which
      makes inference random (with noise weights around 1 its evaluation output moves by up to 1.9).
    * Measured with a one-hot map at half the layer's size, the bilinear resize of the masks moves
      the output by up to 0.16 in training (0.35 in evaluation) from the official nearest resize.
    * Sizes: ``style_dim`` (64) where the official code has 512, one fc per class where it has 19.
    """

    kind = "conditional"
    condition_inputs = ("image", "regions", "region_codes")
    batch_statistics = True  # with base: bn (the default)

    def __init__(self, num_channels: int, hidden: int = 128, style_dim: int = 64, base: str = "bn",
                 eps: float = 1e-5, momentum: float = 0.1, region_scale: int = 4, region_fc: bool = True,
                 noise: bool = True, image_channels: int = 1, num_regions: int = 2):
        super().__init__()
        if region_scale < 1:
            raise ValueError(f"sean: region_scale must be at least 1, got {region_scale}")
        self.norm = parameter_free_norm(base, num_channels, eps, momentum, "sean")
        self.modulation = Modulation(image_channels, hidden, num_channels)
        # fc_mu<k> of the official code: one per region
        self.region_fc = (nn.ModuleList(nn.Linear(style_dim, style_dim) for _ in range(num_regions))
                          if region_fc else None)
        self.noise_var = nn.Parameter(torch.zeros(num_channels)) if noise else None
        self.style_gamma = conv3x3(style_dim, num_channels)
        self.style_beta = conv3x3(style_dim, num_channels)
        self.blend_gamma = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5
        self.blend_beta = nn.Parameter(torch.zeros(()))

    @classmethod
    def conditioner(cls, image_channels: int, num_classes: int, *, style_dim: int, region_scale: int,
                    **_) -> nn.Module:
        return RegionConditioner(image_channels, num_classes, style_dim, scale=region_scale)

    def add_noise(self, x: torch.Tensor) -> torch.Tensor:
        """x + z * noise_var, z ~ N(0, 1) per sample and pixel (drawn in the official code's (N, W, H)
        order, so that a seeded run draws the official noise), in training only."""
        if self.noise_var is None or not self.training:
            return x
        n, _, h, w = x.shape
        z = torch.randn(n, w, h, 1, dtype=self.noise_var.dtype, device=x.device).transpose(1, 3)  # (N, 1, H, W)
        return x + z * self.noise_var[:, None, None]

    def style_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Each region's code through its own fc + ReLU (N, K, D), or unchanged without ``region_fc``."""
        if self.region_fc is None:
            return codes
        return torch.stack([torch.relu(fc(codes[:, k])) for k, fc in enumerate(self.region_fc)], dim=1)

    def region_modulation(self, regions: torch.Tensor, codes: torch.Tensor, gamma_scale, beta_scale) -> torch.Tensor:
        """(gamma_scale gamma_s, beta_scale beta_s) stacked on the channel axis, (N, 2 C, H, W), from the region
        masks (N, K, H, W) and the codes (N, K, D) without the style map (N, D, H, W).

        The style map is sum_k mask_k code_k, and a convolution is linear, so
        conv(style map, W) = sum_k conv(mask_k, W code_k): per image, one convolution of its K masks
        with the weights contracted with its codes (N * 2 C filters over K channels, one grouped
        convolution) -- the same sums, over K input channels instead of D. Under export the style map is
        built and convolved once (the group count of the former would follow the batch size).
        """
        n, k, h, w = regions.shape
        out = self.style_gamma.out_channels
        weight = torch.cat([self.style_gamma.weight * gamma_scale, self.style_beta.weight * beta_scale])
        bias = torch.cat([self.style_gamma.bias * gamma_scale, self.style_beta.bias * beta_scale])
        if torch.compiler.is_exporting():  # ONNX and torch.export: a group count that follows the batch size
            # cannot be a graph attribute; the style map itself, as the method writes it, convolved once
            style = torch.einsum("nkhw,nkd->ndhw", regions, codes.to(weight.dtype))
            return F.conv2d(style, weight, bias, padding=1)
        per_image = torch.einsum("odij,nkd->nokij", weight, codes.to(weight.dtype)).reshape(n * 2 * out, k, 3, 3)
        per_image = per_image.contiguous()  # einsum's strides would make the convolution's output channels_last
        stacked = F.conv2d(regions.reshape(1, n * k, h, w), per_image, bias.repeat(n), padding=1, groups=n)
        return stacked.reshape(n, 2 * out, h, w)

    def forward(self, x, cond=None):
        image = required(cond, "image", "sean")
        regions, codes = required(cond, "regions", "sean"), required(cond, "region_codes", "sean")
        normalized = self.norm(self.add_noise(x))
        a_gamma, a_beta = torch.sigmoid(self.blend_gamma), torch.sigmoid(self.blend_beta)
        # y = x_hat (1 + a_g gamma_s + (1 - a_g) gamma_o) + a_b beta_s + (1 - a_b) beta_o: the blend weights
        # are folded into the weights of both convolutions, the 1 into a bias
        stacked = self.modulation.stacked(resize_to(image, x).to(x.dtype), 1 - a_gamma, 1 - a_beta, gamma_offset=1.0)
        masks = resize_to(regions, x, "bilinear").to(x.dtype)
        stacked = stacked.add_(self.region_modulation(masks, self.style_codes(codes), a_gamma, a_beta))
        return modulate(normalized, stacked)

    def mixing_weights(self) -> dict[str, torch.Tensor]:
        """The share of the region-style branch in gamma and in beta (0.5 at the start)."""
        return {"alpha_gamma": torch.sigmoid(self.blend_gamma), "alpha_beta": torch.sigmoid(self.blend_beta)}
