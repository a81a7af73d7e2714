"""Normalization layers by name: ``NORMS`` (name -> class), ``make_norm`` and ``make_conv_norm``.

Importing this package registers every layer; see ``registry`` for the protocol a layer follows.

    standard  none, bn (also frozen BN* and synchronized), in, ln, gn
    mixed     iln, bin, sn        -- one pass from instance statistics (``fused``)
    local     pn, lcn
    kernel    kn                  -- KNConv, replaces the conv + norm pair
    weight    wn                  -- weight-normed convs, replaces the pair
    kalman    bkn                 -- batch Kalman norm, replaces the pair
    conditional cin, adain, spade, sean -- affine parameters from a ``Condition``

``register_monai()`` makes the layers that fit after a convolution available to MONAI networks.
"""

from . import conditional, kalman, kernel, local, mixed, standard, weight  # noqa: F401  (registers the layers)
from .monai_bridge import register_monai
from .registry import (CONTEXT_OPTIONS, NORMS, Condition, ConvNorm, check_options, context_options, conv_norm_only,
                       make_conditioner, make_conv, make_conv_norm, make_norm, norm_class, register_norm)

__all__ = ["CONTEXT_OPTIONS", "NORMS", "Condition", "ConvNorm", "check_options", "context_options", "conv_norm_only",
           "make_conditioner", "make_conv", "make_conv_norm", "make_norm", "norm_class", "register_monai",
           "register_norm"]
