"""Our normalization layers in MONAI's ``Norm`` factory, so that MONAI networks can use them by name.

    from seg.norms import register_monai
    register_monai()
    BasicUNet(spatial_dims=2, norm="iln")              # or norm=("gn", {"groups": 8})

MONAI resolves a norm as ``Norm[name, spatial_dims]`` (a factory called with the dimension that
returns a constructor), then calls the constructor with ``num_channels=`` (or ``num_features=``)
plus the options given with the name. Our factories return ``make_norm`` bound to the name, so
options are checked as on the command line. Only 2D is offered (our layers are 2D).

Only the ``post_conv`` kind is registered (``names(fits_monai=True)``): a layer that replaces the
convolution + normalization pair (kn, wn, bkn) does not fit MONAI's slot after a convolution, and a
conditional layer (cin, adain, spade, sean) needs a condition that MONAI's networks do not pass.
"""

from __future__ import annotations

import functools

from .registry import NORMS, make_norm, names


def _factory(name: str):
    def factory(dim: int = 2):
        if dim != 2:
            raise ValueError(f"normalization {name!r} from seg.norms is 2D only; got spatial_dims={dim}")
        return functools.partial(make_norm, name)

    factory.__doc__ = f"seg.norms layer {name!r} ({NORMS[name].__name__}), 2D."
    factory.seg_norm = name  # marks the factories registered here
    return factory


def register_monai() -> list[str]:
    """Register every layer that fits after a convolution in ``monai.networks.layers.factories.Norm``
    under its name (MONAI upper-cases it; names are case-insensitive there). Returns the names.

    Calling it again is harmless; a name already taken by a MONAI layer is an error.
    """
    from monai.networks.layers.factories import Norm

    registered = []
    for name in names(fits_monai=True):
        existing = Norm.components.get(name.upper())
        if existing is not None:
            if getattr(existing.value, "seg_norm", None) != name:
                raise ValueError(f"MONAI's Norm factory already has a layer named {name.upper()!r}")
        else:
            Norm.add_factory_callable(name, _factory(name))
        registered.append(name)
    return registered
