"""The model of a configuration: ``build_model`` for training, prediction and export, and the ``model.`` keys.

``build_model(config, num_domains)`` is the one place where a configuration becomes a network: the
trainer calls it with the run's config, seg/inference/predict.py and the export tool with the resolved
config a checkpoint records, so a trained model is always rebuilt as it was trained. Today the one
model is the U-Net of seg/model/unet.py (``model.name=unet``); its normalization is ``norm.name`` with the
options of ``norm.*`` (seg/norms). ``check_options`` refuses, naming the key, a ``model.`` value that
means nothing; ``load_weights`` starts a model from a checkpoint's weights (``model.init_from``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.checkpoint import load_checkpoint
from ..data.slices import class_names
from ..config.schema import ConfigError, check_choice, check_range
from .unet import INITS, UPSAMPLINGS, UNet

MODELS = ("unet",)

# numeric keys and their allowed ranges: (minimum, maximum, minimum allowed?, maximum allowed?)
RANGES = {
    "in_channels": (1, None, True, None),
    "base_channels": (1, None, True, None),
    "depth": (1, None, True, None),
    "aux_weight": (0, None, True, None),
    "bias_init": (None, None, None, None),  # any finite number
}


def check_options(model) -> None:
    """Refuse, naming the key, a ``model.`` value that is not a choice of its table or is out of range."""
    check_choice("model.name", model.get("name"), MODELS)
    check_choice("model.init", model.get("init"), INITS)
    check_choice("model.up", model.get("up"), UPSAMPLINGS)
    for key, bounds in RANGES.items():
        check_range(f"model.{key}", model.get(key), *bounds)


def norm_options(config) -> dict:
    """The options of ``norm.*`` (every key but its name), as the layers take them."""
    return {key: value for key, value in config["norm"].items() if key != "name"}


def build_model(config, num_domains: int = 1) -> UNet:
    """The freshly initialised network of ``config`` (the run's config, or the resolved dict a checkpoint
    records), on the CPU; ``num_domains``: the training domains of a conditional norm (at least 1).

    A norm option that does not fit the network's widths (e.g. groups) is a ConfigError naming the norm.
    """
    model, norm = config["model"], config["norm"]
    options = norm_options(config)
    try:
        return UNet(in_channels=model["in_channels"], num_classes=len(class_names(config["data"]["task"])) + 1,
                    base_channels=model["base_channels"], depth=model["depth"], norm=norm["name"],
                    norm_options=options, init=model["init"], bias_init=model["bias_init"],
                    num_domains=num_domains, up=model.get("up", "transpose2"))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"norm={norm['name']} with {options} does not fit this U-Net: {err}") from None


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Start from the weights of a checkpoint (``model.init_from``); a different model is refused clearly.

    The checkpoint may come from another norm (that is the point of fine-tuning with frozen BN),
    so only the tensors are compared: names and shapes must match.
    """
    if not Path(path).is_file():
        raise ConfigError(f"model.init_from={path}: no such checkpoint file")
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"model.init_from={path} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, different shapes {wrong[:5]}")
    model.load_state_dict(state)
