"""The one place where a normalization name becomes a module, and where a layer's kind and capabilities are known.

`NORMS` maps a name (as used in ``norm=<name>`` on the command line) to a class. Each class states
once, in its own body, what kind of layer it is and what it can do; the registry reads that and
the class's signature when the class registers (refusing a class whose statements contradict
each other) and answers every question the rest of the code asks -- ``names(kind=...,
can_sync=True)``, ``spec(name).needs_domain`` -- so nothing else needs to inspect a layer class.

The kind (class attribute ``kind``, required) says how a block builds the layer:

* ``"post_conv"`` -- a layer after a convolution: ``__init__(num_channels, **options)`` and
  ``forward(x, cond=None)``, ``cond`` ignored. Only this kind fits MONAI's ``Norm`` slot.
* ``"conv_pair"`` -- replaces the pair convolution + normalization (kernel normalization fuses
  them, weight normalization re-parametrizes the convolution): a classmethod ``conv_norm(in_channels,
  out_channels, kernel_size, *, transpose, **options)`` builds the pair, and its keyword options
  are the layer's options. There is no standalone layer (``make_norm`` refuses it with
  ``conv_norm_only``).
* ``"conditional"`` -- a post-conv layer whose affine parameters come from the batch's
  ``Condition`` (the input image, its domain ids, ...). It names the fields it reads in
  ``condition_inputs`` (e.g. ``("domain",)``) and, if a learned part is shared by all its layers
  (a style encoder, an auxiliary coarse segmentation), builds it in a classmethod
  ``conditioner(image_channels, num_classes, **options)``: a module ``(image, domain) ->
  Condition`` that the U-Net runs once per forward pass; it is given every option of the layer,
  defaults filled in, so it declares none of its own.

Capabilities, declared as class attributes (a class that does not declare one does not have it):

* ``can_sync`` -- its batch statistics can be synchronized over the processes of a
  data-parallel run; the option that switches it on is ``sync`` (refused at registration otherwise);
* ``batch_statistics`` -- in training, its output for one image can depend on the other images of
  the batch (with its default options; spade and sean only with ``base: bn``). Tested for every
  layer, both ways, and in evaluation no layer may depend on the batch.
* ``can_stack`` -- one instance can hold the layers of several independent runs side by side on
  the channel axis (``seg.training.stacked``: K runs trained as one computation, their channels folded into
  one tensor, run k's C channels at k*C..(k+1)*C-1): it takes the size ``runs`` (a context option,
  set by the stacker, never by the user), and with ``runs=R`` over R*C channels it computes
  exactly what R instances over C channels would, each on its own block -- statistics over the
  channel axis (layer, group, positional) per run, never across runs. Its state is the runs'
  states concatenated on the first axis. Only a ``post_conv`` layer can declare it (the stacker
  builds the convolutions itself).

Read from the class, never declared twice:

* the options: the keyword parameters of ``__init__`` (of ``conv_norm`` for a pair) with their
  defaults; each annotation is the option's type, checked by ``check_options``.
  ``configs/norm/<name>.yaml`` exposes exactly these, with the same defaults (tested). Sizes that
  come from the data -- ``CONTEXT_OPTIONS``: the input's channels, the number of domains, the
  number of regions (classes) -- are options the U-Net fills in, not the user; so is ``runs``, the
  number of stacked runs a layer holds, which the stacker (seg/training/stacked.py) fills in;
* ``mixing_weights``: the class defines ``mixing_weights() -> dict[str, Tensor]``, the layer's
  learned choice between normalizations (BIN's rho, ILN's sigmoid(rho), SN's weights), logged per
  layer every epoch; an attribute ``mixing_weights_inert`` (None, or a short reason why this
  layer's weights cannot act, e.g. ILN where channels == groups) is shown instead of reading them
  as a choice;
* ``needs_domain``: ``"domain"`` is among its ``condition_inputs``;
* ``fits_monai``: its kind is ``post_conv``.

An instance may also define ``after_optimizer_step()``, called after every optimizer step (BIN
clips rho).

Adding a layer is one module in this package (it is imported, and so registered, by the
package's ``__init__`` without being listed) with a decorated class, and one YAML file. Every
function below that takes a name also takes a class that follows this protocol (registered or
not, to try a layer without registering it) or a ``functools.partial`` of one with options bound,
as timm's ``get_norm_layer`` does.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

NORMS: dict[str, type[nn.Module]] = {}
KINDS = ("post_conv", "conv_pair", "conditional")
# options a layer may take that the U-Net sets from the model and data, never the user
# (``runs``: how many stacked runs one layer holds, set by seg.training.stacked)
CONTEXT_OPTIONS = ("image_channels", "num_domains", "num_regions", "runs")

Norm = Union[str, type, functools.partial]  # a registered name, a protocol class, or a partial of one


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
                         f"provide (build the model with seg.model.unet.UNet, which makes it, or pass a Condition)")
    return value


class ImageCondition(nn.Module):
    """The conditioner of every layer without a shared learned part: the image and the domain ids."""

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> Condition:
        return Condition(image=image, domain=domain)


# ---------------------------------------------------------------------------- what a layer declares


@dataclass(frozen=True)
class NormSpec:
    """What the registry knows of one layer: its declared kind and capabilities, and its options."""

    name: str
    cls: type
    kind: str
    can_sync: bool
    batch_statistics: bool
    can_stack: bool
    condition_inputs: tuple[str, ...]
    mixing_weights: bool
    options: Mapping[str, Any]  # the user's options -> their defaults (configs/norm/<name>.yaml)
    context: tuple[str, ...]  # the CONTEXT_OPTIONS it takes, filled in by the U-Net
    types: Mapping[str, Any] = field(repr=False)  # option (context ones too) -> its annotation

    @property
    def needs_domain(self) -> bool:
        """Each image's domain id must reach the layer (the trainer refuses data that records none)."""
        return "domain" in self.condition_inputs

    @property
    def fits_monai(self) -> bool:
        """It can sit in MONAI's Norm slot after a convolution (``register_monai``)."""
        return self.kind == "post_conv"


