"""The one place where a normalization name becomes a module.

`NORMS` maps a name (as used in ``norm=<name>`` on the command line) to a class. Every class
registered here follows one small protocol so that the U-Net needs no special cases:

* ``__init__(num_channels, **options)`` -- options are keyword arguments with defaults; the
  YAML file ``configs/norm/<name>.yaml`` exposes them;
* ``forward(x, cond=None)`` -- ``cond`` is the ``Condition`` of the batch (the input image, its
  domain ids, ...) that only conditional layers read (all others ignore it), so a block can
  always pass it through;
* a conditional layer names what it reads in ``condition_inputs`` (e.g. ``("domain",)``) and,
  if a learned part is shared by all its layers (a style encoder, an auxiliary coarse
  segmentation), builds it in a classmethod ``conditioner(image_channels, num_classes,
  **options)``: a module ``(image, domain) -> Condition`` that the U-Net runs once per forward
  pass. Sizes that come from the data -- ``CONTEXT_OPTIONS``: the input's channels, the number
  of domains, the number of regions (classes) -- are keyword options of ``__init__`` that the
  U-Net fills in, not the user;
* optionally ``mixing_weights() -> dict[str, Tensor]``: the layer's learned choice between
  normalizations (BIN's rho, ILN's sigmoid(rho), SN's weights), logged per layer every epoch;
  and an attribute ``mixing_weights_inert``: None, or a short reason why this layer's mixing
  weights cannot act (ILN where channels == groups), to show instead of reading them as a choice;
* optionally ``after_optimizer_step()``: called after every optimizer step (BIN clips rho);
* optionally a classmethod ``conv_norm(in_channels, out_channels, kernel_size, *, transpose,
  **options)`` for layers that replace the *pair* convolution + normalization (kernel
  normalization fuses them, weight normalization re-parametrizes the convolution). Without it,
  the pair is an ordinary convolution followed by the layer. A layer with ``conv_norm`` has no
  standalone form: its ``__init__`` only declares the options (the schema) and raises
  ``conv_norm_only``.

Adding a layer is therefore one decorated class and one YAML file.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

NORMS: dict[str, type[nn.Module]] = {}

# options a layer may take that the U-Net sets from the model and data, never the user
CONTEXT_OPTIONS = ("image_channels", "num_domains", "num_regions")


@dataclass
class Condition:
    """What a batch offers conditional layers; built once per forward pass by the model's conditioner.

    image (N, C, H, W): the network input. domain (N,) int64: the domain (vendor) id of each image,
    -1 for a domain not seen in training; None when the data records none. The rest are made by a
    layer's shared conditioner: style (N, D) a style code per image; regions (N, K, h, w) soft
    region masks and region_codes (N, K, D) a style code per region; aux_logits (N, K, h, w) the
    low-resolution prediction the regions come from (trained with an auxiliary loss).
    """

    image: torch.Tensor
    domain: Optional[torch.Tensor] = None
    style: Optional[torch.Tensor] = None
    regions: Optional[torch.Tensor] = None
    region_codes: Optional[torch.Tensor] = None
    aux_logits: Optional[torch.Tensor] = None


def required(cond: Condition | None, field: str, layer: str) -> torch.Tensor:
    """``cond.<field>``, or a clear error naming the layer and what it lacks."""
    value = None if cond is None else getattr(cond, field)
    if value is None:
        raise ValueError(f"normalization {layer!r} needs the condition {field!r}, which this forward pass did not "
                         f"provide (build the model with seg.unet.UNet, which makes it, or pass a Condition)")
    return value


class ImageCondition(nn.Module):
    """The conditioner of every layer without a shared learned part: the image and the domain ids."""

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> Condition:
        return Condition(image=image, domain=domain)


def register_norm(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` available as ``norm=<name>``."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in NORMS:
            raise ValueError(f"normalization {name!r} is registered twice ({NORMS[name].__name__}, {cls.__name__})")
        NORMS[name] = cls
        cls.norm_name = name
        return cls

    return decorate


def norm_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; an unknown name is an error listing the valid ones."""
    try:
        return NORMS[name]
    except KeyError:
        raise ValueError(f"unknown normalization {name!r}; valid names: {', '.join(sorted(NORMS))}") from None


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the layer does not take, or of the wrong type, naming the option.

    The annotation of each ``__init__`` parameter is the schema: an ``int`` option given a float
    or string, say, is refused here rather than failing somewhere inside the layer.
    """
    cls = norm_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = {p for p in params if p not in ("self", "num_channels")}
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(
                f"normalization {name!r} has no option {key!r}; its options are: "
                f"{', '.join(sorted(accepted)) or '(none)'}"
            )
        expected = params[key].annotation
        if isinstance(expected, str):  # postponed annotations (from __future__ import annotations)
            expected = {"int": int, "float": float, "bool": bool, "str": str}.get(expected, Any)
        if expected is bool and not isinstance(value, bool):
            raise TypeError(f"norm option {key!r} of {name!r} must be true/false, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"norm option {key!r} of {name!r} must be an integer, got {value!r}")
        if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"norm option {key!r} of {name!r} must be a number, got {value!r}")


def context_options(name: str, **context: Any) -> dict[str, Any]:
    """Of the data-given sizes in ``context`` (see ``CONTEXT_OPTIONS``), those the layer ``name`` takes."""
    params = inspect.signature(norm_class(name).__init__).parameters
    return {key: value for key, value in context.items() if key in CONTEXT_OPTIONS and key in params}


def make_conditioner(name: str, image_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """The module ``(image, domain) -> Condition`` run once per forward pass for layer ``name``."""
    cls = norm_class(name)
    if hasattr(cls, "conditioner"):
        return cls.conditioner(image_channels, num_classes, **options)
    return ImageCondition()


def make_norm(name: str, num_channels: int, **options: Any) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_channels`` channels."""
    check_options(name, options)
    return norm_class(name)(num_channels, **options)


class ConvNorm(nn.Module):
    """A convolution followed by a normalization layer; the condition is passed to the layer."""

    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x, cond=None):
        return self.norm(self.conv(x), cond)


def conv_norm_only(name: str) -> TypeError:
    """The error for building a layer that replaces the conv + norm pair (kn, wn, bkn) on its own."""
    return TypeError(
        f"normalization {name!r} replaces the convolution + normalization pair and has no standalone layer; "
        f"build it with make_conv_norm({name!r}, in_channels, out_channels, kernel_size) "
        f"(the U-Net does so for norm={name})"
    )


def make_conv(in_channels: int, out_channels: int, kernel_size: int, *, transpose: bool = False) -> nn.Module:
    """The plain convolution of a block: 'same' padding, or a stride-k transposed conv (upsampling)."""
    if transpose:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=kernel_size)
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def make_conv_norm(
    name: str, in_channels: int, out_channels: int, kernel_size: int = 3, *, transpose: bool = False, **options: Any
) -> nn.Module:
    """Build the pair convolution -> normalization ``name``; ``forward(x, cond=None)``.

    Layers that change the convolution itself (fused kernel normalization, weight
    normalization) provide a ``conv_norm`` classmethod and are built through it.
    """
    check_options(name, options)
    cls = norm_class(name)
    if hasattr(cls, "conv_norm"):
        return cls.conv_norm(in_channels, out_channels, kernel_size, transpose=transpose, **options)
    return ConvNorm(make_conv(in_channels, out_channels, kernel_size, transpose=transpose), cls(out_channels, **options))
