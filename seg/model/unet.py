"""The classic 2D U-Net (Ronneberger et al., MICCAI 2015, arXiv 1505.04597) with a pluggable norm.

Every convolution is followed by the chosen normalization and a ReLU; one block,
``ConvNormAct``, is reused at every level, down and up. Widths start at ``base_channels``
(16 in the ILN study) and double per level; ``depth`` is the number of 2x2 max-poolings.

Departures from the 2015 paper, as in the ILN study: 'same' padding (output size = input
size, no cropping of the skip connections) and a normalization after every convolution,
including the up-convolution.

The up-convolution (``up``): ``transpose2`` (default) is the 2015 paper's 2x2 stride-2
transposed convolution; ``transpose3`` is the ILN author's published code's 3x3 stride-2
transposed convolution with TensorFlow's 'same' geometry (see ``TransposeConv3``), followed here,
like every convolution, by the norm and a ReLU (docs/study.md: the published file contains no
normalization call at all, so it cannot tell whether the author normalized after it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..norms import ConvNorm, context_options, make_conditioner, make_conv_norm, make_norm, spec

INITS = ("paper", "author", "kaiming", "torch")
UPSAMPLINGS = ("transpose2", "transpose3")


class TransposeConv3(nn.ConvTranspose2d):
    """3x3 stride-2 transposed convolution with TensorFlow's 'same' padding: output exactly 2H x 2W.

    TensorFlow's ``conv2d_transpose(..., strides=2, padding='same')`` is the adjoint of a 3x3 stride-2
    'same' convolution of a 2H x 2W input, which pads one row and column at the bottom/right only;
    its adjoint is the full transposed convolution (2H+1 x 2W+1) with the last row and column dropped.
    (PyTorch's ``padding=1, output_padding=1`` would drop the first ones instead: a one-pixel shift.)
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=2)

    def forward(self, x):
        height, width = x.shape[-2:]
        return super().forward(x)[..., : 2 * height, : 2 * width]


class ConvNormAct(nn.Module):
    """conv (k x k, or a k x k stride-k transposed conv; with ``up3`` a ``TransposeConv3``) -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, norm_options: dict, *, kernel_size: int = 3,
                 transpose: bool = False, up3: bool = False):
        super().__init__()
        if up3:
            self.conv_norm = transpose3_conv_norm(in_channels, out_channels, norm, norm_options)
        else:
            self.conv_norm = make_conv_norm(norm, in_channels, out_channels, kernel_size, transpose=transpose,
                                            **norm_options)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x, cond=None):
        return self.act(self.conv_norm(x, cond))


def transpose3_conv_norm(in_channels: int, out_channels: int, norm: str, norm_options: dict) -> nn.Module:
    """``TransposeConv3`` followed by the norm (``up=transpose3``). A layer that replaces the convolution +
    normalization pair (kn, wn, bkn) builds only stride = kernel up-convolutions and is refused."""
    if spec(norm).kind == "conv_pair":
        raise ValueError(f"model.up=transpose3 is not available for norm={norm}: that layer replaces the "
                         f"convolution + normalization pair and builds only the 2x2 up-convolution "
                         f"(use model.up=transpose2)")
    return ConvNorm(TransposeConv3(in_channels, out_channels), make_norm(norm, out_channels, **norm_options))


class DoubleConv(nn.Module):
    """Two ConvNormAct 3x3 blocks: the body of every U-Net level."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, norm_options: dict):
        super().__init__()
        self.first = ConvNormAct(in_channels, out_channels, norm, norm_options)
        self.second = ConvNormAct(out_channels, out_channels, norm, norm_options)

    def forward(self, x, cond=None):
        return self.second(self.first(x, cond), cond)


def down_and_up(unet: nn.Module, x: torch.Tensor, cond, join) -> torch.Tensor:
    """The U-Net's path, before its head: down its levels (``unet.down``, max-pooling between them) keeping
    each level's output, then up (``unet.upsample``, then ``unet.up`` on ``join(skip, x)``). ``join`` is the
    skip connection's concatenation (of the channels; per run in a stack of runs, seg.training.stacked)."""
    skips = []
    for level, block in enumerate(unet.down):
        x = block(x if level == 0 else unet.pool(x), cond)
        skips.append(x)
    x = skips.pop()
    for level in reversed(range(unet.depth)):
        x = unet.upsample[level](x, cond)
        x = unet.up[level](join(skips.pop(), x), cond)
    return x


