"""Reader for the RV Segmentation Challenge (RVSC, MICCAI 2012) -- RV only.

    <root>/TrainingSet/patient01/P01dicom/P01-0000.dcm ...               the cine, 20 frames per slice
    <root>/TrainingSet/patient01/P01contours-manual/P01-0080-icontour-manual.txt   RV endocardium
    <root>/TrainingSet/patient01/P01contours-manual/P01-0080-ocontour-manual.txt   RV epicardium
    <root>/TrainingSet/patient01/P01list.txt                                       the contour files

The test sets (``Test1Set/patient17/{P17dicom, P17list.txt}``, ``Test2Set/...``) ship images and
list files but no contours: such a patient is unlabeled (counted in the data summary, not read).
Contours released later apart from the images (``Test1SetContours/P17contours-manual/``) are
paired by patient number: image and contour folders are found anywhere below ``root``.

The slice spacing is the step between slices from SliceLocation (8.4 mm), as the challenge's
evaluation computes volumes -- not SliceThickness (7 mm).

Contour NNNN belongs to image ``PNN-NNNN.dcm`` (numbered from 0). Inside the endocardium -> RV
cavity (1); the epicardium is not used (the project has no RV-wall class). When ``PNNlist.txt``
is present it is the authoritative list of annotated images. Each annotated cardiac frame
becomes a volume; of the two (ED, ES) the one with the larger cavity is ED.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from .contours import AnnotatedImage, PatientImages, polygon_mask, read_contour, read_dicom
from .readers import Patient, read_all, read_text, some_labelled, subset_name
from .volumes import LABELS, DataError, Volume, annotation_bit

EXPECTED_LAYOUT = ("RVSC layout: patientNN/PNNdicom/PNN-NNNN.dcm images and "
                   "PNNcontours-manual/PNN-NNNN-icontour-manual.txt contour files")
CONTOUR_NAME = re.compile(r"^P(\d+)-(\d{4})-([io])contour-manual\.txt$")


def find_patients(root: str | Path) -> list[Patient]:
    """The RVSC reader: every patient below ``root``; those without any contour file are unlabeled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    contour_folders = numbered_folders(root, r"P(\d+)contours-manual")
    image_folders = numbered_folders(root, r"P(\d+)dicom")
    if not contour_folders and not image_folders:
        raise DataError(f"{root}: no PNNcontours-manual or PNNdicom folders found (expected the {EXPECTED_LAYOUT})")
    patients = []
    for number in sorted(set(contour_folders) | set(image_folders)):
        patient = f"P{number}"
        contours, images = contour_folders.get(number), image_folders.get(number)
        subset = subset_name(root, (images or contours).parent.parent)
        if contours is None or not any(contours.glob("*contour-manual.txt")):
            patients.append(Patient(patient, subset=subset, unlabeled="no contour files: RVSC's test sets ship "
                                                                       "images and lists only"))
            continue
        folders = [contours.parent] + ([images.parent] if images is not None else [])
        list_file = next((path for folder in folders for path in sorted(folder.glob(f"{patient}list.txt"))), None)
        patients.append(Patient(patient, partial(read_patient, patient, contours, images, list_file), subset=subset))
    return some_labelled(patients, root, "TrainingSet folder")


def read_rvsc(root: str | Path, *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every annotated RVSC patient below ``root`` (the first bad file raises)."""
    return read_all(find_patients(root), max_patients=max_patients, progress=progress)


def numbered_folders(root: Path, pattern: str) -> dict[str, Path]:
    """{patient number: folder} of the folders below ``root`` whose whole name matches ``pattern``."""
    folders: dict[str, Path] = {}
    for path in sorted(root.rglob("P*")):
        match = re.fullmatch(pattern, path.name)
        if match and path.is_dir():
            if match[1] in folders:
                raise DataError(f"{path}: patient P{match[1]} has a second folder (the first is {folders[match[1]]})")
            folders[match[1]] = path
    return folders


def listed_contours(list_file: Path, contours: Path) -> list[Path]:
    """The endocardial contour files a ``PNNlist.txt`` names (Windows paths tolerated), checked to exist."""
    files = []
    for number, line in enumerate(read_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        name = re.split(r"[\\/]", line.strip())[-1]
        match = CONTOUR_NAME.match(name)
        if not match:
            raise DataError(f"{list_file}: line {number} is not a contour file name: {line.strip()!r}")
        if not (contours / name).is_file():
            raise DataError(f"{list_file}: line {number} lists {name}, which is not in {contours}")
        if match[3] == "i":
            files.append(contours / name)
    return files


def read_patient(patient: str, contours: Path, images: Path | None, list_file: Path | None) -> list[Volume]:
    """The annotated images of one patient, stacked into one volume per annotated frame."""
    if images is None:
        raise DataError(f"{contours}: no {patient}dicom image folder found for these contours")
    if list_file is not None:
        contour_files = listed_contours(list_file, contours)
    else:
        contour_files = sorted(p for p in contours.glob("*-icontour-manual.txt") if CONTOUR_NAME.match(p.name))
    if not contour_files:
        raise DataError(f"{list_file or contours}: no endocardial (icontour) contour files")
    stack = PatientImages(patient, cavity_label=LABELS["rv"])
    for contour_path in contour_files:
        number = int(CONTOUR_NAME.match(contour_path.name)[2])
        dicom = read_dicom(images / f"{patient}-{number:04d}.dcm")
        cavity = polygon_mask(read_contour(contour_path), dicom.pixels.shape, contour_path)
        label = np.where(cavity, LABELS["rv"], LABELS["background"]).astype(np.uint8)
        stack.meta.setdefault("vendor", dicom.manufacturer)
        stack.images.append(AnnotatedImage(number, dicom, label, annotation_bit(LABELS["rv"]), first_number=0))
    return stack.volumes()
