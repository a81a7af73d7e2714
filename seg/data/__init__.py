"""Datasets: read volumes from disk, preprocess them and split them by patient.

``load_splits(data_cfg, seed)`` is the whole path from a folder to the train/val/test
``SliceSet``s; the built-in phantom is generated first if its folder is empty.
"""

from __future__ import annotations

from pathlib import Path

from .acdc import read_acdc
from .slices import TASKS, SliceSet, class_names, make_slice_set, split_patients
from .volumes import LABELS, DataError, Volume

READERS = {"acdc": read_acdc}

__all__ = ["LABELS", "READERS", "TASKS", "DataError", "SliceSet", "Volume", "class_names", "ensure_phantom",
           "load_splits", "load_volumes"]


def ensure_phantom(root: Path, num_patients: int, seed: int, progress: bool = True) -> None:
    """Generate the built-in phantom at ``root`` unless a complete one is there already."""
    if (root / "phantom.json").is_file():
        return
    from .phantom import generate_phantom

    print(f"Generating the built-in phantom ({num_patients} patients, seed {seed}) in {root} (once)")
    generate_phantom(root, num_patients=num_patients, seed=seed, progress=progress)


def load_volumes(data_cfg, progress: bool = True) -> list[Volume]:
    """Every volume of the configured dataset, via the reader of its format."""
    root = Path(data_cfg.root).expanduser()
    if data_cfg.phantom is not None:
        ensure_phantom(root, data_cfg.phantom.num_patients, data_cfg.phantom.seed, progress)
    reader = READERS[str(data_cfg.format)]
    return reader(root, max_patients=data_cfg.max_patients, progress=progress)


def load_splits(data_cfg, seed: int, progress: bool = True) -> dict[str, SliceSet]:
    """Read, split by patient and preprocess: {"train", "val", "test"} -> SliceSet."""
    volumes = load_volumes(data_cfg, progress)
    split = split_patients([v.patient for v in volumes], seed=seed, val_fraction=data_cfg.val_fraction,
                           test_fraction=data_cfg.test_fraction)
    preprocessing = dict(task=str(data_cfg.task), image_size=data_cfg.image_size, spacing=data_cfg.spacing,
                         clip_percentiles=list(data_cfg.clip_percentiles or []), normalize=str(data_cfg.normalize),
                         max_slices_per_volume=data_cfg.max_slices_per_volume)
    return {name: make_slice_set([v for v in volumes if v.patient in set(patients)], **preprocessing)
            for name, patients in split.items() if patients}
