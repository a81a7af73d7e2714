"""Optimizers by name: the table that ``optim.name`` (configs/optim/) chooses from, and the ``optim.`` keys' checks.

``OPTIMIZERS`` maps a name to a function ``(param_groups, optim) -> torch.optim.Optimizer``; the
config's valid choices are this table's names, so a new optimizer is one function here and one
``configs/optim/<name>.yaml``. Every optimizer gets the same parameter groups (``param_groups``): a
parameter may carry an ``optim_group`` dict (``lr_scale``, ``weight_decay``), and such parameters
get their own group, e.g. BIN's gates at 10x the learning rate without decay.

* ``sgd``: SGD with momentum (0.9, the ILN study's), optionally Nesterov's;
* ``adam``: Adam, ``optim.momentum`` as its beta1 (beta2 0.999).

The learning rate is ``optim.lr``, which follows the top-level ``lr`` (``seg.training.checks.validate`` refuses
another value); the schedule (seg/training/schedules.py) changes it at epoch ends.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config.schema import ConfigError, check_choice, check_range


def sgd(param_groups: list[dict], optim) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)


def adam(param_groups: list[dict], optim) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups, lr=optim.lr, betas=(optim.momentum, 0.999))


OPTIMIZERS: dict[str, Callable[[list[dict], object], torch.optim.Optimizer]] = {"sgd": sgd, "adam": adam}

# numeric keys and their allowed ranges: (minimum, maximum, minimum allowed?, maximum allowed?)
RANGES = {
    "momentum": (0, 1, True, False),
    "weight_decay": (0, None, True, None),
    "grad_clip": (0, None, False, None),  # or null: no clipping
}


def check_options(optim) -> None:
    """Refuse, naming the key, an unknown optimizer, a value out of range, or an option the chosen
    optimizer would not read (never ignored)."""
    check_choice("optim.name", optim.get("name"), OPTIMIZERS)
    for key, bounds in RANGES.items():
        if key == "grad_clip" and optim.get(key) is None:
            continue  # no clipping
        check_range(f"optim.{key}", optim.get(key), *bounds)
    if optim.get("nesterov") and optim.get("name") != "sgd":
        raise ConfigError(f"optim.nesterov=true is an option of optim.name=sgd, not {optim.get('name')}")
    if optim.get("nesterov") and optim.get("momentum") == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


def param_groups(model: torch.nn.Module, optim) -> list[dict]:
    """The model's parameters grouped by their ``optim_group`` (learning-rate scale, weight decay)."""
    groups: dict[tuple, list] = {}
    for param in model.parameters():
        special = getattr(param, "optim_group", {})
        key = (special.get("lr_scale", 1.0), special.get("weight_decay", optim.weight_decay))
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": optim.lr * scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()]


def build_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` over the model's parameter groups (``optim``: the run's ``optim`` node)."""
    return OPTIMIZERS[optim.name](param_groups(model, optim), optim)
