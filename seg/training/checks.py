"""``validate(cfg)``: every value of a run's configuration checked before any work, one line naming the key.

Hydra has already checked every key and type against the schema (seg/config/schema.py). Here each group is
checked by the module that owns it, each refusing a value with a ``ConfigError`` that names the key:

    data.*       seg.data.check_options          norm.*       seg.norms.check_options (and norm.sync below)
    model.*      seg.model.build.check_options         optim.*      seg.training.optimizers.check_options
    loss         seg.training.losses.check_loss           schedule.*   seg.training.schedules.check_schedule
    trainer.device, .precision, .compile_backend: seg.runtime.device.check_options

and here the keys of the training loop itself (``LOOP_RANGES``: epochs, batch sizes, intervals), the
seed, and what ties groups together: one learning rate (``optim.lr`` follows ``lr``), an image size
that the U-Net's depth divides, no norm size that the trainer sets from the model and data.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from . import losses
from ..model import build as model
from . import optimizers
from ..runtime import device as runtime
from ..data import DataError
from ..data import check_options as check_data_options
from ..norms import CONTEXT_OPTIONS, NORMS, check_options, names
from .schedules import check_schedule
from ..config.schema import SEED_MAX, ConfigError, check_keys, check_range

# numeric keys of the loop and their ranges: (minimum, maximum, minimum allowed?, maximum allowed?)
LOOP_RANGES = {
    "seed": (0, SEED_MAX, True, True),
    "lr": (0, None, False, None),
    "trainer.epochs": (1, None, True, None),
    "trainer.batch_size": (1, None, True, None),
    "trainer.eval_batch_size": (1, None, True, None),
    "trainer.log_every_n_steps": (1, None, True, None),
    "trainer.num_panel_images": (1, None, True, None),
    "trainer.checkpoint_every_n_steps": (0, None, True, None),
}


def validate(cfg) -> None:
    """Check every value of ``cfg`` (see the module docstring); the first bad one raises ConfigError."""
    check_keys(cfg)  # no key added with + that the schema does not know, none removed with ~
    try:
        check_data_options(cfg.data)  # the data package range-checks its own options
    except DataError as err:
        raise ConfigError(str(err)) from None
    model.check_options(cfg.model)
    optimizers.check_options(cfg.optim)
    losses.check_loss(cfg.loss)
    runtime.check_options(cfg.trainer)
    for key, bounds in LOOP_RANGES.items():
        check_range(key, OmegaConf.select(cfg, key), *bounds)
    validate_learning_rate(cfg)
    try:
        check_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    multiple = 2 ** cfg.model.depth
    if cfg.data.image_size % multiple:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of 2**model.depth={multiple}")
    validate_norm(cfg.norm)


def validate_learning_rate(cfg) -> None:
    """One source of truth: the top-level ``lr``; ``optim.lr`` follows it (``${lr}``) and may not say otherwise."""
    if cfg.optim.lr != cfg.lr:
        raise ConfigError(f"optim.lr={cfg.optim.lr} differs from lr={cfg.lr}: the learning rate is set by the "
                          f"top-level key, e.g. lr={cfg.optim.lr} (optim.lr follows it)")


def validate_norm(norm) -> None:
    """The layer's name and options (seg.norms), without the sizes the trainer sets, and ``norm.sync`` only
    for a layer that can synchronize its batch statistics (never dropped silently)."""
    name = norm.get("name", "<missing>")
    options = {k: v for k, v in norm.items() if k != "name"}
    given = sorted(set(options) & set(CONTEXT_OPTIONS))
    if given:
        raise ConfigError(f"norm.{given[0]} is set by the trainer from the model and data; remove it from the config")
    if "sync" in options and name in NORMS and name not in names(can_sync=True):
        raise ConfigError(f"norm.sync is not available for norm={name}: its statistics would not be synchronized "
                          f"across processes; norm.sync exists for {', '.join(names(can_sync=True))}")
    try:
        check_options(name, options)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
