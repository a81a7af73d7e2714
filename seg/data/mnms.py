"""Reader for the M&Ms challenges: M&Ms-1 (MICCAI 2020) and M&Ms-2 (STACOM 2021), told apart by their files.

M&Ms-1 (the ``OpenDataset`` folder):

    <root>/Training/Labeled/A0S9V9/A0S9V9_sa.nii.gz       4D cine, H x W x slices x time
    <root>/Training/Labeled/A0S9V9/A0S9V9_sa_gt.nii.gz    4D, labelled at the ED and ES frames only
    <root>/Validation/..., <root>/Testing/...              same per-case folders (read too when labelled)
    <root>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
        columns ``External code``, ``ED``, ``ES`` (0-based time indices), ``Vendor`` (A-D), ``Centre``

M&Ms-2 (the ``MnM2`` folder):

    <root>/dataset/001/001_SA_ED.nii.gz, 001_SA_ED_gt.nii.gz, 001_SA_ES.nii.gz, 001_SA_ES_gt.nii.gz
    (the long-axis ``_LA_`` files are not used), <root>/dataset_information.csv (``SUBJECT_CODE``,
    ``VENDOR``, ``DISEASE``, ...; optional here)

**Both label the LV first**: 1 LV cavity, 2 LV myocardium, 3 RV -- the reverse of ACDC. They are
mapped to the project's set (1 RV, 2 MYO, 3 LV) here, so nothing downstream knows the difference.
Unlabelled cases (``Training/Unlabeled``, no ``_gt`` file) are not listed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .readers import Patient, read_all, read_table, table_columns
from .volumes import LABELS, DataError, Volume, check_pair, map_labels, read_nifti, slices_first

# M&Ms value -> project value
MNMS_TO_PROJECT = {0: LABELS["background"], 1: LABELS["lv"], 2: LABELS["myo"], 3: LABELS["rv"]}

EXPECTED_LAYOUT = ("M&Ms-1 layout (<code>/<code>_sa.nii.gz + <code>_sa_gt.nii.gz and the dataset information "
                   "CSV with columns External code, ED, ES, Vendor, Centre) or M&Ms-2 layout "
                   "(<nnn>/<nnn>_SA_ED.nii.gz, _SA_ED_gt, _SA_ES, _SA_ES_gt)")
MNMS1_COLUMNS = ("External code", "ED", "ES")
MNMS2_ID_COLUMN = "SUBJECT_CODE"
SUBSETS = {"training": "training", "validation": "validation", "testing": "testing"}


def find_patients(root: str | Path) -> list[Patient]:
    """The M&Ms reader: every labelled case below ``root``, M&Ms-1 or M&Ms-2 detected from the file names."""
    root = Path(root).resolve()  # absolute: the CSV may lie in a folder above it
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    mnms1 = sorted(root.rglob("*_sa_gt.nii.gz"))
    mnms2 = sorted(root.rglob("*_SA_ED_gt.nii.gz"))
    if mnms1 and mnms2:
        raise DataError(f"{root}: holds both M&Ms-1 (*_sa_gt.nii.gz) and M&Ms-2 (*_SA_ED_gt.nii.gz) cases; "
                        f"point data.root at one of the two datasets")
    if mnms1:
        return find_mnms1(root, mnms1)
    if mnms2:
        return find_mnms2(root, mnms2)
    raise DataError(f"{root}: no labelled M&Ms case found (expected the {EXPECTED_LAYOUT})")


def read_mnms(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every labelled M&Ms case below ``root`` as ED and ES ``Volume``s (the first bad file raises)."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)


# ---------------------------------------------------------------------------- M&Ms-1


def find_mnms1(root: Path, label_files: list[Path]) -> list[Patient]:
    rows, tables = case_table(root)
    patients = []
    for label_path in label_files:
        code = label_path.name[: -len("_sa_gt.nii.gz")]
        image_path = label_path.with_name(f"{code}_sa.nii.gz")
        patients.append(Patient(code, partial(read_mnms1_case, code, image_path, label_path, rows.get(code),
                                              tables, subset_of(root, label_path))))
    return sorted(patients, key=lambda p: p.id)


def case_table(root: Path) -> tuple[dict[str, dict], list[Path]]:
    """The M&Ms-1 information CSV(s) in or above ``root``: {External code: row} and the files read.

    The CSV sits in ``OpenDataset/`` while ``data.root`` may point below it, so the folders above
    ``root`` are searched too. Several versions of the CSV may lie side by side; they are merged,
    and one that disagrees with another on a case's ED or ES frame is refused.
    """
    tables = [path for path in csv_files(root, levels_up=3) if set(MNMS1_COLUMNS) <= table_columns(path)]
    if not tables:
        raise DataError(f"{root}: no M&Ms dataset information CSV found in or above this folder (expected a .csv "
                        f"with columns {', '.join(MNMS1_COLUMNS)}, Vendor, Centre, e.g. "
                        f"211230_M&Ms_Dataset_information_diagnosis_opendataset.csv)")
    rows: dict[str, dict] = {}
    for path in tables:
        for row in read_table(path):
            code = row["External code"]
            previous = rows.get(code)
            if previous and (previous["ED"], previous["ES"]) != (row["ED"], row["ES"]):
                raise DataError(f"{path}: case {code} has ED {row['ED']}, ES {row['ES']} but {previous['_table']} "
                                f"says ED {previous['ED']}, ES {previous['ES']}; keep one version of the CSV")
            rows.setdefault(code, {**row, "_table": str(path)})
    return rows, tables


def csv_files(root: Path, levels_up: int) -> list[Path]:
    """CSV files anywhere below ``root`` and directly in its ``levels_up`` parent folders."""
    above = [path for parent in list(root.parents)[:levels_up] for path in sorted(parent.glob("*.csv"))]
    return sorted(root.rglob("*.csv")) + above


def subset_of(root: Path, path: Path) -> str:
    """``training``, ``validation`` or ``testing`` from the folder a case lies in ('' if none)."""
    for part in path.relative_to(root).parts[:-1]:
        if part.lower() in SUBSETS:
            return SUBSETS[part.lower()]
    return ""


def frame_index(row: dict, key: str, code: str) -> int:
    value = row.get(key, "")
    try:
        return int(float(value))
    except ValueError:
        raise DataError(f"{row['_table']}: case {code}: {key} frame {value!r} is not an integer") from None


def read_mnms1_case(code: str, image_path: Path, label_path: Path, row: dict | None, tables: list[Path],
                    subset: str) -> list[Volume]:
    """The ED and ES frames of one M&Ms-1 cine, at the CSV's 0-based time indices."""
    if row is None:
        raise DataError(f"{label_path}: case {code} has no row in the dataset information CSV "
                        f"({', '.join(str(t) for t in tables)})")
    image, spacing, affine = read_nifti(image_path, ndim=4)
    label, _, label_affine = read_nifti(label_path, ndim=4)
    label = check_pair(image_path, label_path, image, label, affine, label_affine, set(MNMS_TO_PROJECT))
    meta = {"vendor": row.get("Vendor", ""), "centre": row.get("Centre", ""), "subset": subset}
    if row.get("VendorName"):
        meta["vendor_name"] = row["VendorName"]
    if row.get("Pathology"):
        meta["group"] = row["Pathology"]
    volumes = []
    for phase in ("ED", "ES"):
        frame = frame_index(row, phase, code)
        if not 0 <= frame < image.shape[3]:
            raise DataError(f"{row['_table']}: case {code}: {phase} frame {frame} is outside the "
                            f"{image.shape[3]} time frames of {image_path.name} (indices are 0-based)")
        truth = label[..., frame]
        if not truth.any():
            raise DataError(f"{label_path}: the {phase} frame {frame} given by the CSV holds no labels "
                            f"(a wrong ED/ES index would give a silently empty mask)")
        volumes.append(Volume(image=slices_first(image[..., frame]),
                              label=slices_first(map_labels(truth, MNMS_TO_PROJECT)), spacing=spacing[:3],
                              patient=code, phase=phase, meta=meta, affine=affine, source=str(image_path)))
    return volumes


