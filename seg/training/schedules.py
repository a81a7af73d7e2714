"""Learning-rate schedules by name: the table that ``schedule=<name>`` (configs/schedule/) chooses from.

Every schedule changes the rate at epoch ends (the trainer calls ``scheduler.step()`` once per
epoch); epoch ``e`` (1-based) of ``E`` trains at ``lr * factor(e)``:

* ``step``: ``gamma ** (number of milestones < e)`` -- the ILN study's protocol, milestone [1] and
  gamma 0.2: the rate is divided by 5 after the first epoch (torch's MultiStepLR);
* ``constant``: 1;
* ``poly``: ``(1 - (e - 1) / E) ** power``, power 0.9 -- nnU-Net's default (Isensee et al., Nature
  Methods 2021), which nnU-Net also updates once per epoch (torch's PolynomialLR).

The config's valid choices are this table's names, and each schedule's options are checked against
the table (``check_schedule``, which ``seg.training.checks.validate`` calls): an option that the chosen
schedule does not read is refused, never ignored. A new schedule is one entry here and one
``configs/schedule/<name>.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def _positive_number(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"must be a finite number > 0, got {value!r}"
    return None


def _milestones(value) -> str | None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                       for v in value):
        return f"must be a list of epoch numbers >= 1, e.g. [1], got {value!r}"
    return None


@dataclass(frozen=True)
class Schedule:
    """A named schedule: its options (name -> check returning an error or None) and its builder."""

    options: dict[str, Callable[[object], str | None]]
    build: Callable[..., torch.optim.lr_scheduler.LRScheduler]  # build(optimizer, epochs, **options)


SCHEDULES: dict[str, Schedule] = {
    "step": Schedule({"milestones": _milestones, "gamma": _positive_number},
                     lambda optimizer, epochs, milestones, gamma: torch.optim.lr_scheduler.MultiStepLR(
                         optimizer, milestones=list(milestones), gamma=gamma)),
    "constant": Schedule({}, lambda optimizer, epochs: torch.optim.lr_scheduler.ConstantLR(
        optimizer, factor=1.0, total_iters=0)),
    "poly": Schedule({"power": _positive_number},
                     lambda optimizer, epochs, power: torch.optim.lr_scheduler.PolynomialLR(
                         optimizer, total_iters=epochs, power=power)),
}


def check_schedule(options: dict) -> None:
    """Refuse an unknown schedule, a missing, unknown or out-of-range option (ValueError naming the key)."""
    options = dict(options)
    name = options.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
    expected = SCHEDULES[name].options
    unknown, missing = sorted(set(options) - set(expected)), sorted(set(expected) - set(options))
    if unknown:
        takes = f"its options are: {', '.join(expected)}" if expected else "it takes no options"
        raise ValueError(f"schedule {name!r} does not read schedule.{unknown[0]} ({takes}); choose a schedule with "
                         f"its own options as schedule=<name> (configs/schedule/), e.g. schedule={name}")
    if missing:
        raise ValueError(f"schedule {name!r} needs schedule.{missing[0]}")
    for key, check in expected.items():
        problem = check(options[key])
        if problem:
            raise ValueError(f"schedule.{key} {problem}")


def build_schedule(optimizer: torch.optim.Optimizer, options: dict, epochs: int):
    """The scheduler of ``options`` (name and options, as checked by ``check_schedule``) over ``epochs`` epochs."""
    options = dict(options)
    return SCHEDULES[options.pop("name")].build(optimizer, epochs, **options)
