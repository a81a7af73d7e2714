"""Normalization layers by name: ``NORMS`` (name -> class), ``make_norm`` and ``make_conv_norm``.

Importing this package registers every layer; see ``registry`` for the protocol a layer follows.
"""

from . import mixed, standard  # noqa: F401  (registers the layers)
from .registry import NORMS, ConvNorm, check_options, make_conv, make_conv_norm, make_norm, norm_class, register_norm

__all__ = ["NORMS", "ConvNorm", "check_options", "make_conv", "make_conv_norm", "make_norm", "norm_class", "register_norm"]
