"""The configuration schema: typed dataclasses that Hydra validates every override against.

``configs/train.yaml`` starts from ``train_schema`` (registered below), so a misspelt key or a
value of the wrong type fails at start with Hydra naming the key. Values restricted to a set of
choices (task, loss, device...) are checked by ``validate`` before anything is loaded. Norm
options are free-form here (each layer takes different ones) and are checked against the
layer's own signature by ``seg.norms.check_options``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class PhantomConfig:
    """The built-in phantom (configs/data/phantom.yaml sets all three); left unset by every real dataset,
    so that a leftover ``data.phantom.*`` override on one is refused instead of silently ignored."""

    generate: bool = False  # generate the phantom at data.root (once) before reading it
    num_patients: Optional[int] = None
    seed: Optional[int] = None


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0
    flip: bool = False


@dataclass
class DataConfig:
    name: str = MISSING
    format: str = "acdc"
    root: str = MISSING
    task: str = "rv"
    image_size: int = 256
    spacing: Optional[float] = 1.5
    clip_percentiles: List[float] = field(default_factory=lambda: [0.5, 99.5])
    normalize: str = "zscore"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_patients: Optional[int] = None
    max_slices_per_volume: Optional[int] = None
    shuffle_buffer: Optional[int] = None  # TF-style shuffle buffer of the training order (seg/ordering.py); null: full
    phantom: Optional[PhantomConfig] = field(default_factory=PhantomConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # reading (see data/README.md)
    on_error: str = "raise"  # raise | skip: a bad patient ends the run, or is skipped and listed in metrics.json
    label_map: Dict[str, str] = field(default_factory=dict)  # nnunet: dataset label name -> background|rv|myo|lv
    patient_regex: Optional[str] = None  # nnunet: regex with (?P<patient>...) grouping case ids into patients
    # the prepared-data cache (seg/data/cache.py)
    cache: bool = True
    cache_dir: Optional[str] = None  # null: <root>/.seg-cache
    cache_dtype: str = "float32"  # float32 | float16 (half the file; see data/README.md)
    # splits (seg/data/splits.py): random fractions unless one of the following is set
    split_seed: Optional[int] = None  # null: the run's seed
    fold: Optional[int] = None  # k-fold cross-validation: this fold (0-based) tests
    num_folds: int = 2
    split_file: Optional[str] = None  # JSON/CSV fixed split, nnU-Net splits_final.json, or a run's metrics.json
    train_vendors: Optional[List[str]] = None  # domain shift: train on these vendors' patients ...
    test_vendors: Optional[List[str]] = None  # ... test on these (null: all other vendors)
    domain_key: str = "vendor"  # the case field whose value is the domain id of conditional norms (cin)
    train_centres: Optional[List[str]] = None
    test_centres: Optional[List[str]] = None


@dataclass
class ModelConfig:
    name: str = "unet"
    in_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    init: str = "paper"
    bias_init: float = 0.1
    init_from: Optional[str] = None
    aux_weight: float = 0.4
    up: str = "transpose2"  # the up-convolution: transpose2 (2x2 stride 2) | transpose3 (3x3 stride 2, the ILN code's)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = MISSING
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    grad_clip: Optional[float] = None


@dataclass
class TrainerConfig:
    epochs: int = 2
    batch_size: int = 1
    eval_batch_size: int = 16
    device: str = "auto"
    channels_last: bool = True
    log_every_n_steps: int = 10
    num_panel_images: int = 4
    save_checkpoints: bool = True
    checkpoint_every_n_steps: int = 0
    resume: Any = False
    deterministic: bool = False
    progress: bool = True
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: tracing only, a quick check)


@dataclass
class PathsConfig:
    data_dir: str = "data"


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    norm: Dict[str, Any] = MISSING
    optim: OptimConfig = MISSING
    schedule: Dict[str, Any] = MISSING  # name + that schedule's options, checked by seg.schedules.check_schedule
    trainer: TrainerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    lr: float = 0.1
    loss: str = "ce"
    seed: int = 0


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list, and the resolvers
    ``${launch_time:<strftime pattern>}`` (hydra.run.dir), ``${cuda_device_count:}`` (hydra/launcher=gpus)
    and ``${not_identity:}`` (the keys that do not define a run, seg/identity.py: hydra.job's
    override_dirname leaves them out of a sweep's job folder names)."""
    from .identity import not_identity

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)
    if not OmegaConf.has_resolver("cuda_device_count"):
        OmegaConf.register_new_resolver("cuda_device_count", cuda_device_count)
    if not OmegaConf.has_resolver("not_identity"):
        OmegaConf.register_new_resolver("not_identity", not_identity)


_launch_time: datetime | None = None


def launch_time(pattern: str) -> str:
    """Hydra's ``${now:...}`` for the run folder, except that every process of a torchrun job has the
    same one: rank 0's clock, broadcast before Hydra composes (``seg.distributed.processes``)."""
    global _launch_time
    if _launch_time is None:
        _launch_time = datetime.now()
    return _launch_time.strftime(pattern)


def fix_launch_time(timestamp: float) -> None:
    """Set the instant ``${launch_time:...}`` formats (a POSIX timestamp)."""
    global _launch_time
    _launch_time = datetime.fromtimestamp(timestamp)