# what ``names`` can select on, besides the kind
CAPABILITIES = ("can_sync", "batch_statistics", "mixing_weights", "needs_domain", "fits_monai", "can_stack")


def layer_spec(cls: type, name: str | None = None) -> NormSpec:
    """Read what ``cls`` declares and check that it holds together; a ``TypeError`` names any contradiction."""
    label = name or cls.__name__

    def refuse(problem: str) -> TypeError:
        return TypeError(f"normalization {label!r} ({cls.__qualname__}): {problem}")

    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        raise refuse(f"kind = {kind!r}; a layer declares its kind, one of: {', '.join(KINDS)}")
    flags = {flag: getattr(cls, flag, False) for flag in ("can_sync", "batch_statistics", "can_stack")}
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise refuse(f"{flag} must be True or False, got {value!r}")
    if callable(getattr(cls, "conv_norm", None)) != (kind == "conv_pair"):
        raise refuse("a conv_pair layer, and only a conv_pair layer, defines the classmethod conv_norm")
    condition_inputs = tuple(getattr(cls, "condition_inputs", ()))
    if bool(condition_inputs) != (kind == "conditional"):
        raise refuse("a conditional layer, and only a conditional layer, names what it reads in condition_inputs")
    unknown = sorted(set(condition_inputs) - {f.name for f in fields(Condition)})
    if unknown:
        raise refuse(f"condition_inputs names {', '.join(unknown)}, which a Condition does not have")

    if kind == "conv_pair":  # the options are conv_norm's keywords
        params = [p for p in inspect.signature(cls.conv_norm).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name != "transpose"]
    else:
        params = list(inspect.signature(cls.__init__).parameters.values())
        if len(params) < 2 or params[1].name != "num_channels":
            raise refuse("__init__ takes (num_channels, **options)")
        params = params[2:]
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is param.empty:
            raise refuse(f"option {param.name!r} must be a keyword with a default")
    options = {p.name: p.default for p in params if p.name not in CONTEXT_OPTIONS}
    if flags["can_sync"] != ("sync" in options):
        raise refuse("a layer declares can_sync exactly when it takes the option sync")
    if flags["can_sync"] and not flags["batch_statistics"]:
        raise refuse("can_sync without batch_statistics: there would be nothing to synchronize")
    if flags["can_stack"] != any(p.name == "runs" for p in params):
        raise refuse("a layer declares can_stack exactly when it takes the size runs")
    if flags["can_stack"] and kind != "post_conv":
        raise refuse("only a post_conv layer can declare can_stack (the stacker builds the convolutions)")

    conditioner = getattr(cls, "conditioner", None)
    if conditioner is not None:
        if kind != "conditional":
            raise refuse("only a conditional layer has a conditioner")
        own = {p.name for p in inspect.signature(conditioner).parameters.values()
               if p.kind is p.KEYWORD_ONLY} - set(options)
        if own:
            raise refuse(f"the conditioner's options {', '.join(sorted(own))} are not the layer's options")

    return NormSpec(name=label, cls=cls, kind=kind, condition_inputs=condition_inputs,
                    mixing_weights=callable(getattr(cls, "mixing_weights", None)),
                    options=MappingProxyType(options),
                    context=tuple(p.name for p in params if p.name in CONTEXT_OPTIONS),
                    types=MappingProxyType({p.name: p.annotation for p in params}), **flags)


_SPECS: dict[str, NormSpec] = {}


