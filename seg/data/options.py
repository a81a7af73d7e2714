"""The data package's own options: every ``data.`` value range-checked before anything is read.

``check_options(data_cfg)`` raises ``DataError`` with one line naming the key and what is allowed;
``seg.training.checks.validate`` calls it at the start of every run (and of ``seg-prepare-data``), so a
value that would mean nothing (``data.max_patients=-1``, ``data.spacing=-1``, percentiles in the
wrong order) or would fail deep inside a later step (``data.val_fraction=1.0``, a leftover
``data.phantom.*`` override on a real dataset) never starts a run. Checks that need the file system
(the phantom's folder, the split file's contents) happen when the data is loaded, a moment later.
"""

from __future__ import annotations

import math

from .augmentations import check_augment
from .formats import READERS
from .nnunet import compile_patient_regex
from .readers import ON_ERROR
from .slices import TASKS
from .splits import split_mode
from .volumes import LABELS, DataError

NORMALIZE = ("zscore", "none")
CACHE_DTYPES = ("float32", "float16")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_options(data) -> None:
    """Refuse, naming the key, any ``data.`` value outside its range; ``data`` is the run's ``data`` node."""
    get = data.get
    for key, allowed in (("format", tuple(READERS)), ("task", tuple(TASKS)), ("normalize", NORMALIZE),
                         ("on_error", ON_ERROR), ("cache_dtype", CACHE_DTYPES)):
        if get(key) not in allowed:
            raise DataError(f"data.{key}={get(key)!r} is not valid; choose one of: {', '.join(allowed)}")
    if not str(get("root") or "").strip():
        raise DataError("data.root is empty; set it to the dataset's folder")
    if not is_int(get("image_size")) or get("image_size") < 1:
        raise DataError(f"data.image_size must be at least 1, got {get('image_size')}")
    spacing = get("spacing")
    if spacing is not None and (not is_number(spacing) or spacing <= 0):
        raise DataError(f"data.spacing={spacing} must be a positive size in mm (null: keep each image's own spacing)")
    check_percentiles(get("clip_percentiles"))
    for key in ("val_fraction", "test_fraction"):
        value = get(key)
        if not is_number(value) or not 0 <= value < 1:
            raise DataError(f"data.{key}={value} must be at least 0 and below 1 (a fraction of the patients)")
    if get("val_fraction") + get("test_fraction") >= 1:
        raise DataError(f"data.val_fraction + data.test_fraction = {get('val_fraction') + get('test_fraction'):g} "
                        f"leaves no patient to train on; their sum must be below 1")
    for key in ("max_patients", "max_slices_per_volume"):
        value = get(key)
        if value is not None and (not is_int(value) or value < 1):
            raise DataError(f"data.{key}={value} must be at least 1 (null: all)")
    shuffle_buffer = get("shuffle_buffer")
    if shuffle_buffer is not None and (not is_int(shuffle_buffer) or shuffle_buffer < 1):
        raise DataError(f"data.shuffle_buffer must be at least 1 (null: a full permutation), got {shuffle_buffer}")
    split_seed = get("split_seed")
    if split_seed is not None and (not is_int(split_seed) or not 0 <= split_seed < 2 ** 32):
        raise DataError(f"data.split_seed={split_seed} must be between 0 and 2**32-1 (null: the run's seed)")
    check_phantom(data)
    check_split(data)
    check_augment(get("augment"))
    for name, target in (get("label_map") or {}).items():
        if target not in LABELS:
            raise DataError(f"data.label_map: {name} -> {target!r} is not valid; choose one of: {', '.join(LABELS)}")
    regex = get("patient_regex")
    if regex:
        if get("format") != "nnunet":
            raise DataError(f"data.patient_regex applies to data.format=nnunet (case ids grouped into patients); "
                            f"data.format={get('format')} names its patients itself: remove it")
        compile_patient_regex(str(regex))
    if not str(get("domain_key") or "").strip():
        raise DataError("data.domain_key is empty; it names the case field that is the domain (e.g. vendor)")


def check_percentiles(value) -> None:
    """``data.clip_percentiles``: [low, high] with 0 <= low < high <= 100, or null / [] for no clipping."""
    if value is None or len(value) == 0:
        return
    if len(value) != 2 or not all(is_number(v) for v in value):
        raise DataError(f"data.clip_percentiles={list(value)} must be two numbers [low, high] (null: no clipping)")
    low, high = value
    if not 0 <= low < high <= 100:
        raise DataError(f"data.clip_percentiles=[{low:g}, {high:g}] must satisfy 0 <= low < high <= 100 "
                        f"(with low >= high every image would be constant)")


def check_phantom(data) -> None:
    """``data.phantom``: its sizes when it generates the phantom; no leftover override when it does not."""
    phantom = data.get("phantom")
    if phantom is None:
        return
    if phantom.get("generate"):
        number, seed = phantom.get("num_patients"), phantom.get("seed")
        if not is_int(number) or number < 1:
            raise DataError(f"data.phantom.num_patients={number} must be at least 1")
        if not is_int(seed) or seed < 0:
            raise DataError(f"data.phantom.seed={seed} must be a non-negative integer")
        return
    for key in ("num_patients", "seed"):
        if phantom.get(key) is not None:
            raise DataError(f"data.phantom.{key}={phantom.get(key)} is set, but data={data.get('name')} reads "
                            f"{data.get('root')}: data.phantom.* applies to the built-in phantom (data=phantom) "
                            f"only; remove the override")


def check_split(data) -> None:
    """One way of splitting at a time, a fold inside the folds."""
    split_mode(data)
    folds = data.get("num_folds")
    if not is_int(folds) or folds < 2:
        raise DataError(f"data.num_folds must be at least 2, got {folds}")
    fold = data.get("fold")
    if fold is not None and not data.get("split_file") and (not is_int(fold) or not 0 <= fold < folds):
        raise DataError(f"data.fold={fold} must be between 0 and data.num_folds-1 = {folds - 1}")
    if data.get("split_file") is not None and not str(data.get("split_file")).strip():
        raise DataError("data.split_file is empty; give a file or null")