def cuda_device_count() -> int:
    """The number of GPUs of this machine, at least 1 (the parallel jobs of ``hydra/launcher=gpus``)."""
    import torch

    return max(torch.cuda.device_count(), 1)


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each choice-valued key (schedule.name: seg/schedules.py's table)."""
    from .data import READERS, TASKS
    from .unet import INITS, UPSAMPLINGS

    return {
        "data.format": tuple(READERS),
        "data.task": tuple(TASKS),
        "data.normalize": ("zscore", "none"),
        "data.on_error": ("raise", "skip"),
        "data.cache_dtype": ("float32", "float16"),
        "model.name": ("unet",),
        "model.init": INITS,
        "model.up": UPSAMPLINGS,
        "optim.name": ("sgd", "adam"),
        "loss": ("ce", "dice_ce"),
        "trainer.precision": ("auto", "fp32", "bf16"),
    }


class ConfigError(ValueError):
    """A configuration value that is well-typed but not allowed; the message names the key."""


def validate(cfg) -> None:
    """Check choice-valued keys, ranges and the norm name/options before any work starts."""
    from .data import DataError
    from .data import check_options as check_data_options
    from .norms import CONTEXT_OPTIONS, check_options
    from .schedules import check_schedule

    for key, allowed in choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    device = cfg.trainer.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"trainer.device={device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
    validate_ranges(cfg)
    validate_learning_rate(cfg)
    validate_optimizer(cfg.optim)
    try:
        check_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        check_data_options(cfg.data)  # the data package range-checks its own options
    except DataError as err:
        raise ConfigError(str(err)) from None
    multiple = 2 ** cfg.model.depth
    if cfg.data.image_size % multiple:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of 2**model.depth={multiple}")
    options = {k: v for k, v in cfg.norm.items() if k != "name"}
    given = sorted(set(options) & set(CONTEXT_OPTIONS))
    if given:
        raise ConfigError(f"norm.{given[0]} is set by the trainer from the model and data; remove it from the config")
    validate_sync(cfg.norm.get("name", "<missing>"), options)
    try:
        check_options(cfg.norm.get("name", "<missing>"), options)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if cfg.trainer.compile:
        validate_compile_backend(cfg.trainer.compile_backend)


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
# numeric keys and their allowed ranges, checked at start: (minimum, maximum, minimum allowed?, maximum allowed?)
RANGES = {
    "seed": (0, SEED_MAX, True, True),
    "trainer.epochs": (1, None, True, None),
    "trainer.batch_size": (1, None, True, None),
    "trainer.eval_batch_size": (1, None, True, None),
    "trainer.log_every_n_steps": (1, None, True, None),
    "trainer.num_panel_images": (1, None, True, None),
    "trainer.checkpoint_every_n_steps": (0, None, True, None),
    "model.in_channels": (1, None, True, None),
    "model.base_channels": (1, None, True, None),
    "model.depth": (1, None, True, None),
    "model.aux_weight": (0, None, True, None),
    "model.bias_init": (None, None, None, None),
    "data.image_size": (1, None, True, None),
    "lr": (0, None, False, None),
    "optim.momentum": (0, 1, True, False),
    "optim.weight_decay": (0, None, True, None),
    "optim.grad_clip": (0, None, False, None),  # or null: no clipping
}


def check_range(key: str, value, low, high, low_ok, high_ok) -> None:
    """One key's value: a finite number within [low, high] (the bounds open where not ``*_ok``)."""
    import math

    if value is None and key == "optim.grad_clip":
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number")
    below = low is not None and (value < low if low_ok else value <= low)
    above = high is not None and (value > high if high_ok else value >= high)
    if below or above:
        interval = (("[" if low_ok else "(") + ("-inf" if low is None else f"{low}") + ", "
                    + ("inf" if high is None else ("2**32-1" if high == SEED_MAX else f"{high}")) + ("]" if high_ok else ")"))
        raise ConfigError(f"{key}={value} is out of range: it must be in {interval}")


def validate_ranges(cfg) -> None:
    """Every numeric key of the trainer, optimizer, model and the seed within its range (``RANGES``)."""
    for key, bounds in RANGES.items():
        check_range(key, OmegaConf.select(cfg, key), *bounds)


def validate_learning_rate(cfg) -> None:
    """One source of truth: the top-level ``lr``; ``optim.lr`` follows it (``${lr}``) and may not say otherwise."""
    if cfg.optim.lr != cfg.lr:
        raise ConfigError(f"optim.lr={cfg.optim.lr} differs from lr={cfg.lr}: the learning rate is set by the "
                          f"top-level key, e.g. lr={cfg.optim.lr} (optim.lr follows it)")


def validate_optimizer(optim) -> None:
    """Options that the chosen optimizer would not read are refused, not ignored."""
    if optim.nesterov and optim.name != "sgd":
        raise ConfigError(f"optim.nesterov=true is an option of optim.name=sgd, not {optim.name}")
    if optim.nesterov and optim.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


def validate_sync(name: str, options: dict) -> None:
    """``norm.sync`` only for the layers that can synchronize their batch statistics; never dropped silently."""
    from .norms import NORMS, names

    if "sync" not in options or name not in NORMS:
        return
    syncable = names(can_sync=True)
    if name not in syncable:
        raise ConfigError(f"norm.sync is not available for norm={name}: its statistics would not be synchronized "
                          f"across processes; norm.sync exists for {', '.join(syncable)}")


def validate_compile_backend(backend: str) -> None:
    """trainer.compile_backend must be one torch.compile knows."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # also the debugging ones (aot_eager...)
        usual = sorted({*torch._dynamo.list_backends(), "aot_eager", "eager"})
        raise ConfigError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; "
                          f"choose one of: {', '.join(usual)}")
