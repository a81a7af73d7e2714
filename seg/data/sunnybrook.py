"""Reader for the Sunnybrook Cardiac Data (SCD; MICCAI 2009 LV segmentation challenge) -- LV only.

45 cine studies (cases ``SC-HF-I-01`` ... ``SC-N-40``: heart failure with/without infarction,
hypertrophy, normal). Contours are the same in every release:

    <root>/.../<CASE>/contours-manual/IRCCI-expert/IM-0001-NNNN-icontour-manual.txt   LV endocardium
    <root>/.../<CASE>/contours-manual/IRCCI-expert/IM-0001-NNNN-ocontour-manual.txt   LV epicardium
    (drawn at ED and ES on most slices; the epicardium on fewer images; p1/p2 papillary contours unused)

Contour NNNN belongs to image NNNN (1-based) of the case's short-axis cine. Where that image
lies depends on the release; all three are recognised, the images of a case being found in any
folder below ``root`` named like the case (``SC-HF-I-1`` and ``SC-HF-I-01`` are the same case):

- the Cardiac Atlas Project release: ``SCD_IMAGES_01/SCD0000101/`` holds the study's series as
  folders side by side -- ``CINESAX_300``, ``CINELAX_*``, ``PERF_*``, ``SCOUT_*`` -- with
  ``scd_patientdata.csv`` naming each case's folder (``OriginalID`` -> ``PatientID``). The
  short-axis cine is the folder whose DICOM SeriesDescription is CINESAX (checked before the
  challenge table: a CINELAX folder can hold files named with the table's series number); of two
  CINESAX folders the one holding every contoured image number wins (then the one with the most
  files), and the choice is printed. Image NNNN is the file whose InstanceNumber is NNNN;
- challenge release (``challenge_training/``, ``challenge_validation/``, ``challenge_online/``): every
  series of the study side by side in one folder as ``IM-SSSS-NNNN.dcm``; the short-axis cine's
  series number SSSS comes from the fixed case -> series table ``SAX_SERIES`` below;
- releases holding only the cine: ``<CASE>/[DICOM/]IM-0001-NNNN.dcm`` (a single series).

Masks: inside the endocardium -> LV cavity (3); between epicardium and endocardium -> myocardium
(2), on the images with an epicardial contour only (recorded per slice, so ``task=myo`` trains on
those slices alone). Only annotated images become slices. Each annotated cardiac frame becomes a
volume; of the two frames (ED, ES) the one with the larger cavity is ED.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import numpy as np

from .contours import AnnotatedImage, PatientImages, import_pydicom, polygon_mask, read_contour, read_dicom
from .readers import Patient, read_all, read_table, subset_name, table_columns
from .volumes import LABELS, DataError, Volume, annotation_bit

EXPECTED_LAYOUT = ("Sunnybrook layout: <CASE>/contours-manual/IRCCI-expert/IM-0001-NNNN-icontour-manual.txt "
                   "contour files and the case's DICOM images (IM-SSSS-NNNN.dcm) in a folder named after the case")

# The series number of the short-axis cine in each case of the challenge release, where a case
# folder holds all series of the study. Provenance: the table published with the Sunnybrook LV
# segmentation tutorial of the Kaggle Second Annual Data Science Bowl (2016; the 15 training
# cases) and its extension to the validation and online cases (all 45). That extension circulates
# in two versions that differ in SC-N-06 only: 0981 in the more copied one, 0984 in the other; 0984
# is the one a second, independent table (a case list kept with MATLAB code) also gives, and is
# used here. Releases holding one series per case, or CINESAX folders, do not need it.
SAX_SERIES = {
    # challenge training set
    "SC-HF-I-01": "0004", "SC-HF-I-02": "0106", "SC-HF-I-04": "0116", "SC-HF-I-10": "0024",
    "SC-HF-I-40": "0134", "SC-HF-NI-03": "0379", "SC-HF-NI-04": "0501", "SC-HF-NI-34": "0446",
    "SC-HF-NI-36": "0474", "SC-HYP-01": "0550", "SC-HYP-03": "0650", "SC-HYP-38": "0734",
    "SC-HYP-40": "0755", "SC-N-02": "0898", "SC-N-03": "0915", "SC-N-40": "0944",
    # challenge validation set
    "SC-HF-I-05": "0156", "SC-HF-I-06": "0180", "SC-HF-I-07": "0209", "SC-HF-I-08": "0226",
    "SC-HF-NI-07": "0523", "SC-HF-NI-11": "0270", "SC-HF-NI-31": "0401", "SC-HF-NI-33": "0424",
    "SC-HYP-06": "0767", "SC-HYP-07": "0007", "SC-HYP-08": "0796", "SC-HYP-37": "0702",
    "SC-N-05": "0963", "SC-N-06": "0984", "SC-N-07": "1009",
    # challenge online set
    "SC-HF-I-09": "0241", "SC-HF-I-11": "0043", "SC-HF-I-12": "0062", "SC-HF-NI-12": "0286",
    "SC-HF-NI-13": "0304", "SC-HF-NI-14": "0331", "SC-HF-NI-15": "0359", "SC-HYP-09": "0003",
    "SC-HYP-10": "0579", "SC-HYP-11": "0601", "SC-HYP-12": "0629", "SC-N-09": "1031",
    "SC-N-10": "0851", "SC-N-11": "0878",
}
CONTOUR_NAME = re.compile(r"^IM-\d{4}-(\d{4})-icontour-manual\.txt$")
DICOM_NAME = re.compile(r"^IM-(\d{4})-(\d{4})\.dcm$", re.IGNORECASE)
PATIENT_TABLE_COLUMNS = ("PatientID", "OriginalID")


def case_id(name: str) -> str:
    """The canonical name of a case: upper case, numbers zero-padded to two digits (``SC-HF-I-01``)."""
    return "-".join(part.zfill(2) if part.isdigit() else part for part in name.strip().upper().split("-"))


def find_patients(root: str | Path) -> list[Patient]:
    """The Sunnybrook reader: every case with endocardial contours below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    contours: dict[str, list[Path]] = {}
    subsets: dict[str, str] = {}
    for path in sorted(root.rglob("*-icontour-manual.txt")):
        if CONTOUR_NAME.match(path.name):
            parts = path.parts
            # the case folder holds contours-manual/ (some copies put the files directly in it)
            at = parts.index("contours-manual") - 1 if "contours-manual" in parts else len(parts) - 2
            contours.setdefault(case_id(parts[at]), []).append(path)
            subsets.setdefault(case_id(parts[at]), subset_name(root, Path(*parts[:at])))
    if not contours:
        raise DataError(f"{root}: no IM-0001-NNNN-icontour-manual.txt contour files found (expected the "
                        f"{EXPECTED_LAYOUT})")
    cases = patient_table(root)
    folders = folders_by_case(root, {row["PatientID"]: case for case, row in cases.items()})
    return [Patient(case, partial(read_case, case, files, folders.get(case, []), cases.get(case, {})),
                    subset=subsets[case]) for case, files in sorted(contours.items())]


