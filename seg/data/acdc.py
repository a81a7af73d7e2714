"""Reader for the ACDC layout (MICCAI 2017 challenge), real or the built-in phantom.

    <root>/.../patient001/Info.cfg
    <root>/.../patient001/patient001_frame01.nii.gz     (ED, the frame number from Info.cfg)
    <root>/.../patient001/patient001_frame01_gt.nii.gz
    <root>/.../patient001/patient001_frame12.nii.gz     (ES) and its _gt
    <root>/.../patient001/patient001_4d.nii.gz          (the whole cine: ignored)

``root`` may be ACDC's top folder, ``database`` or ``database/training``: patient folders are
found anywhere below it. Labels are ACDC's: 0 background, 1 RV, 2 myocardium, 3 LV -- the
project's own label set, so no mapping is needed.

Both releases are read: the current one (``database/training``, ``database/testing``, all with
``_gt``) and the 2017 one (``ACDC/training``, ``ACDC/testing/testing``), whose testing patients
have Info.cfg and images but no ``_gt`` file: a folder without any ``_gt`` is unlabeled (counted,
not read); a folder with one of its two ``_gt`` files is an error. A patient folder (one holding
``<folder>_frameNN.nii.gz`` or ``<folder>_4d.nii.gz``) without Info.cfg is an error too: it is
never left out without a word.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from .readers import Patient, read_all, read_text, some_labelled, subset_name
from .volumes import LABELS, DataError, Volume, check_pair, read_nifti, slices_first

EXPECTED_LAYOUT = ("ACDC layout: patientXXX/ folders each with Info.cfg (ED:, ES: lines) and "
                   "patientXXX_frameYY.nii.gz + patientXXX_frameYY_gt.nii.gz for the ED and ES frames")


def read_info(path: Path) -> dict[str, str]:
    """Parse an ``Info.cfg`` (``key: value`` lines)."""
    info = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DataError(f"{path}: line {number} is not 'key: value': {line!r}")
        info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise DataError(f"{path}: missing or non-integer {key} frame (found {info.get(key)!r})")
    return info


def find_patient_folders(root: Path) -> list[Path]:
    """Patient folders below ``root`` -- those holding an Info.cfg or the patient's own NIfTI files -- by name."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    folders = {cfg.parent for cfg in root.rglob("Info.cfg")}
    for image in root.rglob("*.nii.gz"):
        if re.fullmatch(rf"{re.escape(image.parent.name)}_(frame\d+(_gt)?|4d)\.nii\.gz", image.name):
            folders.add(image.parent)
    if not folders:
        raise DataError(f"{root}: no patient folders found (expected the {EXPECTED_LAYOUT})")
    return sorted(folders, key=lambda p: p.name)


def find_patients(root: str | Path) -> list[Patient]:
    """The ACDC reader: every patient folder below ``root`` (those without ground truth as unlabeled)."""
    root = Path(root)
    patients = []
    for folder in find_patient_folders(root):
        subset = subset_name(root, folder.parent)
        if (folder / "Info.cfg").is_file() and not any(folder.glob("*_gt.nii.gz")):
            patients.append(Patient(folder.name, subset=subset, unlabeled="no _gt files: ACDC 2017's testing set "
                                                                           "has no ground truth"))
        else:
            patients.append(Patient(folder.name, partial(read_patient, folder), subset=subset))
    return some_labelled(patients, root, "training folder")


def read_patient(folder: Path) -> list[Volume]:
    """The ED and ES volumes of one patient folder."""
    if not (folder / "Info.cfg").is_file():
        raise DataError(f"{folder}: no Info.cfg (it names the ED and ES frames); restore it, or set "
                        f"data.on_error=skip to leave this patient out")
    info = read_info(folder / "Info.cfg")
    meta = {key.lower(): value for key, value in info.items() if key not in ("ED", "ES")}
    allowed = set(LABELS.values())
    stems = {phase: f"{folder.name}_frame{int(info[phase]):02d}" for phase in ("ED", "ES")}
    has_truth = {phase: (folder / f"{stem}_gt.nii.gz").is_file() for phase, stem in stems.items()}
    volumes = []
    for phase, stem in stems.items():
        image_path, label_path = folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"
        if not has_truth[phase] and any(has_truth.values()):
            raise DataError(f"{label_path}: file not found ({folder.name} has ground truth for one of its two "
                            f"frames)")
        image, spacing, affine = read_nifti(image_path)
        label, _, label_affine = read_nifti(label_path)
        label = check_pair(image_path, label_path, image, label, affine, label_affine, allowed)
        volumes.append(Volume(image=slices_first(image), label=slices_first(label), spacing=spacing,
                              patient=folder.name, phase=phase, meta=meta, affine=affine, source=str(image_path)))
    return volumes


def read_acdc(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Read the ED and ES frames of every patient below ``root`` as ``Volume`` records."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)
