"""Reader for the ACDC layout (MICCAI 2017 challenge), real or the built-in phantom.

    <root>/.../patient001/Info.cfg
    <root>/.../patient001/patient001_frame01.nii.gz     (ED, the frame number from Info.cfg)
    <root>/.../patient001/patient001_frame01_gt.nii.gz
    <root>/.../patient001/patient001_frame12.nii.gz     (ES) and its _gt
    <root>/.../patient001/patient001_4d.nii.gz          (the whole cine: ignored)

``root`` may be ACDC's top folder, ``database`` or ``database/training``: patient folders are
found anywhere below it. Labels are ACDC's: 0 background, 1 RV, 2 myocardium, 3 LV -- the
project's own label set, so no mapping is needed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .readers import Patient, read_all, read_text
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
    """Patient folders (those holding an Info.cfg) below ``root``, sorted by name."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    folders = sorted({cfg.parent for cfg in root.rglob("Info.cfg")}, key=lambda p: p.name)
    if not folders:
        raise DataError(f"{root}: no patient folders found (expected the {EXPECTED_LAYOUT})")
    return folders


def find_patients(root: str | Path) -> list[Patient]:
    """The ACDC reader: every patient folder below ``root``, to be read by ``read_patient``."""
    return [Patient(folder.name, partial(read_patient, folder)) for folder in find_patient_folders(Path(root))]


def read_patient(folder: Path) -> list[Volume]:
    """The ED and ES volumes of one patient folder."""
    info = read_info(folder / "Info.cfg")
    meta = {key.lower(): value for key, value in info.items() if key not in ("ED", "ES")}
    allowed = set(LABELS.values())
    volumes = []
    for phase in ("ED", "ES"):
        stem = f"{folder.name}_frame{int(info[phase]):02d}"
        image_path, label_path = folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"
        image, spacing, affine = read_nifti(image_path)
        label, _, label_affine = read_nifti(label_path)
        label = check_pair(image_path, label_path, image, label, affine, label_affine, allowed)
        volumes.append(Volume(image=slices_first(image), label=slices_first(label), spacing=spacing,
                              patient=folder.name, phase=phase, meta=meta, affine=affine, source=str(image_path)))
    return volumes


def read_acdc(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Read the ED and ES frames of every patient below ``root`` as ``Volume`` records."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)
