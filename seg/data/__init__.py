"""Datasets: read volumes from disk, preprocess them (once, cached) and split them by patient.

``load_splits(data_cfg, seed)`` is the whole path from a folder to the train/val/test
``SliceSet``s: the built-in phantom is generated first if its folder is empty; the format's
reader finds the patients (``formats.READERS``); the prepared volumes come from the cache or are
read and preprocessed (``cache.prepare_dataset``), and one line per subset of the release says
how many patients were read, skipped as unlabeled and skipped as bad; the split assigns patients
(``splits``); the task picks and maps the labels (``slices.make_slice_set``). ``check_options``
range-checks every ``data.`` value before any of this (``seg.training.checks.validate`` calls it).
It imports seg.config and seg.runtime only.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ..config.schema import DataConfig
from ..runtime.temporaries import remove_stale
from .cache import Prepared, clear_cache, prepare_dataset
from .formats import READERS, reader_options
from .options import check_options
from .phantom import generate_phantom
from .readers import ON_ERROR, iter_volumes, warn
from .slices import TASKS, SliceSet, class_names, make_slice_set, split_patients, task_annotation_mask
from .splits import SPLIT_NAMES, assign_splits, split_mode
from .volumes import LABELS, DataError, Volume, annotation_bit

__all__ = ["LABELS", "ON_ERROR", "READERS", "TASKS", "DataError", "SliceSet", "Splits", "Volume", "check_options",
           "class_names", "clear_cache", "ensure_phantom", "load_splits", "load_volumes", "prepare", "split_mode",
           "split_patients", "with_defaults"]


class Splits(dict):
    """{"train", "val", "test"} -> SliceSet, and what a run records about how they were made."""

    def __init__(self, sets: dict[str, SliceSet], *, split: dict, skipped: list[dict], cache: dict,
                 summary: list[dict] | None = None):
        super().__init__(sets)
        self.split, self.skipped, self.cache, self.summary = split, skipped, cache, summary or []

    def record(self) -> dict:
        """For metrics.json: the split (mode, seed, patients per split), cases skipped as bad, the cache used,
        and per subset of the release the patients read, skipped as unlabeled and skipped as bad."""
        return {"split": self.split, "skipped_cases": self.skipped, "data_cache": self.cache,
                "data_summary": self.summary}


def with_defaults(data_cfg):
    """``data_cfg`` over the schema's defaults (so a partial config, e.g. in a test, has every key)."""
    if OmegaConf.is_config(data_cfg):  # resolve ${paths.data_dir} etc. while the node still has its parents
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    return OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)