# ---------------------------------------------------------------------------- M&Ms-2


def find_mnms2(root: Path, ed_label_files: list[Path]) -> list[Patient]:
    rows = {}
    for path in csv_files(root, levels_up=2):  # dataset_information.csv (optional: vendor, disease)
        if MNMS2_ID_COLUMN in table_columns(path):
            for row in read_table(path):
                rows.setdefault(row[MNMS2_ID_COLUMN], row)
    patients = []
    for label_path in ed_label_files:
        code = label_path.name[: -len("_SA_ED_gt.nii.gz")]
        patients.append(Patient(code, partial(read_mnms2_case, code, label_path.parent, rows.get(code, {}))))
    return sorted(patients, key=lambda p: p.id)


def read_mnms2_case(code: str, folder: Path, row: dict) -> list[Volume]:
    """The ED and ES short-axis volumes of one M&Ms-2 subject (long-axis files ignored)."""
    meta = {key: row[column] for key, column in (("vendor", "VENDOR"), ("scanner", "SCANNER"),
                                                 ("field", "FIELD"), ("group", "DISEASE")) if row.get(column)}
    volumes = []
    for phase in ("ED", "ES"):
        image_path, label_path = folder / f"{code}_SA_{phase}.nii.gz", folder / f"{code}_SA_{phase}_gt.nii.gz"
        image, spacing, affine = read_nifti(image_path)
        label, _, label_affine = read_nifti(label_path)
        label = check_pair(image_path, label_path, image, label, affine, label_affine, set(MNMS_TO_PROJECT))
        volumes.append(Volume(image=slices_first(image), label=slices_first(map_labels(label, MNMS_TO_PROJECT)),
                              spacing=spacing, patient=code, phase=phase, meta=meta, affine=affine,
                              source=str(image_path)))
    return volumes
