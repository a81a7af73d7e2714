"""Write small trees in the exact layout of each real dataset, for the reader tests (no download).

NIfTI with nibabel, DICOM with pydicom, contour text files and CSV tables as the datasets ship
them, at tiny sizes. The anatomy is ``acdc_tree.disk_labels``: an LV disk (centre of the image)
in a myocardium ring, an RV disk beside it -- so a test can check which label lands where.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from acdc_tree import disk_labels, write_volume

# ACDC / project label -> M&Ms label (M&Ms numbers the LV first: 1 LV, 2 MYO, 3 RV)
PROJECT_TO_MNMS = np.array([0, 3, 2, 1], dtype=np.uint8)


def anatomy(shape, scale: float, num_slices: int, rng) -> np.ndarray:
    """(X, Y, S) project labels: cavities scaled by ``scale`` (ED 1.0, ES smaller), shrinking to the apex."""
    return np.stack([disk_labels(shape, (shape[0] / 2 + rng.integers(-1, 2), shape[1] / 2 - 3), rv_radius=5 * scale,
                                 myo_radius=8, lv_radius=5.5 * scale * (1 - 0.1 * s)) for s in range(num_slices)], -1)


def image_for(label: np.ndarray, rng) -> np.ndarray:
    return 100 + 300 * (label == 1) + 80 * (label == 2) + 350 * (label == 3) + rng.normal(0, 8, label.shape)


# ---------------------------------------------------------------------------- M&Ms-1 and M&Ms-2

MNMS1_CASES = [  # code, vendor, centre, ED, ES
    ("A0S9V9", "A", "1", 0, 3), ("A1D0Q7", "A", "1", 1, 4), ("B3D0N1", "B", "2", 0, 2),
    ("B5L2T1", "B", "3", 0, 3), ("C2L5P7", "C", "4", 2, 0), ("C7T2V4", "C", "4", 0, 3),
]
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"


def make_mnms1_tree(root: Path, cases=MNMS1_CASES, shape=(32, 28), num_slices=3, num_frames=5, seed=0) -> Path:
    """``root/OpenDataset``: Training/Labeled (4D cines + 4D gt at ED/ES), one Unlabeled case, the CSV."""
    rng = np.random.default_rng(seed)
    dataset = root / "OpenDataset"
    rows = [",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"]
    for number, (code, vendor, centre, ed, es) in enumerate(cases):
        folder = dataset / "Training" / "Labeled" / code
        folder.mkdir(parents=True, exist_ok=True)
        image = np.zeros((*shape, num_slices, num_frames))
        truth = np.zeros((*shape, num_slices, num_frames), np.uint8)
        for frame in range(num_frames):
            label = anatomy(shape, 1.0 - 0.08 * abs(frame - ed), num_slices, rng)
            image[..., frame] = image_for(label, rng)
            if frame in (ed, es):
                truth[..., frame] = PROJECT_TO_MNMS[label]
        write_volume(folder / f"{code}_sa.nii.gz", image, (1.4, 1.4, 9.0))
        write_volume(folder / f"{code}_sa_gt.nii.gz", truth, (1.4, 1.4, 9.0), np.uint8)
        rows.append(f"{number},{code},Vendor{vendor},{vendor},{centre},{ed},{es},50,NOR,M,170,70")
    unlabelled = dataset / "Training" / "Unlabeled" / "D1U2N3"
    unlabelled.mkdir(parents=True, exist_ok=True)
    write_volume(unlabelled / "D1U2N3_sa.nii.gz", np.ones((*shape, num_slices, num_frames)), (1.4, 1.4, 9.0))
    (dataset / MNMS_CSV).write_text("\n".join(rows) + "\n")
    return dataset


def make_mnms2_tree(root: Path, subjects=("001", "002", "003"), shape=(30, 30), num_slices=3, seed=0) -> Path:
    """``root/MnM2``: dataset/NNN/NNN_SA_{ED,ES}[_gt].nii.gz (+ an unused _LA_ file) and dataset_information.csv."""
    rng = np.random.default_rng(seed)
    dataset = root / "MnM2"
    rows = ["SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD"]
    for number, code in enumerate(subjects):
        folder = dataset / "dataset" / code
        folder.mkdir(parents=True, exist_ok=True)
        for phase, scale in (("ED", 1.0), ("ES", 0.75)):
            label = anatomy(shape, scale, num_slices, rng)
            write_volume(folder / f"{code}_SA_{phase}.nii.gz", image_for(label, rng), (1.3, 1.3, 10.0))
            write_volume(folder / f"{code}_SA_{phase}_gt.nii.gz", PROJECT_TO_MNMS[label], (1.3, 1.3, 10.0), np.uint8)
        write_volume(folder / f"{code}_LA_ED.nii.gz", np.ones((*shape, 1)), (1.3, 1.3, 10.0))
        rows.append(f"{code},NOR,{['SIEMENS', 'Philips', 'GE'][number % 3]},Avanto,1.5")
    (dataset / "dataset_information.csv").write_text("\n".join(rows) + "\n")
    return dataset


# ---------------------------------------------------------------------------- nnU-Net raw

ACDC_NNUNET_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}  # nnU-Net's Dataset027_ACDC


def make_nnunet_tree(root: Path, num_patients=3, labels=None, label_map=None, shape=(32, 32), num_slices=3,
                     seed=0) -> Path:
    """``root/Dataset027_ACDC``: dataset.json, imagesTr/patientNNN_frameYY_0000.nii.gz, labelsTr, imagesTs.

    ``labels`` (name -> value) renumbers the structures: each is drawn as the project label its
    name stands for, or that ``label_map`` (name -> project label) gives it.
    """
    from seg.data.nnunet import project_label

    labels = labels or ACDC_NNUNET_LABELS
    to_dataset = np.zeros(4, np.uint8)  # project value -> this dataset's value
    for name, value in labels.items():
        target = (label_map or {}).get(name) or project_label(name)
        if target is not None:
            to_dataset[{"background": 0, "rv": 1, "myo": 2, "lv": 3}[target]] = value
    rng = np.random.default_rng(seed)
    dataset = root / "Dataset027_ACDC"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / sub).mkdir(parents=True, exist_ok=True)
    for p in range(1, num_patients + 1):
        for frame, scale in ((1, 1.0), (9, 0.75)):
            case = f"patient{p:03d}_frame{frame:02d}"
            label = anatomy(shape, scale, num_slices, rng)
            write_volume(dataset / "imagesTr" / f"{case}_0000.nii.gz", image_for(label, rng), (1.5, 1.5, 5.0))
            write_volume(dataset / "labelsTr" / f"{case}.nii.gz", to_dataset[label], (1.5, 1.5, 5.0), np.uint8)
    write_volume(dataset / "imagesTs" / "patient101_frame01_0000.nii.gz", np.ones((*shape, num_slices)))
    spec = {"channel_names": {"0": "cineMRI"}, "labels": labels, "numTraining": 2 * num_patients,
            "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(spec, indent=2))
    return dataset


# ---------------------------------------------------------------------------- DICOM and contours


def write_dicom(path: Path, pixels: np.ndarray, *, spacing=(1.25, 1.25), thickness=8.0, instance=1, frames=20,
                manufacturer="GE MEDICAL SYSTEMS") -> None:
    """A single-frame 16-bit MR DICOM file, as scanners write them (with file meta)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer = "MR", manufacturer
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(s) for s in spacing]
    ds.SliceThickness, ds.InstanceNumber, ds.CardiacNumberOfImages = thickness, instance, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.clip(pixels, 0, 65535).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def circle(cx: float, cy: float, radius: float, points: int = 36) -> np.ndarray:
    """(N, 2) x, y points of a circle (x = column, y = row), as the contour files list them."""
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1)