def register_norm(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` available as ``norm=<name>``, after checking what it declares."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in NORMS:
            raise ValueError(f"normalization {name!r} is registered twice ({NORMS[name].__name__}, {cls.__name__})")
        _SPECS[name] = layer_spec(cls, name)
        NORMS[name] = cls
        cls.norm_name = name
        return cls

    return decorate


# ---------------------------------------------------------------------------- questions


def norm_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; an unknown name is an error listing the valid ones."""
    return spec(name).cls


def spec(norm: Norm) -> NormSpec:
    """What the layer ``norm`` (a name, a protocol class, or a partial of one) declares."""
    return _resolve(norm)[0]


def names(kind: str | None = None, **capabilities: bool) -> list[str]:
    """The registered names, sorted, of the layers of ``kind`` (any kind if None) that have (True) or
    lack (False) each capability given, e.g. ``names(can_sync=True)``, ``names("post_conv",
    batch_statistics=False)``. Capabilities: see ``CAPABILITIES``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind of normalization {kind!r}; kinds: {', '.join(KINDS)}")
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise TypeError(f"no capability {unknown[0]!r}; ask about: {', '.join(CAPABILITIES)}")
    return sorted(name for name, found in _SPECS.items() if (kind is None or found.kind == kind)
                  and all(getattr(found, key) == wanted for key, wanted in capabilities.items()))


def _resolve(norm: Norm) -> tuple[NormSpec, dict[str, Any]]:
    """The spec of ``norm`` and the options a partial binds."""
    if isinstance(norm, functools.partial):
        if norm.args:
            raise TypeError(f"a partial of a normalization binds options by keyword only; got {norm!r}")
        found, bound = _resolve(norm.func)
        return found, {**bound, **norm.keywords}
    if isinstance(norm, str):
        try:
            return _SPECS[norm], {}
        except KeyError:
            raise ValueError(f"unknown normalization {norm!r}; valid names: {', '.join(sorted(NORMS))}") from None
    if isinstance(norm, type):
        registered = next((name for name, cls in NORMS.items() if cls is norm), None)
        return (_SPECS[registered] if registered else layer_spec(norm)), {}
    raise TypeError(f"a normalization is a registered name, a layer class or a partial of one; got {norm!r}")


def _check(found: NormSpec, options: dict[str, Any]) -> None:
    """Refuse options the layer does not take, or of the wrong type, naming the option.

    The annotation of each option is the schema: an ``int`` option given a float or string, say,
    is refused here rather than failing somewhere inside the layer.
    """
    name, accepted = found.name, found.types
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(
                f"normalization {name!r} has no option {key!r}; its options are: "
                f"{', '.join(sorted(found.options)) or '(none)'}"  # the user's: the sizes are filled in
            )
        expected = accepted[key]
        if isinstance(expected, str):  # postponed annotations (from __future__ import annotations)
            expected = {"int": int, "float": float, "bool": bool, "str": str}.get(expected, Any)
        if expected is bool and not isinstance(value, bool):
            raise TypeError(f"norm option {key!r} of {name!r} must be true/false, got {value!r}")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"norm option {key!r} of {name!r} must be an integer, got {value!r}")
        if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"norm option {key!r} of {name!r} must be a number, got {value!r}")


def check_options(norm: Norm, options: dict[str, Any]) -> None:
    """Refuse options the layer ``norm`` does not take, or of the wrong type, naming the option."""
    found, bound = _resolve(norm)
    _check(found, {**bound, **options})


def context_options(norm: Norm, **context: Any) -> dict[str, Any]:
    """Of the data-given sizes in ``context`` (see ``CONTEXT_OPTIONS``), those the layer ``norm`` takes."""
    return {key: value for key, value in context.items() if key in spec(norm).context}


# ---------------------------------------------------------------------------- building


def make_conditioner(norm: Norm, image_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """The module ``(image, domain) -> Condition`` run once per forward pass for layer ``norm``; a
    layer's own conditioner gets every option of the layer, defaults filled in."""
    found, bound = _resolve(norm)
    options = {**bound, **options}
    _check(found, options)
    if found.kind == "conditional" and hasattr(found.cls, "conditioner"):
        return found.cls.conditioner(image_channels, num_classes, **{**found.options, **options})
    return ImageCondition()


def make_norm(norm: Norm, num_channels: int, **options: Any) -> nn.Module:
    """Build the normalization layer ``norm`` for ``num_channels`` channels."""
    found, bound = _resolve(norm)
    options = {**bound, **options}
    if found.kind == "conv_pair":
        raise conv_norm_only(found.name)
    _check(found, options)
    return found.cls(num_channels, **options)


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
    norm: Norm, in_channels: int, out_channels: int, kernel_size: int = 3, *, transpose: bool = False, **options: Any
) -> nn.Module:
    """Build the pair convolution -> normalization ``norm``; ``forward(x, cond=None)``.

    A ``conv_pair`` layer (fused kernel normalization, weight normalization, batch Kalman
    normalization) builds the pair itself (``conv_norm``); any other is a plain convolution
    followed by the layer.
    """
    found, bound = _resolve(norm)
    options = {**bound, **options}
    _check(found, options)
    if found.kind == "conv_pair":
        return found.cls.conv_norm(in_channels, out_channels, kernel_size, transpose=transpose, **options)
    conv = make_conv(in_channels, out_channels, kernel_size, transpose=transpose)
    return ConvNorm(conv, found.cls(out_channels, **options))
