"""Reader for the M&Ms challenges: M&Ms-1 (MICCAI 2020) and M&Ms-2 (STACOM 2021), told apart by their files.

M&Ms-1, the current download (the ``OpenDataset`` folder):

    <root>/Training/Labeled/A0S9V9/A0S9V9_sa.nii.gz       4D cine, H x W x slices x time
    <root>/Training/Labeled/A0S9V9/A0S9V9_sa_gt.nii.gz    4D, labelled at the ED and ES frames only
    <root>/Training/Unlabeled/<code>/...                  the unlabelled subset (see below)
    <root>/Validation/<code>/..., <root>/Testing/<code>/...  labelled, read too
    <root>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
        an unnamed index column, ``External code``, VendorName, ``Vendor`` (A-D), ``Centre``, ``ED``,
        ``ES`` (0-based time indices), Age, Pathology, Sex, Height, Weight

M&Ms-1, the 2020 release: ``<root>/Training-corrected/{Labeled,Unlabeled}/<code>/`` and the sheet
``M&Ms Dataset Information.xlsx`` (External code, Vendor, Centre, ED, ES) in ``Training-corrected/``
(also found beside it), read with openpyxl (the optional ``xlsx`` extra).

``Training/Unlabeled`` (``Training-corrected/Unlabeled``) is left out **by its folder**, whatever
files it holds: its folders do hold ``_sa_gt`` files and the CSV gives its 25 cases ED = ES = 0,
but it is not labelled training data. It is counted in the run's data summary.

M&Ms-2 (the ``MnM2`` folder):

    <root>/dataset/001/001_SA_ED.nii.gz, 001_SA_ED_gt.nii.gz, 001_SA_ES.nii.gz, 001_SA_ES_gt.nii.gz
    (the long-axis ``_LA_`` files and ``_SA_CINE`` are not used), <root>/dataset_information.csv
    (``SUBJECT_CODE`` unpadded -- ``1`` for folder ``001`` --, DISEASE, ``VENDOR`` with the
    manufacturer's string: SIEMENS, Philips Medical Systems, GE MEDICAL SYSTEMS; SCANNER, FIELD;
    empty padding rows at the end). Codes are matched as numbers; vendor splits name those strings
    (any case). A table that matches no case is an error, not a silent loss of the metadata.

**Both label the LV first**: 1 LV cavity, 2 LV myocardium, 3 RV -- the reverse of ACDC. They are
mapped to the project's set (1 RV, 2 MYO, 3 LV) here, so nothing downstream knows the difference.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .readers import Patient, read_all, read_table, read_xlsx, some_labelled, subset_name, table_columns
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
    """The M&Ms reader: every case below ``root`` (unlabelled ones counted apart), M&Ms-1 or -2 from the file names."""
    root = Path(root).resolve()  # absolute: the information table may lie in a folder above it
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    mnms1 = sorted({*root.rglob("*_sa.nii.gz"), *(p.with_name(p.name.replace("_sa_gt", "_sa"))
                                                  for p in root.rglob("*_sa_gt.nii.gz"))})
    mnms2 = sorted(root.rglob("*_SA_ED.nii.gz"))
    if mnms1 and mnms2:
        raise DataError(f"{root}: holds both M&Ms-1 (*_sa.nii.gz) and M&Ms-2 (*_SA_ED.nii.gz) cases; "
                        f"point data.root at one of the two datasets")
    if mnms1:
        return some_labelled(find_mnms1(root, mnms1), root, "Training/Labeled, Validation or Testing folder")
    if mnms2:
        return some_labelled(find_mnms2(root, mnms2), root, "dataset folder")
    raise DataError(f"{root}: no M&Ms case found (expected the {EXPECTED_LAYOUT})")


def read_mnms(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every labelled M&Ms case below ``root`` as ED and ES ``Volume``s (the first bad file raises)."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)


# ---------------------------------------------------------------------------- M&Ms-1


def find_mnms1(root: Path, image_files: list[Path]) -> list[Patient]:
    patients, labelled = [], []
    for image_path in image_files:
        code = image_path.name[: -len("_sa.nii.gz")]
        label_path = image_path.with_name(f"{code}_sa_gt.nii.gz")
        subset = subset_name(root, image_path.parent.parent)
        if image_path.parent.parent.name.lower() == "unlabeled":
            patients.append(Patient(code, subset=subset, unlabeled="the Unlabeled subset of M&Ms-1, left out by its "
                                                                    "folder"))
        elif not label_path.is_file():
            patients.append(Patient(code, subset=subset, unlabeled="no _sa_gt file"))
        else:
            labelled.append((code, image_path, label_path, subset))
    if labelled:
        rows, tables = case_table(root)
        for code, image_path, label_path, subset in labelled:
            patients.append(Patient(code, partial(read_mnms1_case, code, image_path, label_path, rows.get(code),
                                                  tables, subset_of(root, label_path)), subset=subset))
    return patients


def case_table(root: Path) -> tuple[dict[str, dict], list[Path]]:
    """The M&Ms-1 information table(s) in or above ``root``: {External code: row} and the files read.

    The 211230 CSV sits in ``OpenDataset/``, the 2020 release's .xlsx in ``Training-corrected/``,
    while ``data.root`` may point above or below them, so the folders above ``root`` are searched
    too. Several versions may lie side by side; they are merged, and one that disagrees with
    another on a case's ED or ES frame is refused.
    """
    candidates = table_files(root, levels_up=3)
    tables = [path for path in candidates if path.suffix.lower() == ".csv"
              and set(MNMS1_COLUMNS) <= table_columns(path)]
    tables += [path for path in candidates if path.suffix.lower() == ".xlsx"]
    rows: dict[str, dict] = {}
    used = []
    for path in tables:
        table = read_xlsx(path, MNMS1_COLUMNS) if path.suffix.lower() == ".xlsx" else read_table(path)
        if table:
            used.append(path)
        for row in table:
            code = row["External code"]
            if not code:
                continue
            previous = rows.get(code)
            if previous and (previous["ED"], previous["ES"]) != (row["ED"], row["ES"]):
                raise DataError(f"{path}: case {code} has ED {row['ED']}, ES {row['ES']} but {previous['_table']} "
                                f"says ED {previous['ED']}, ES {previous['ES']}; keep one version of the table")
            rows.setdefault(code, {**row, "_table": str(path)})
    if not used:
        raise DataError(f"{root}: no M&Ms dataset information table found in or above this folder (expected a .csv "
                        f"with columns {', '.join(MNMS1_COLUMNS)}, Vendor, Centre, e.g. "
                        f"211230_M&Ms_Dataset_information_diagnosis_opendataset.csv, or the 2020 release's "
                        f"'M&Ms Dataset Information.xlsx')")
    return rows, used


def table_files(root: Path, levels_up: int) -> list[Path]:
    """CSV and .xlsx files anywhere below ``root`` and directly in its ``levels_up`` parent folders."""
    found = []
    for pattern in ("*.csv", "*.xlsx"):
        above = [path for parent in list(root.parents)[:levels_up] for path in sorted(parent.glob(pattern))]
        found += sorted(p for p in root.rglob(pattern) if not p.name.startswith((".", "~$"))) + above
    return found


def csv_files(root: Path, levels_up: int) -> list[Path]:
    """CSV files anywhere below ``root`` and directly in its ``levels_up`` parent folders."""
    return [path for path in table_files(root, levels_up) if path.suffix.lower() == ".csv"]


def subset_of(root: Path, path: Path) -> str:
    """``training``, ``validation`` or ``testing`` from the folder a case lies in ('' if none)."""
    for part in (*path.relative_to(root).parts[:-1], root.name):  # below root first, then root itself
        for prefix, subset in SUBSETS.items():
            if part.lower().startswith(prefix):  # Training, Training-corrected
                return subset
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
        raise DataError(f"{label_path}: case {code} has no row in the dataset information table "
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


def subject_key(code: str) -> str:
    """M&Ms-2 subject codes compared as numbers: folder ``001`` and SUBJECT_CODE ``1`` are one subject."""
    code = code.strip()
    return str(int(code)) if code.isdigit() else code


def find_mnms2(root: Path, ed_image_files: list[Path]) -> list[Patient]:
    codes = {path.name[: -len("_SA_ED.nii.gz")]: path.parent for path in ed_image_files}
    rows, tables = {}, []
    for path in csv_files(root, levels_up=2):  # dataset_information.csv (vendor, disease)
        if MNMS2_ID_COLUMN in table_columns(path):
            tables.append(path)
            table = {subject_key(row[MNMS2_ID_COLUMN]): row for row in read_table(path) if row[MNMS2_ID_COLUMN]}
            if table and not set(table) & {subject_key(code) for code in codes}:
                shown = ", ".join(sorted(table, key=lambda k: (len(k), k))[:5])
                raise DataError(f"{path}: its SUBJECT_CODEs ({shown}{' ...' if len(table) > 5 else ''}) match none "
                                f"of the {len(codes)} cases in {root} (folders such as {min(codes)}); is it the "
                                f"table of another dataset?")
            for key, row in table.items():
                rows.setdefault(key, row)
    patients = []
    for code, folder in sorted(codes.items()):
        subset = subset_name(root, folder.parent)
        if not (folder / f"{code}_SA_ED_gt.nii.gz").is_file() and not (folder / f"{code}_SA_ES_gt.nii.gz").is_file():
            patients.append(Patient(code, subset=subset, unlabeled="no _SA_ED_gt / _SA_ES_gt files"))
            continue
        row = rows.get(subject_key(code))
        patients.append(Patient(code, partial(read_mnms2_case, code, folder, row, tables), subset=subset))
    return patients


def read_mnms2_case(code: str, folder: Path, row: dict | None, tables: list[Path]) -> list[Volume]:
    """The ED and ES short-axis volumes of one M&Ms-2 subject (long-axis files ignored)."""
    if row is None and tables:
        raise DataError(f"{folder}: subject {code} has no row (SUBJECT_CODE {subject_key(code)}) in "
                        f"{', '.join(str(t) for t in tables)}")
    row = row or {}
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
