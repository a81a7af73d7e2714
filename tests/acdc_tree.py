"""Write small ACDC-layout trees of real NIfTI files for the tests (no phantom needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def disk_labels(shape, center, rv_radius, myo_radius, lv_radius):
    """A label slice: LV disk (3) in a myocardium ring (2), RV disk (1) beside it."""
    x, y = np.mgrid[: shape[0], : shape[1]]
    cx, cy = center
    label = np.zeros(shape, np.uint8)
    r = np.hypot(x - cx, y - cy)
    label[np.hypot(x - cx, y - cy - myo_radius - rv_radius + 2) < rv_radius] = 1
    label[r < myo_radius] = 2
    label[r < lv_radius] = 3
    return label


def write_volume(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 8.0), dtype=np.float32) -> None:
    affine = np.diag([*spacing, 1.0])
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.header.set_zooms(spacing[: array.ndim] if array.ndim <= 3 else (*spacing, 1.0))
    nib.save(image, str(path))


def make_acdc_tree(root: Path, num_patients: int = 3, shape=(48, 40, 4), spacing=(1.5, 1.5, 8.0),
                   seed: int = 0) -> Path:
    """ACDC layout under root/database/training: Info.cfg, ED/ES frames, their _gt, and a _4d file."""
    rng = np.random.default_rng(seed)
    for p in range(1, num_patients + 1):
        folder = root / "database" / "training" / f"patient{p:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        ed, es = 1, 5 + p
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n")
        frames = {}
        for frame, scale in ((ed, 1.0), (es, 0.8)):
            label = np.stack([disk_labels(shape[:2], (shape[0] / 2 + rng.integers(-3, 4), shape[1] / 2),
                                          rv_radius=6 * scale, myo_radius=9, lv_radius=6 * scale * (1 - 0.1 * s))
                              for s in range(shape[2])], axis=-1)
            image = 100 + 300 * (label == 1) + 80 * (label == 2) + 300 * (label == 3) + rng.normal(0, 10, shape)
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", image, spacing)
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", label, spacing, np.uint8)
            frames[frame] = image
        write_volume(folder / f"patient{p:03d}_4d.nii.gz", np.stack([frames[ed], frames[es]], -1), spacing)
    return root


def make_acdc_2017_tree(root: Path, num_training: int = 4, num_testing: int = 2, shape=(32, 28, 3),
                        seed: int = 0) -> Path:
    """The 2017 release as downloaded: ``root/ACDC/training/patient001...`` (labelled) and
    ``root/ACDC/testing/testing/patient101...`` whose folders hold Info.cfg, the ED/ES frames and the 4D cine
    but **no** ``_gt`` files. Returns ``root/ACDC``."""
    acdc = root / "ACDC"
    make_acdc_tree(root / "tmp-training", num_patients=num_training, shape=shape, seed=seed)
    (acdc / "training").parent.mkdir(parents=True, exist_ok=True)
    (root / "tmp-training" / "database" / "training").rename(acdc / "training")
    for folder in (root / "tmp-training" / "database", root / "tmp-training"):
        folder.rmdir()
    make_acdc_tree(root / "tmp-testing", num_patients=num_testing, shape=shape, seed=seed + 1)
    testing = acdc / "testing" / "testing"
    testing.mkdir(parents=True)
    for number, folder in enumerate(sorted((root / "tmp-testing" / "database" / "training").iterdir()), start=101):
        name = f"patient{number:03d}"
        target = testing / name
        target.mkdir()
        for path in folder.iterdir():
            if path.name.endswith("_gt.nii.gz"):
                path.unlink()  # the 2017 testing set has no ground truth
                continue
            path.rename(target / path.name.replace(folder.name, name))
        folder.rmdir()
    for folder in (root / "tmp-testing" / "database" / "training", root / "tmp-testing" / "database",
                   root / "tmp-testing"):
        folder.rmdir()
    return acdc