def read_sunnybrook(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every annotated Sunnybrook case below ``root`` (the first bad file raises)."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)


def patient_table(root: Path) -> dict[str, dict]:
    """{case: row} of the Cardiac Atlas Project's ``scd_patientdata.csv`` (OriginalID -> PatientID), if present."""
    rows = {}
    for path in sorted(root.rglob("*.csv")):
        if set(PATIENT_TABLE_COLUMNS) <= table_columns(path):
            for row in read_table(path):
                rows.setdefault(case_id(row["OriginalID"]), row)
    return rows


def folders_by_case(root: Path, aliases: dict[str, str]) -> dict[str, list[Path]]:
    """Folders holding DICOM files, by case: those named like a case, or like its alias (CAP's PatientID)."""
    folders: dict[str, list[Path]] = {}
    for directory, subdirectories, _ in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and d != "contours-manual")
        name = Path(directory).name
        case = aliases.get(name) or case_id(name)
        if case.startswith("SC-") or name in aliases:
            folders.setdefault(case, []).append(Path(directory))
    return folders


def read_case(case: str, contour_files: list[Path], folders: list[Path], row: dict) -> list[Volume]:
    """The annotated images of one case, stacked into one volume per annotated frame."""
    numbers = [int(CONTOUR_NAME.match(path.name)[1]) for path in contour_files]
    locate = image_locator(case, folders, contour_files[0], numbers)
    images = PatientImages(case, cavity_label=LABELS["lv"], meta={"group": "-".join(case.split("-")[1:-1])})
    for key, column in (("pathology", "Pathology"), ("sex", "Gender"), ("age", "Age")):
        if row.get(column):
            images.meta[key] = row[column]
    for contour_path in contour_files:
        number = int(CONTOUR_NAME.match(contour_path.name)[1])
        dicom = read_dicom(locate(number, contour_path))
        cavity = polygon_mask(read_contour(contour_path), dicom.pixels.shape, contour_path)
        label = np.where(cavity, LABELS["lv"], LABELS["background"]).astype(np.uint8)
        annotated = annotation_bit(LABELS["lv"])
        epicardium_path = contour_path.with_name(contour_path.name.replace("-icontour-", "-ocontour-"))
        if epicardium_path.is_file():
            wall = polygon_mask(read_contour(epicardium_path), dicom.pixels.shape, epicardium_path) & ~cavity
            label[wall] = LABELS["myo"]
            annotated |= annotation_bit(LABELS["myo"])
        images.meta.setdefault("vendor", dicom.manufacturer)
        images.images.append(AnnotatedImage(number, dicom, label, annotated, first_number=1))
    return images.volumes()


