"""The configuration schema: typed dataclasses that Hydra validates every override against, and the
error and checks every owner of a config group uses to refuse a value.

``configs/train.yaml`` starts from ``train_schema`` (``TrainConfig``, registered by seg/config/launch.py), so
a misspelt key or a value of the wrong type fails at start with Hydra naming the key. Values that are
well typed but not allowed are refused by the owner of their group (``check_options`` of seg/data,
seg/norms, seg/model/build.py, seg/training/optimizers.py, seg/runtime/device.py; seg/training/losses.py, seg/training/schedules.py), each
with one line naming the key (``ConfigError``); ``seg.training.checks.validate`` calls them all. Norm options
and schedule options are free-form here: each layer and each schedule takes different ones.

A leaf: imports nothing of seg, so that every module may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value that is well-typed but not allowed; the message names the key."""


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def check_choice(key: str, value, allowed) -> None:
    """``value`` must be one of ``allowed`` (e.g. a table's names)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def check_range(key: str, value, low, high, low_ok, high_ok) -> None:
    """One key's value: a finite number within [low, high] (the bounds open where not ``*_ok``; None: unbounded)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number")
    below = low is not None and (value < low if low_ok else value <= low)
    above = high is not None and (value > high if high_ok else value >= high)
    if below or above:
        upper = "inf" if high is None else ("2**32-1" if high == SEED_MAX else f"{high}")
        interval = (("[" if low_ok else "(") + ("-inf" if low is None else f"{low}") + ", " + upper
                    + ("]" if high_ok else ")"))
        raise ConfigError(f"{key}={value} is out of range: it must be in {interval}")


@dataclass
class PhantomConfig:
    """The built-in phantom (configs/data/phantom.yaml sets all three); left unset by every real dataset,
    so that a leftover ``data.phantom.*`` override on one is refused instead of silently ignored."""

    generate: bool = False  # generate the phantom at data.root (once) before reading it
    num_patients: Optional[int] = None
    seed: Optional[int] = None


@dataclass
class RandomAugment:
    """One per-image augmentation of ``data.augment`` (seg/data/augmentations.py): its probability (null: the
    preset's) and the range its parameter is drawn from."""

    p: Optional[float] = None
    range: List[float] = field(default_factory=list)


@dataclass
class ElasticAugment(RandomAugment):
    sigma: List[float] = field(default_factory=lambda: [9.0, 13.0])  # smoothing of the displacement (pixels)


@dataclass
class BiasFieldAugment(RandomAugment):
    degree: int = 3  # of the Legendre polynomial of log(field)


def augment(low: float, high: float) -> Any:
    return field(default_factory=lambda: RandomAugment(range=[low, high]))


@dataclass
class AugmentConfig:
    """The ILN protocol's rotation and mirroring, and the per-image augmentations, all off by default
    (``preset: none``); ranges default to their source's (docs/configuration.md)."""

    rotate_deg: float = 15.0
    flip: bool = False
    preset: str = "none"  # none | nnunet: the probabilities of the options whose p is null
    scale: RandomAugment = augment(0.7, 1.4)
    elastic: ElasticAugment = field(default_factory=lambda: ElasticAugment(range=[0.0, 200.0]))
    bias_field: BiasFieldAugment = field(default_factory=lambda: BiasFieldAugment(range=[0.0, 0.1]))
    rician: RandomAugment = augment(0.0, 0.1)
    noise: RandomAugment = augment(0.0, 0.1)
    blur: RandomAugment = augment(0.5, 1.0)
    brightness: RandomAugment = augment(0.75, 1.25)
    contrast: RandomAugment = augment(0.75, 1.25)
    lowres: RandomAugment = augment(0.5, 1.0)
    gamma_inverted: RandomAugment = augment(0.7, 1.5)
    gamma: RandomAugment = augment(0.7, 1.5)


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
    shuffle_buffer: Optional[int] = None  # TF-style shuffle buffer of the training order (seg/training/ordering.py); null: full
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
    progress: bool = True  # a progress bar (the run's position is seg.runtime.checkpoint.RunState)
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
    schedule: Dict[str, Any] = MISSING  # name + that schedule's options, checked by seg.training.schedules.check_schedule
    trainer: TrainerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    lr: float = 0.1
    loss: str = "ce"
    seed: int = 0


# ---------------------------------------------------------------------------- the keys of a composed configuration


def check_keys(cfg) -> None:
    """Every key of the schema is there, and no other: Hydra lets ``+key=value`` add a key the schema does not
    know (``+trainer.epoch=5``, a misspelt ``trainer.epochs``, would be ignored) and ``~key`` remove one
    (``~lr``); both are refused here, with one line naming the key. The free-form groups (``norm``,
    ``schedule``, ``data.label_map``) are checked by their owners."""
    check_node(TrainConfig, cfg, "")


def check_node(schema: type, node, prefix: str) -> None:
    """The keys of ``node`` (a DictConfig or dict) against the dataclass ``schema``; ``prefix``: its path. This
    level's keys first (a removed ``lr`` is named as missing, not as the ``${lr}`` that ``optim.lr`` reads)."""
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for name in node.keys():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            where = prefix.rstrip(".") or "the top level"
            hint = (f"did you mean {prefix}{close[0]}?" if close else f"the keys of {where}: {', '.join(known)}")
            raise ConfigError(f"{prefix}{name} is not a key of the configuration ({hint}); + adds only keys that "
                              f"the schema knows (seg/config/schema.py)")
    for name in known:
        if name not in node or OmegaConf.is_missing(node, name):
            raise ConfigError(f"{prefix}{name} is missing (removed with ~{prefix}{name}?): every run needs it; "
                              f"leave it in, or give another value with {prefix}{name}=<value>")
    for name in known:
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]: X, when a value is given
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if dataclasses.is_dataclass(kind):
            value = node[name]  # a group: its leaves are not resolved here
            if value is not None and hasattr(value, "keys"):
                check_node(kind, value, f"{prefix}{name}.")