def ensure_phantom(root: Path, num_patients: int, seed: int, progress: bool = True) -> None:
    """Generate the built-in phantom at ``root`` unless a complete one is there already.

    Temporaries of generators that died (SIGTERM, SIGKILL) are removed first; one of a generator
    still running beside this one is left alone. A data folder that cannot hold the phantom (a
    file in the way, no permission) is a ``DataError`` naming ``paths.data_dir``.
    """
    if (root / "phantom.json").is_file():
        return
    where = f"paths.data_dir={root.parent}"
    blocker = next((p for p in (root.parent, *root.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DataError(f"{where}: {blocker} is a file, not a folder; set paths.data_dir to a folder where the "
                        f"built-in phantom can be generated")
    if root.parent.is_dir():
        remove_stale(root.parent)  # of any phantom configuration: a killed n40 run's folder goes when n100 starts
    print(f"Generating the built-in phantom ({num_patients} patients, seed {seed}) in {root} (once)")
    try:
        generate_phantom(root, num_patients=num_patients, seed=seed, progress=progress)
    except OSError as err:
        detail = err.strerror or str(err)
        raise DataError(f"{where}: cannot generate the built-in phantom in {root} ({type(err).__name__}: "
                        f"{detail}); set paths.data_dir to a writable folder") from None


def dataset_root(data_cfg, progress: bool = True) -> Path:
    """The configured data folder, the phantom generated there first when configured."""
    root = Path(data_cfg.root).expanduser()
    phantom = data_cfg.get("phantom")
    if phantom is not None and phantom.get("generate"):
        ensure_phantom(root, phantom.num_patients, phantom.seed, progress)
    return root


def prepare(data_cfg, progress: bool = True) -> Prepared:
    """The configured dataset's prepared volumes (from its cache, or read, preprocessed and cached).

    Prints one line per subset of the release: patients read, skipped as unlabeled, skipped as bad.
    """
    cfg = with_defaults(data_cfg)
    prepared = prepare_dataset(cfg, dataset_root(cfg, progress), progress)
    for line in prepared.summary_lines():
        print(line)
    return prepared


def load_volumes(data_cfg, progress: bool = True) -> list[Volume]:
    """Every raw volume of the configured dataset via its reader (no preprocessing, no cache)."""
    cfg = with_defaults(data_cfg)
    patients = READERS[str(cfg.format)](dataset_root(cfg, progress), **reader_options(cfg))
    labelled = [patient for patient in patients if not patient.unlabeled]
    return list(iter_volumes(labelled[: cfg.max_patients], on_error=str(cfg.on_error), progress=progress))


def load_splits(data_cfg, seed: int, progress: bool = True) -> Splits:
    """Prepare (or load from cache), split by patient and map to the task: {"train", "val", "test"} -> SliceSet."""
    cfg = with_defaults(data_cfg)
    prepared = prepare(cfg, progress)
    task = str(cfg.task)
    check_task_is_annotated(prepared, task, str(cfg.format))
    by_split, record = assign_splits([v.case for v in prepared.volumes], cfg, seed, prepared.patients)
    sets = {}
    check_training_classes(prepared, set(by_split["train"]), task)
    for name in SPLIT_NAMES:
        members = set(by_split[name])
        volumes = [v for v in prepared.volumes if v.case["case"] in members]
        if not volumes:
            continue
        try:
            sets[name] = make_slice_set(volumes, task=task, max_slices_per_volume=cfg.max_slices_per_volume)
        except DataError:
            if name != "val":
                raise DataError(f"no {name} slice is annotated for task {task!r}") from None
            warn(f"no validation slice is annotated for task {task!r}; training without validation")
    return Splits(sets, split=record, skipped=prepared.skipped, cache=prepared.record(), summary=prepared.summary)


def check_training_classes(prepared: Prepared, training_cases: set[str], task: str) -> None:
    """Refuse a task one of whose classes no training slice contains (the run could learn nothing of it)."""
    needed = task_annotation_mask(task)
    present = set()
    for volume in prepared.volumes:
        if volume.case["case"] in training_cases:
            usable = (volume.annotated & needed) == needed
            present |= set(volume.label[usable].unique().tolist())
    missing = [name for name, value in zip(class_names(task), TASKS[task]) if value not in present]
    if missing:
        raise DataError(f"data.task={task}: no training slice contains class {' or '.join(missing)}")


def check_task_is_annotated(prepared: Prepared, task: str, data_format: str) -> None:
    """Refuse a task whose structures this dataset never delineates (e.g. the RV in Sunnybrook)."""
    needed = task_annotation_mask(task)
    if any(((v.annotated & needed) == needed).any() for v in prepared.volumes):
        return
    drawn = 0
    for volume in prepared.volumes:
        for bits in volume.annotated.unique().tolist():
            drawn |= bits
    names = [name for name, value in LABELS.items() if value and drawn & annotation_bit(value)]
    usable = [t for t in TASKS if not task_annotation_mask(t) & ~drawn]
    raise DataError(f"data.task={task}: no slice of this {data_format} data is annotated for it (it delineates "
                    f"{', '.join(names) or 'nothing'}); use data.task={' or '.join(usable) or '?'}")
