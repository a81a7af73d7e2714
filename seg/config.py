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
class ScheduleConfig:
    name: str = "step"
    milestones: List[int] = field(default_factory=lambda: [1])
    gamma: float = 0.2


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
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    lr: float = 0.1
    loss: str = "ce"
    seed: int = 0


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list, and the resolvers
    ``${launch_time:<strftime pattern>}`` (hydra.run.dir) and ``${cuda_device_count:}`` (hydra/launcher=gpus)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)
    if not OmegaConf.has_resolver("cuda_device_count"):
        OmegaConf.register_new_resolver("cuda_device_count", cuda_device_count)


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
    """The allowed values of each choice-valued key."""
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
        "schedule.name": ("step", "constant"),
        "loss": ("ce", "dice_ce"),
        "trainer.precision": ("auto", "fp32", "bf16"),
    }


class ConfigError(ValueError):
    """A configuration value that is well-typed but not allowed; the message names the key."""


def validate(cfg) -> None:
    """Check choice-valued keys, ranges and the norm name/options before any work starts."""
    from omegaconf import OmegaConf

    from .data import DataError
    from .data import check_options as check_data_options
    from .norms import CONTEXT_OPTIONS, check_options

    for key, allowed in choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    device = cfg.trainer.device
    if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise ConfigError(f"trainer.device={device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "data.image_size",
                "model.base_channels", "model.depth", "trainer.log_every_n_steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {OmegaConf.select(cfg, key)}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    try:
        check_data_options(cfg.data)  # the data package range-checks its own options
    except DataError as err:
        raise ConfigError(str(err)) from None
    multiple = 2 ** cfg.model.depth
    if cfg.data.image_size % multiple:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of 2**model.depth={multiple}")
    if cfg.model.aux_weight < 0:
        raise ConfigError(f"model.aux_weight must be >= 0, got {cfg.model.aux_weight}")
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
