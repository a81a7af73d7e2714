"""Normalization layers by name: ``make_norm``, ``make_conv_norm``, and the registry's answers (``names``, ``spec``).

Every module of this package is imported here, in name order, so a layer registers itself by
living in the package: a new layer is one module with a decorated class (see ``registry`` for
the protocol it follows) and one ``configs/norm/<name>.yaml``; nothing lists the modules (docs/layers.md
lists the layers).

``names(kind=..., can_sync=True, ...)`` lists the layers of a kind or with a capability, and
``spec(name)`` tells what one layer declares; ``register_monai()`` makes the layers that fit after a
convolution available to MONAI networks. The package imports seg.runtime only (the process group of
``norm.sync``).
"""

import importlib
import pkgutil

from .monai_bridge import register_monai
from .registry import (CAPABILITIES, CONTEXT_OPTIONS, KINDS, NORMS, Condition, ConvNorm, NormSpec, check_options,
                       context_options, conv_norm_only, layer_spec, make_conditioner, make_conv, make_conv_norm,
                       make_norm, names, norm_class, register_norm, spec)

for _module in pkgutil.iter_modules(__path__):  # the layer modules register their classes on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CAPABILITIES", "CONTEXT_OPTIONS", "KINDS", "NORMS", "Condition", "ConvNorm", "NormSpec", "check_options",
           "context_options", "conv_norm_only", "layer_spec", "make_conditioner", "make_conv", "make_conv_norm",
           "make_norm", "names", "norm_class", "register_monai", "register_norm", "spec"]
