"""Voxel orientation: which world direction each array axis of a NIfTI volume runs along.

The readers hand the network the arrays as stored, so a model learns the orientation its training
files had: the slice axis last and the in-plane axes in their stored directions. A volume stored
otherwise (slice axis first, one axis reversed, x and y swapped) is the same image in another voxel
order, told apart only by its affine. ``to_orientation`` puts such a volume into a given orientation
and ``from_orientation`` brings an array computed there back onto the volume's own grid.

Orientations are written as nibabel's axis codes (``nibabel.aff2axcodes``): one letter per array
axis, the world direction it points to -- L/R, P/A, I/S -- e.g. ``RAS`` or ``LPS``. Nearly oblique
axes get the code of the world axis closest to them (``nibabel.orientations.io_orientation``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def valid_axis_codes(codes: str) -> bool:
    """Three letters, one from each of L/R, P/A, I/S."""
    if len(codes) != 3:
        return False
    pairs = [next((pair for pair in PAIRS if letter in pair), None) for letter in codes]
    return None not in pairs and len(set(pairs)) == 3


def axis_codes(affine: np.ndarray) -> str:
    """The axis codes of a voxel-to-world affine, e.g. ``RAS``."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


def transform(affine: np.ndarray, codes: str) -> np.ndarray:
    """nibabel's orientation transform from the array of ``affine`` to the orientation ``codes``."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)), axcodes2ornt(tuple(codes)))


def to_orientation(array: np.ndarray, affine: np.ndarray, spacing, codes: str
                   ) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(array, voxel spacing, affine) of a 3D volume reordered into the orientation ``codes``.

    Only the voxel order changes (axes permuted and reversed), never a value: the result is the same
    image, its affine keeping every voxel at its place in the world.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    ornt = transform(affine, codes)
    moved = np.ascontiguousarray(apply_orientation(array, ornt))
    moved_spacing = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        moved_spacing[int(target)] = float(spacing[axis])
    moved_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, array.shape)
    return moved, tuple(moved_spacing), moved_affine


def from_orientation(array: np.ndarray, affine: np.ndarray, codes: str) -> np.ndarray:
    """An array computed in the orientation ``codes`` (by ``to_orientation(..., affine, ...)``) back in
    the voxel order of the volume whose affine is ``affine``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    ornt = ornt_transform(axcodes2ornt(tuple(codes)), io_orientation(np.asarray(affine, dtype=np.float64)))
    return np.ascontiguousarray(apply_orientation(array, ornt))


def orientation_of_files(root: str | os.PathLike, limit: int = 200) -> Counter | None:
    """{axis codes: count} over the NIfTI files below ``root`` (headers only; at most ``limit`` files,
    in sorted order), or None when ``root`` holds none or cannot be read."""
    import nibabel as nib

    root = Path(root).expanduser()
    if not root.is_dir():
        return None
    try:
        files = sorted(p for p in root.rglob("*") if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    except OSError:
        return None
    counts: Counter = Counter()
    for path in files[:limit]:
        try:
            counts[axis_codes(nib.load(str(path)).affine)] += 1
        except Exception:  # an unreadable file says nothing about the orientation; the readers report it
            continue
    return counts or None
