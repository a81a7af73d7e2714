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
MNMS1_UNLABELED = [("D1U2N3", "C", "5"), ("E4U5N6", "C", "5")]  # Training/Unlabeled: ED = ES = 0 in the CSV
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_XLSX = "M&Ms Dataset Information.xlsx"


def write_mnms1_case(folder: Path, code: str, ed: int, es: int, rng, shape=(32, 28), num_slices=3, num_frames=5,
                     labelled: bool = True) -> None:
    """``<code>_sa.nii.gz`` (4D cine) and ``<code>_sa_gt.nii.gz`` (labels at ED and ES only; all zero if not
    labelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((*shape, num_slices, num_frames))
    truth = np.zeros((*shape, num_slices, num_frames), np.uint8)
    for frame in range(num_frames):
        label = anatomy(shape, 1.0 - 0.08 * abs(frame - ed), num_slices, rng)
        image[..., frame] = image_for(label, rng)
        if labelled and frame in (ed, es):
            truth[..., frame] = PROJECT_TO_MNMS[label]
    write_volume(folder / f"{code}_sa.nii.gz", image, (1.4, 1.4, 9.0))
    write_volume(folder / f"{code}_sa_gt.nii.gz", truth, (1.4, 1.4, 9.0), np.uint8)


def make_mnms1_tree(root: Path, cases=MNMS1_CASES, shape=(32, 28), num_slices=3, num_frames=5, seed=0,
                    unlabeled=MNMS1_UNLABELED) -> Path:
    """``root/OpenDataset`` as downloaded: Training/Labeled, Training/Unlabeled (whose folders *do* hold
    ``_sa_gt`` files, empty, and whose CSV rows say ED = ES = 0), Validation and Testing (labelled), and the
    211230 CSV (an unnamed index column first; Height and Weight sometimes empty)."""
    rng = np.random.default_rng(seed)
    dataset = root / "OpenDataset"
    rows = [",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"]
    subsets = ["Training/Labeled", "Training/Labeled", "Training/Labeled", "Training/Labeled", "Validation",
               "Testing"]
    for number, (code, vendor, centre, ed, es) in enumerate(cases):
        subset = subsets[number % len(subsets)]
        write_mnms1_case(dataset / subset / code, code, ed, es, rng, shape, num_slices, num_frames)
        rows.append(f"{number},{code},Vendor{vendor},{vendor},{centre},{ed},{es},50,NOR,M,"
                    + ("," if number % 2 else "170,70"))
    for number, (code, vendor, centre) in enumerate(unlabeled, start=len(cases)):
        write_mnms1_case(dataset / "Training" / "Unlabeled" / code, code, 0, 0, rng, shape, num_slices, num_frames,
                         labelled=False)
        rows.append(f"{number},{code},Vendor{vendor},{vendor},{centre},0,0,61,Other,F,,")
    (dataset / MNMS_CSV).write_text("\n".join(rows) + "\n")
    return dataset


def make_mnms1_2020_tree(root: Path, cases=MNMS1_CASES[:4], unlabeled=MNMS1_UNLABELED[:1], seed=0) -> Path:
    """The 2020 release: ``root/Training-corrected/{Labeled,Unlabeled}/<code>/`` and, in Training-corrected,
    ``M&Ms Dataset Information.xlsx`` (sheet with columns External code, Vendor, Centre, ED, ES; numbers
    stored as numbers; a few empty rows at the end, as spreadsheets keep them)."""
    import openpyxl

    rng = np.random.default_rng(seed)
    training = root / "Training-corrected"
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "TrainingAnonUnlabeled"
    sheet.append(["External code", "Vendor", "Centre", "ED", "ES"])
    for code, vendor, centre, ed, es in cases:
        write_mnms1_case(training / "Labeled" / code, code, ed, es, rng)
        sheet.append([code, vendor, int(centre), ed, es])
    for code, vendor, centre in unlabeled:
        write_mnms1_case(training / "Unlabeled" / code, code, 0, 0, rng, labelled=False)
        sheet.append([code, vendor, int(centre), 0, 0])
    sheet.append([None, None, None, None, None])
    book.save(training / MNMS_XLSX)
    return training.parent


MNMS2_VENDORS = ("SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS")


def make_mnms2_tree(root: Path, subjects=("001", "002", "003", "041", "042", "160"), shape=(30, 30), num_slices=3,
                    seed=0) -> Path:
    """``root/MnM2`` as downloaded: dataset/NNN/NNN_SA_{ED,ES}[_gt].nii.gz (+ the unused _SA_CINE and _LA_ files)
    and dataset_information.csv, whose SUBJECT_CODE is unpadded (``1``, not ``001``), whose VENDOR holds the
    manufacturer strings, and which ends with empty padding rows."""
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
            write_volume(folder / f"{code}_LA_{phase}.nii.gz", np.ones((*shape, 1)), (1.3, 1.3, 10.0))
        write_volume(folder / f"{code}_SA_CINE.nii.gz", np.ones((*shape, num_slices, 2)), (1.3, 1.3, 10.0))
        vendor = MNMS2_VENDORS[number % 3]
        rows.append(f"{int(code)},NOR,{vendor},{['Avanto', 'Achieva', 'Signa'][number % 3]},1.5")
    rows += [",,,,"] * 3
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


MNMS_NNUNET_LABELS = {"background": 0, "LVBP": 1, "LVM": 2, "RV": 3}  # both M&Ms conversions (LV first)


def make_nnunet_mnms_tree(root: Path, version: int = 1, cases=MNMS1_CASES, shape=(32, 32), num_slices=3,
                          seed=0) -> Path:
    """M&Ms-1 as nnU-Net's own conversion scripts write it.

    version 1 (``Task114_heart_mnms``, nnU-Net v1): case ids ``{code}_{time:04d}_{vendor}_{centre}``
    (e.g. ``A0S9V9_0000_A_1``), dataset.json with ``modality``, *inverted* ``labels`` (``{"1": "LVBP"}``),
    a ``training`` list and no ``file_ending``.
    version 2 (``Dataset114_MNMs``, nnU-Net v2): case ids ``{code}_frame{time:02d}``, ``channel_names``,
    ``labels`` name -> value, ``file_ending``.
    Labels are M&Ms' values (1 LV cavity, 2 LV myocardium, 3 RV).
    """
    rng = np.random.default_rng(seed)
    dataset = root / ("Task114_heart_mnms" if version == 1 else "Dataset114_MNMs")
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for code, vendor, centre, ed, es in cases:
        for time, scale in ((ed, 1.0), (es, 0.75)):
            case = f"{code}_{time:04d}_{vendor}_{centre}" if version == 1 else f"{code}_frame{time:02d}"
            label = anatomy(shape, scale, num_slices, rng)
            write_volume(dataset / "imagesTr" / f"{case}_0000.nii.gz", image_for(label, rng), (1.3, 1.3, 9.0))
            write_volume(dataset / "labelsTr" / f"{case}.nii.gz", PROJECT_TO_MNMS[label], (1.3, 1.3, 9.0), np.uint8)
            ids.append(case)
    if version == 1:
        spec = {"name": "M&Ms", "tensorImageSize": "4D", "modality": {"0": "MRI"},
                "labels": {str(v): k for k, v in MNMS_NNUNET_LABELS.items()}, "numTraining": len(ids), "numTest": 0,
                "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids],
                "test": []}
    else:
        spec = {"channel_names": {"0": "cineMRI"}, "labels": MNMS_NNUNET_LABELS, "numTraining": len(ids),
                "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(spec, indent=4))
    return dataset


# ---------------------------------------------------------------------------- DICOM and contours


def write_dicom(path: Path, pixels: np.ndarray, *, spacing=(1.25, 1.25), thickness=8.0, instance=1, frames=20,
                manufacturer="GE MEDICAL SYSTEMS", description: str | None = None,
                location: float | None = None) -> None:
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
    if description is not None:
        ds.SeriesDescription = description
    if location is not None:
        ds.SliceLocation = location
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
# challenge release: where each challenge set keeps its contours and its images
SUNNYBROOK_SETS = {
    "training": ("Sunnybrook Cardiac MR Database ContoursPart3/TrainingDataContours", "challenge_training"),
    "validation": ("Sunnybrook Cardiac MR Database ContoursPart2/ValidationDataContours", "challenge_validation"),
}
SUNNYBROOK_VALIDATION = ("SC-N-6",)
# SC-N-06's short-axis cine, and the other cine of its study that a wrong table entry points at
SC_N_06_CINE, SC_N_06_OTHER = "0984", "0981"


def make_sunnybrook_tree(root: Path, cases=SUNNYBROOK_CASES, layout="challenge", shape=(40, 36), num_slices=2,
                         seed=0, second_cinesax: tuple[str, ...] = ()) -> Path:
    """A Sunnybrook tree: contours per case, images in the ``challenge`` or the Cardiac Atlas (``cap``) release.

    challenge: contours under ``Sunnybrook Cardiac MR Database ContoursPart3/TrainingDataContours/SC-HF-I-01/``
    (zero-padded case; ``ContoursPart2/ValidationDataContours`` for the validation cases), images under
    ``challenge_training/SC-HF-I-1/IM-SSSS-NNNN.dcm`` (unpadded case) with every series of the study side by
    side: the table's series SSSS, a decoy series IM-0001 of zeros (a reader ignoring the table would take
    it), and for SC-N-06 the other cine 0981 (zeros) beside its true cine 0984.
    cap: ``SCD_IMAGES_01/SCD00001NN/`` holding ``CINESAX_300`` (SeriesDescription CINESAX, files
    ``IM-0003-NNNN.dcm`` found by InstanceNumber), ``CINELAX_5`` (CINELAX, files named with the challenge
    table's series of the case, zeros), ``PERF_7`` and ``SCOUT_1``; contours under
    ``SCD_ManualContours/<case>/``; ``scd_patientdata.csv`` (PatientID, OriginalID unpadded, Gender, Age,
    Pathology). Cases in ``second_cinesax`` also get ``CINESAX_301``: a short repeat (two images, neither
    contoured). The epicardium is drawn at ED only.
    """
    from seg.data.sunnybrook import SAX_SERIES, case_id

    rng = np.random.default_rng(seed)
    table = ["PatientID,OriginalID,Gender,Age,Pathology"]
    for index, case in enumerate(cases, start=1):
        which = "validation" if case in SUNNYBROOK_VALIDATION else "training"
        if layout == "challenge":
            contours = root / SUNNYBROOK_SETS[which][0] / case_id(case) / "contours-manual" / "IRCCI-expert"
            images = root / SUNNYBROOK_SETS[which][1] / case
            series = SC_N_06_CINE if case_id(case) == "SC-N-06" else SAX_SERIES[case_id(case)]
        else:
            contours = root / "SCD_ManualContours" / case_id(case) / "contours-manual" / "IRCCI-expert"
            images = root / "SCD_IMAGES_01" / f"SCD{index:05d}01"
            series = "0003"
        table.append(f"SCD{index:05d}01,{case},M,60,Heart failure")
        for s in range(num_slices):
            for frame, cavity in SUNNYBROOK_FRAMES:
                number = s * 20 + frame + 1  # images are numbered from 1
                centre = (shape[1] / 2 + rng.uniform(-1, 1), shape[0] / 2 + rng.uniform(-1, 1))
                pixels = cine_image(shape, centre, cavity, cavity + 3, rng)
                write_contour(contours / f"IM-0001-{number:04d}-icontour-manual.txt", circle(*centre, cavity))
                if frame == 0:
                    write_contour(contours / f"IM-0001-{number:04d}-ocontour-manual.txt", circle(*centre, cavity + 3))
                zeros = np.zeros(shape)
                if layout == "challenge":
                    write_dicom(images / f"IM-{series}-{number:04d}.dcm", pixels, instance=number)
                    write_dicom(images / f"IM-0001-{number:04d}.dcm", zeros, instance=number)  # decoy
                    if case_id(case) == "SC-N-06":
                        write_dicom(images / f"IM-{SC_N_06_OTHER}-{number:04d}.dcm", zeros, instance=number)
                else:
                    write_dicom(images / "CINESAX_300" / f"IM-0003-{number + 1000:04d}.dcm", pixels, instance=number,
                                description="CINESAX")
                    write_dicom(images / "CINELAX_5" / f"IM-{SAX_SERIES[case_id(case)]}-{number:04d}.dcm", zeros,
                                instance=number, description="CINELAX")
            unannotated = s * 20 + 4 + 1  # an image no contour refers to: never a training slice
            if layout == "challenge":
                write_dicom(images / f"IM-{series}-{unannotated:04d}.dcm", np.zeros(shape), instance=unannotated)
            else:
                write_dicom(images / "CINESAX_300" / f"IM-0003-{unannotated + 1000:04d}.dcm", np.zeros(shape),
                            instance=unannotated, description="CINESAX")
        if layout == "cap":
            write_dicom(images / "PERF_7" / "IM-0005-0001.dcm", np.zeros(shape), description="PERF")
            write_dicom(images / "SCOUT_1" / "IM-0001-0001.dcm", np.zeros(shape), description="SCOUT")
            if case in second_cinesax:
                for number in (2, 3):
                    write_dicom(images / "CINESAX_301" / f"IM-0006-{number:04d}.dcm", np.zeros(shape),
                                instance=number, description="CINESAX")
    if layout == "cap":
        (root / "scd_patientdata.csv").write_text("\n".join(table) + "\n")
    return root


RVSC_FRAMES = ((0, 7.0), (8, 4.5))  # (frame, RV cavity radius); end-diastole is the larger
RVSC_THICKNESS, RVSC_STEP = 7.0, 8.4  # SliceThickness, and the step between slices (from SliceLocation)


def make_rvsc_tree(root: Path, patients=(1, 2, 3), test_patients=(17,), unlabeled_patients=(33,), shape=(36, 40),
                   num_slices=2, seed=0) -> Path:
    """RVSC as distributed: TrainingSet/patientNN/{PNNdicom, PNNcontours-manual, PNNlist.txt (Windows paths,
    CRLF)}; Test1Set/patientNN/{PNNdicom, PNNlist.txt} whose contours came out later apart from the images
    (Test1SetContours/PNNcontours-manual, labelled); Test2Set/patientNN/{PNNdicom, PNNlist.txt} without any
    contour (unlabeled). DICOM SliceThickness is 7 mm, SliceLocation steps 8.4 mm from slice to slice."""
    rng = np.random.default_rng(seed)
    for number in (*patients, *test_patients, *unlabeled_patients):
        name = f"P{number:02d}"
        if number in patients:
            base = root / "TrainingSet" / f"patient{number:02d}"
            images, contours = base / f"{name}dicom", base / f"{name}contours-manual"
        else:
            base = root / ("Test1Set" if number in test_patients else "Test2Set") / f"patient{number:02d}"
            images = base / f"{name}dicom"
            contours = root / "Test1SetContours" / f"{name}contours-manual" if number in test_patients else None
        listed = []
        for s in range(num_slices):
            for frame, cavity in RVSC_FRAMES:
                index = s * 20 + frame  # images are numbered from 0
                centre = (shape[1] / 2 + rng.uniform(-1, 1), shape[0] / 2 + rng.uniform(-1, 1))
                write_dicom(images / f"{name}-{index:04d}.dcm", cine_image(shape, centre, cavity, cavity + 2, rng),
                            instance=index + 1, spacing=(1.5, 1.5), manufacturer="SIEMENS",
                            thickness=RVSC_THICKNESS, location=-20.0 - RVSC_STEP * s)
                for kind, radius in (("i", cavity), ("o", cavity + 2)):
                    contour = f"{name}-{index:04d}-{kind}contour-manual.txt"
                    if contours is not None:
                        write_contour(contours / contour, circle(*centre, radius))
                    listed.append(f".\\{name}contours-manual\\{contour}")
        (base / f"{name}list.txt").write_bytes(("\r\n".join(listed) + "\r\n").encode())
    return root