class UNet(nn.Module):
    """U-Net for 2D segmentation; ``forward(x, domain=None)`` returns class logits (N, classes, H, W).

    H and W must be multiples of 2**depth. Each forward pass first builds the batch's
    ``Condition`` (the image, its domain ids and whatever the norm's conditioner derives from
    them) and passes it to every normalization layer; only conditional layers read it.
    ``num_domains`` is the number of training domains (for ``cin``); ``domain`` holds each
    image's id in 0..num_domains-1, or -1 for a domain not seen in training.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 16, depth: int = 4,
                 norm: str = "bn", norm_options: dict[str, Any] | None = None, init: str = "paper",
                 bias_init: float = 0.1, num_domains: int = 1, up: str = "transpose2"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be at least 1, got {depth}")
        if up not in UPSAMPLINGS:
            raise ValueError(f"unknown up-convolution {up!r}; valid: {', '.join(UPSAMPLINGS)}")
        self.conditioner = make_conditioner(norm, in_channels, num_classes, **(norm_options or {}))
        # sizes a conditional layer takes from the model and data (input channels, domains, regions)
        norm_options = {**(norm_options or {}), **context_options(
            norm, image_channels=in_channels, num_domains=num_domains, num_regions=num_classes)}
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.depth, self.norm, self.up_mode = depth, norm, up
        self.down = nn.ModuleList([DoubleConv(in_channels, widths[0], norm, norm_options)])
        self.down.extend(DoubleConv(widths[i], widths[i + 1], norm, norm_options) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(
            ConvNormAct(widths[i + 1], widths[i], norm, norm_options, kernel_size=2, transpose=True,
                        up3=up == "transpose3")
            for i in range(depth)
        )
        self.up = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], norm, norm_options) for i in range(depth))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        initialize(self, "paper" if init == "author" else init, bias_init)
        if init == "author":  # the published code draws the 1x1 output conv with the last 3x3 conv's std
            std = math.sqrt(2.0 / (9 * widths[0]))
            nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None, with_aux: bool = False):
        """Logits (N, classes, H, W); with ``with_aux``, also the conditioner's auxiliary logits (or None)."""
        multiple = 2**self.depth
        if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"U-Net of depth {self.depth} needs (N, C, H, W) input with H and W multiples of "
                             f"{multiple}; got shape {tuple(x.shape)}")
        cond = self.conditioner(x, domain)
        logits = self.head(down_and_up(self, x, cond, join=lambda skip, x: torch.cat([skip, x], dim=1)))
        return (logits, cond.aux_logits) if with_aux else logits


def initialize(model: nn.Module, scheme: str = "paper", bias_init: float = 0.1) -> None:
    """Initialise every convolution of ``model``.

    ``paper``: weights from a normal of std sqrt(2 / (k*k*C_out)) truncated at two std -- for a
    3x3 conv the sqrt(2 / (9 C_out)) of the ILN study -- and biases ``bias_init`` (0.1). This is
    TensorFlow's ``truncated_normal_initializer(stddev)`` of the author's code: values beyond two
    ``stddev`` (the std of the normal before truncation, so the weights' own std is 0.88 of it)
    are re-drawn. The U-Net paper's sqrt(2/N) counts the N = k*k*C_in inputs instead; the ILN
    author's code counts the outputs, and so does this. ``author`` (the UNet option; here as
    ``paper``): the same, except that the 1x1 output convolution gets the std of the last 3x3
    convolution, sqrt(2 / (9 base_channels)), as in the published code, rather than sqrt(2 / C_out).
    ``kaiming``: He normal (fan-out, ReLU) and biases ``bias_init``. ``torch``: PyTorch's own
    defaults, untouched.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown initialisation {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "torch":
        return
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        # a re-parametrized weight (weight norm) is initialised as the effective weight, then written back
        reparametrized = parametrize.is_parametrized(module, "weight")
        weight = module.weight.detach().clone() if reparametrized else module.weight
        if scheme == "paper":
            kh, kw = module.kernel_size
            std = math.sqrt(2.0 / (kh * kw * module.out_channels))
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
        else:
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        if reparametrized:
            with torch.no_grad():
                module.weight = weight
        if module.bias is not None:
            nn.init.constant_(module.bias, bias_init)