def write_contour(path: Path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in points))


def cine_image(shape, centre, cavity: float, wall: float, rng) -> np.ndarray:
    """Pixels of one image: a bright cavity of radius ``cavity`` in a grey wall, on a dark field."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(cols - centre[0], rows - centre[1])  # centre is (x, y)
    return 200 + 300 * (r < wall) + 500 * (r < cavity) + rng.normal(0, 10, shape)


# per annotated frame: (frame index in the cine, cavity radius); the larger cavity is end-diastole
SUNNYBROOK_FRAMES = ((0, 8.0), (8, 5.0))
SUNNYBROOK_CASES = ("SC-HF-I-1", "SC-HF-I-2", "SC-HYP-1")


def make_sunnybrook_tree(root: Path, cases=SUNNYBROOK_CASES, layout="challenge", shape=(40, 36), num_slices=2,
                         seed=0) -> Path:
    """A Sunnybrook tree: contours per case, images in the ``challenge`` or the Cardiac Atlas (``cap``) release.

    challenge: ``challenge_training/<case>/IM-SSSS-NNNN.dcm`` for the table's series SSSS, plus a
    decoy series IM-0001 with other content (a reader ignoring the table would pick it up).
    cap: ``SCD_DeidentifiedImages/SCD00001NN/CINESAX_300/*.dcm`` (found by InstanceNumber), a
    decoy ``CINELAX_5`` series, and ``scd_patientdata.csv``. The epicardium is drawn at ED only.
    """
    from seg.data.sunnybrook import SAX_SERIES, case_id

    rng = np.random.default_rng(seed)
    table = ["PatientID,OriginalID,Gender,Age,Pathology"]
    for index, case in enumerate(cases, start=1):
        contours = root / "SCD_ManualContours" / case_id(case) / "contours-manual" / "IRCCI-expert"
        patient_id = f"SCD{index:05d}01"
        table.append(f"{patient_id},{case},M,60,Heart failure")
        for s in range(num_slices):
            for frame, cavity in SUNNYBROOK_FRAMES:
                number = s * 20 + frame + 1  # images are numbered from 1
                centre = (shape[1] / 2 + rng.uniform(-1, 1), shape[0] / 2 + rng.uniform(-1, 1))
                pixels = cine_image(shape, centre, cavity, cavity + 3, rng)
                write_contour(contours / f"IM-0001-{number:04d}-icontour-manual.txt", circle(*centre, cavity))
                if frame == 0:
                    write_contour(contours / f"IM-0001-{number:04d}-ocontour-manual.txt", circle(*centre, cavity + 3))
                if layout == "challenge":
                    folder = root / "challenge_training" / case
                    write_dicom(folder / f"IM-{SAX_SERIES[case_id(case)]}-{number:04d}.dcm", pixels, instance=number)
                    write_dicom(folder / f"IM-0001-{number:04d}.dcm", np.zeros(shape), instance=number)  # decoy
                else:
                    folder = root / "SCD_DeidentifiedImages" / patient_id
                    write_dicom(folder / "CINESAX_300" / f"IM-0003-{number + 1000:04d}.dcm", pixels, instance=number)
                    write_dicom(folder / "CINELAX_5" / f"IM-0002-{number:04d}.dcm", np.zeros(shape), instance=number)
            unannotated = s * 20 + 4 + 1  # an image no contour refers to: never a training slice
            if layout == "challenge":
                name = f"IM-{SAX_SERIES[case_id(case)]}-{unannotated:04d}.dcm"
                write_dicom(root / "challenge_training" / case / name, np.zeros(shape), instance=unannotated)
    if layout == "cap":
        (root / "scd_patientdata.csv").write_text("\n".join(table) + "\n")
    return root


RVSC_FRAMES = ((0, 7.0), (8, 4.5))  # (frame, RV cavity radius); end-diastole is the larger


def make_rvsc_tree(root: Path, patients=(1, 2, 3), test_patients=(17,), shape=(36, 40), num_slices=2,
                   seed=0) -> Path:
    """RVSC: TrainingSet/patientNN/{PNNdicom, PNNcontours-manual, PNNlist.txt}; test patients in the
    Test1Set + Test1SetContours layout (contours apart from images)."""
    rng = np.random.default_rng(seed)
    for number in (*patients, *test_patients):
        name = f"P{number:02d}"
        if number in patients:
            base = root / "TrainingSet" / f"patient{number:02d}"
            images, contours = base / f"{name}dicom", base / f"{name}contours-manual"
        else:
            images = root / "Test1Set" / f"patient{number:02d}" / f"{name}dicom"
            contours = root / "Test1SetContours" / f"{name}contours-manual"
            base = contours.parent
        listed = []
        for s in range(num_slices):
            for frame, cavity in RVSC_FRAMES:
                index = s * 20 + frame  # images are numbered from 0
                centre = (shape[1] / 2 + rng.uniform(-1, 1), shape[0] / 2 + rng.uniform(-1, 1))
                write_dicom(images / f"{name}-{index:04d}.dcm", cine_image(shape, centre, cavity, cavity + 2, rng),
                            instance=index + 1, spacing=(1.5, 1.5), manufacturer="SIEMENS")
                for kind, radius in (("i", cavity), ("o", cavity + 2)):
                    contour = f"{name}-{index:04d}-{kind}contour-manual.txt"
                    write_contour(contours / contour, circle(*centre, radius))
                    listed.append(f".\\{name}contours-manual\\{contour}")
        (base / f"{name}list.txt").write_text("\r\n".join(listed) + "\r\n")
    return root