def image_locator(case: str, folders: list[Path], example: Path, numbers: list[int]):
    """A function image number -> DICOM path for this case's short-axis cine, whichever release it is."""
    if not folders:
        raise DataError(f"{example.parent}: no image folder for case {case} found (expected a folder named "
                        f"{case} holding its DICOM files, or the folder scd_patientdata.csv names for it)")
    files = [path for folder in folders for path in sorted(folder.rglob("*.dcm"))]
    by_name = {path.name.upper(): path for path in files}
    series = {m[1] for m in (DICOM_NAME.match(path.name) for path in files) if m}
    where = ", ".join(str(f) for f in folders)

    cine_folders = cinesax_folders(files)
    if cine_folders:  # Cardiac Atlas Project release: by InstanceNumber in the CINESAX series
        folder, numbers_in = choose_cinesax(case, cine_folders, numbers)
        return partial(by_instance, numbers_in, folder)
    if case in SAX_SERIES and SAX_SERIES[case] in series:  # challenge release: the table names the series
        return partial(by_file_name, by_name, SAX_SERIES[case], where)
    if len(series) == 1:  # a release holding the cine alone
        return partial(by_file_name, by_name, series.pop(), where)
    known = (f"the table's series {SAX_SERIES[case]} is not among them" if case in SAX_SERIES
             else "the case -> series table has no entry for this case")
    raise DataError(f"{case}: DICOM series {sorted(series)} found in {where}, and {known}; cannot tell which "
                    f"series the contours belong to")


def cinesax_folders(files: list[Path]) -> list[Path]:
    """The folders holding one series each whose SeriesDescription is CINESAX (by folder name if it has none).

    A folder holding several series (the challenge release keeps a whole study in one folder) is
    never one: its InstanceNumbers would repeat from series to series.
    """
    pydicom = import_pydicom()
    by_folder: dict[Path, list[Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    found = []
    for folder, members in sorted(by_folder.items()):
        prefixes = {m[1] for m in (DICOM_NAME.match(path.name) for path in members) if m}
        if len(prefixes) > 1:
            continue
        try:
            header = pydicom.dcmread(members[0], stop_before_pixels=True, specific_tags=["SeriesDescription"])
            description = str(header.get("SeriesDescription", "")).strip().upper()
        except Exception as err:  # a file without a usable header
            raise DataError(f"{members[0]}: not a readable DICOM file ({type(err).__name__}: {err})") from None
        if description == "CINESAX" or (not description and folder.name.upper().startswith("CINESAX")):
            found.append(folder)
    return found


def choose_cinesax(case: str, folders: list[Path], numbers: list[int]) -> tuple[Path, dict[int, Path]]:
    """The CINESAX folder holding every contoured image number (then the most files), and its numbers -> files."""
    candidates = [(folder, instance_numbers(folder)) for folder in folders]
    ranked = sorted(candidates, key=lambda c: (-len(set(numbers) & set(c[1])), -len(c[1]), str(c[0])))
    folder, numbers_in = ranked[0]
    if len(candidates) > 1:
        covered = "every contoured image" if set(numbers) <= set(numbers_in) else \
            f"{len(set(numbers) & set(numbers_in))} of the {len(set(numbers))} contoured images"
        others = ", ".join(f"{f.name} ({len(n)} files)" for f, n in ranked[1:])
        print(f"Sunnybrook {case}: {'two' if len(candidates) == 2 else len(candidates)} CINESAX series; using "
              f"{folder.name} (it holds {covered}, {len(numbers_in)} files), not {others}")
    return folder, numbers_in


def by_file_name(by_name: dict[str, Path], series: str, where: str, number: int, contour: Path) -> Path:
    name = f"IM-{series}-{number:04d}.DCM"
    if name not in by_name:
        raise DataError(f"{contour}: its image IM-{series}-{number:04d}.dcm is not in {where}")
    return by_name[name]


def instance_numbers(folder: Path) -> dict[int, Path]:
    """{InstanceNumber: file} of the DICOM files of one series folder (headers only)."""
    pydicom = import_pydicom()
    numbers = {}
    for path in sorted(folder.glob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
            numbers[int(header.InstanceNumber)] = path
        except Exception as err:  # a file without a usable header
            raise DataError(f"{path}: not a readable DICOM file with an InstanceNumber ({type(err).__name__}: "
                            f"{err})") from None
    return numbers


def by_instance(numbers: dict[int, Path], folder: Path, number: int, contour: Path) -> Path:
    if number not in numbers:
        raise DataError(f"{contour}: no image with InstanceNumber {number} in {folder}")
    return numbers[number]
