"""What every dataset reader produces: ``Volume`` records, and careful NIfTI reading.

A reader turns a dataset folder into a list of ``Volume``: one short-axis stack (slices first),
its label map in the project's label set, spacing, patient id and metadata. Everything after
the reader is format-agnostic. Problems with a file raise ``DataError`` naming the file and the
problem, never a traceback from deep inside numpy and never a silently wrong mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The project's label set (ACDC's): readers map each dataset's own values to these.
LABELS = {"background": 0, "rv": 1, "myo": 2, "lv": 3}


def annotation_bit(value: int) -> int:
    """The bit of foreground label ``value`` (1, 2, 3) in a slice's annotation mask."""
    return 1 << (value - 1)


# A slice whose rv, myo and lv were all delineated (an unmarked pixel is truly background).
ALL_ANNOTATED = sum(annotation_bit(v) for v in LABELS.values() if v)


class DataError(Exception):
    """A dataset file or folder that cannot be used; the message names it and says why."""


@dataclass
class Volume:
    """One 3D short-axis stack with its ground truth.

    image: (S, X, Y) float32, slices first (the NIfTI's x, y axes kept in order);
    label: (S, X, Y) uint8 in the project's label set ``LABELS``;
    spacing: (x, y, slice) in mm; affine: the NIfTI's 4x4 (to write predictions back).
    annotated: (S,) uint8 bit masks (``annotation_bit``) of the labels delineated on each slice,
    for datasets whose experts drew only some structures on some slices (Sunnybrook draws the
    epicardium on some slices only); None means every label on every slice.
    case_id: the dataset's own name of this volume when it is not ``<patient>_<phase>`` (nnU-Net's
    ``A0S9V9_0000_A_1``), so that split files naming it still find it.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    patient: str
    phase: str = ""
    meta: dict = field(default_factory=dict)
    affine: np.ndarray | None = None
    source: str = ""
    annotated: np.ndarray | None = None
    case_id: str = ""

    @property
    def case(self) -> str:
        """A unique name of the volume: the dataset's own, else patient and phase."""
        if self.case_id:
            return self.case_id
        return f"{self.patient}_{self.phase}" if self.phase else self.patient

    def check(self) -> None:
        """Refuse a volume that no reader should have produced (naming its source file)."""
        where = self.source or self.case
        if self.image.ndim != 3 or self.image.shape != self.label.shape:
            raise DataError(f"{where}: image {self.image.shape} and label {self.label.shape} are not one 3D stack")
        if min(self.image.shape) < 1:
            raise DataError(f"{where}: empty volume of shape {self.image.shape}")
        if not np.isfinite(self.image).all():
            raise DataError(f"{where}: contains NaN or infinite voxel(s)")
        if len(self.spacing) < 2 or not all(np.isfinite(s) and s > 0 for s in self.spacing[:2]):
            raise DataError(f"{where}: voxel spacing {tuple(self.spacing)} is not positive")
        if self.label.dtype != np.uint8 or int(self.label.max()) > max(LABELS.values()):
            raise DataError(f"{where}: label map is not in the project's label set {sorted(LABELS.values())}")
        if self.annotated is not None and self.annotated.shape != (self.image.shape[0],):
            raise DataError(f"{where}: annotation mask of shape {self.annotated.shape} for "
                            f"{self.image.shape[0]} slices")

    def annotation(self) -> np.ndarray:
        """(S,) uint8: the labels delineated on each slice (all of them unless the reader said otherwise)."""
        if self.annotated is None:
            return np.full(self.image.shape[0], ALL_ANNOTATED, np.uint8)
        return self.annotated


def read_nifti(path: str | os.PathLike, *, ndim: int = 3) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Read a NIfTI file as float32; returns (array, voxel spacing, affine).

    Refuses, naming the file: a missing, truncated or non-NIfTI file, a wrong number of
    dimensions (e.g. 4D where 3D is expected), and NaN or infinite voxels.
    """
    import nibabel as nib  # imported here: only readers of NIfTI pay for it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel/gzip/zlib raise many types for a bad file
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if data.ndim == ndim + 1 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}D volume, found {data.ndim}D data of shape {data.shape}")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: contains {bad} NaN or infinite voxel(s)")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:ndim])
    return data, spacing, np.asarray(img.affine, dtype=np.float64)


def check_pair(image_path: Path, label_path: Path, image: np.ndarray, label: np.ndarray,
               image_affine: np.ndarray, label_affine: np.ndarray, allowed: set[int]) -> np.ndarray:
    """Check an image/label pair agrees and the label only holds ``allowed`` values; return uint8 labels."""
    if image.shape != label.shape:
        raise DataError(f"{label_path}: label shape {label.shape} does not match image {image_path.name} "
                        f"shape {image.shape}")
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise DataError(f"{label_path}: affine differs from that of image {image_path.name} "
                        f"(the mask would not lie on the image)")
    if not np.array_equal(label, np.round(label)):
        raise DataError(f"{label_path}: label map holds non-integer values")
    values = set(np.unique(label).astype(int).tolist())
    if not values <= allowed:
        raise DataError(f"{label_path}: label values {sorted(values - allowed)} are outside this dataset's "
                        f"set {sorted(allowed)}")
    return label.astype(np.uint8)


def slices_first(array: np.ndarray) -> np.ndarray:
    """(X, Y, S) as stored in NIfTI -> (S, X, Y), contiguous."""
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))


def map_labels(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """A dataset's label values -> the project's, by lookup table (values already checked by ``check_pair``)."""
    table = np.zeros(max(mapping) + 1, np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table[label]


# ---------------------------------------------------------------------------- file names

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_label_file(path: Path) -> bool:
    """A ground-truth file by its name (ACDC/M&Ms ``_gt``)."""
    return case_name(path).endswith("_gt")


def case_name(path: Path) -> str:
    """The file name without its NIfTI suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
