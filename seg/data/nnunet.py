"""Reader for nnU-Net's raw dataset format: v2 (``DatasetXXX_Name``) and v1 (``TaskXXX_Name``).

    <root>/dataset.json                    channel_names, labels (name -> int), numTraining, file_ending
                                           (v1: modality, labels value -> name, no file_ending)
    <root>/imagesTr/{CASE}_0000.nii.gz     the (single) channel of each training case
    <root>/labelsTr/{CASE}.nii.gz
    <root>/imagesTs/...                    no labels: counted as unlabeled, not read

Label values are mapped to the project's set by their **names** in dataset.json: names such as
RV / right ventricle, MYO / myocardium / MLV / LV wall, LV / LVC / left ventricle (any case,
punctuation ignored) are recognised; anything else -- or a mapping you want different -- is
given with ``data.label_map={NAME: rv|myo|lv|background}``. The mapping is printed on every run.

Cases are grouped into patients by their id, following the conversion scripts that wrote them
(``CASE_SCHEMES``, tried in order, each matching the whole id):

- ``patient001_frame01`` (ACDC, v1 Task027 and v2 Dataset027), ``A0S9V9_frame09`` (M&Ms, v2
  Dataset114): patient before ``_frameNN``; likewise a trailing ``_ED`` / ``_ES``;
- ``A0S9V9_0009_A_1`` (M&Ms, v1 Task114: ``{code}_{time:04d}_{vendor}_{centre}``) and its other
  mode ``A_1_A0S9V9_0009``: patient ``A0S9V9``, and its vendor and centre recorded (vendor splits work);
- any other id is a patient of its own.

``data.patient_regex`` replaces them: a Python regular expression that must match every case id
whole, with a group ``(?P<patient>...)``, optionally ``(?P<phase>...)`` and other named groups
(``vendor``, ``centre``...) that become case metadata. Both frames of a patient thus always land in
the same split. The grouping is printed on every run. A volume keeps nnU-Net's case id, so
nnU-Net's ``splits_final.json`` names it.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

from .readers import Patient, read_all, read_text, some_labelled
from .volumes import LABELS, DataError, Volume, check_pair, map_labels, read_nifti, slices_first

EXPECTED_LAYOUT = ("nnU-Net raw layout: DatasetXXX_Name/dataset.json, imagesTr/{CASE}_0000.nii.gz and "
                   "labelsTr/{CASE}.nii.gz")
# (name, rule) of the case-id schemes of nnU-Net's conversion scripts; see the module's docstring
CASE_SCHEMES = (
    ("<patient>_frameNN (ACDC; M&Ms, nnU-Net v2)", re.compile(r"(?P<patient>.+?)_(?P<phase>frame\d+)")),
    ("<patient>_ED/_ES", re.compile(r"(?P<patient>.+?)[_-](?P<phase>ed|es)", re.IGNORECASE)),
    ("<code>_<time>_<vendor>_<centre> (M&Ms, nnU-Net v1 Task114)",
     re.compile(r"(?P<patient>[A-Za-z0-9]+)_(?P<phase>\d{4})_(?P<vendor>[A-Za-z])_(?P<centre>\d+)")),
    ("<vendor>_<centre>_<code>_<time> (M&Ms, nnU-Net v1 Task114)",
     re.compile(r"(?P<vendor>[A-Za-z])_(?P<centre>\d+)_(?P<patient>[A-Za-z0-9]+)_(?P<phase>\d{4})")),
)


def compile_patient_regex(pattern: str) -> re.Pattern:
    """``data.patient_regex`` compiled; it must have a ``(?P<patient>...)`` group (DataError naming the key)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise DataError(f"data.patient_regex={pattern!r} is not a valid regular expression ({err})") from None
    if "patient" not in compiled.groupindex:
        raise DataError(f"data.patient_regex={pattern!r} has no (?P<patient>...) group naming the patient part of "
                        f"a case id")
    return compiled


def group_case(case: str, rule: re.Pattern | None, pattern: str | None) -> tuple[str, str, dict, str]:
    """(patient, phase, metadata, scheme) of a case id, by ``data.patient_regex`` or the known schemes."""
    schemes = [(f"data.patient_regex={pattern!r}", rule)] if rule is not None else CASE_SCHEMES
    for name, scheme in schemes:
        match = scheme.fullmatch(case)
        if match:
            meta = {key: value for key, value in match.groupdict().items()
                    if key not in ("patient", "phase") and value is not None}
            return match["patient"], match.groupdict().get("phase") or "", meta, name
    if rule is not None:
        raise DataError(f"data.patient_regex={pattern!r}: case {case} does not match it (it must match every "
                        f"case id whole)")
    return case, "", {}, "one patient per case"


def find_patients(root: str | Path, label_map: dict[str, str] | None = None,
                  patient_regex: str | None = None) -> list[Patient]:
    """The nnU-Net reader: the labelled training cases of the dataset at ``root``, grouped by patient."""
    folder = dataset_folder(Path(root))
    spec_path = folder / "dataset.json"
    try:
        spec = json.loads(read_text(spec_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{spec_path}: not valid JSON ({err})") from None
    ending = spec.get("file_ending", ".nii.gz")  # nnU-Net v1 has none: NIfTI (.nii.gz) always
    if ending not in (".nii.gz", ".nii"):
        raise DataError(f"{spec_path}: file_ending {ending!r} is not supported; only NIfTI (.nii.gz, .nii) is read")
    channels = spec.get("channel_names") or spec.get("modality") or {"0": "image"}
    if len(channels) != 1:
        raise DataError(f"{spec_path}: {len(channels)} input channels {dict(channels)}; only single-channel "
                        f"datasets (one {{CASE}}_0000 image per case) are supported")
    if not isinstance(spec.get("labels"), dict):
        raise DataError(f"{spec_path}: no 'labels' table (name -> value) found")
    mapping = label_mapping(spec["labels"], label_map or {}, spec_path)
    rule = compile_patient_regex(patient_regex) if patient_regex else None

    labels_dir = folder / "labelsTr"
    label_files = sorted(labels_dir.glob(f"*{ending}")) if labels_dir.is_dir() else []
    if not label_files:
        raise DataError(f"{labels_dir}: no label files (*{ending}) found (expected the {EXPECTED_LAYOUT})")
    by_patient: dict[str, list[tuple]] = {}
    schemes: dict[str, int] = {}
    for label_path in label_files:
        case = label_path.name[: -len(ending)]
        patient, phase, meta, scheme = group_case(case, rule, patient_regex)
        schemes[scheme] = schemes.get(scheme, 0) + 1
        image_path = folder / "imagesTr" / f"{case}_0000{ending}"
        by_patient.setdefault(patient, []).append((case, phase, meta, image_path, label_path))
    print(f"nnU-Net cases: {len(label_files)} training cases of {len(by_patient)} patients (grouped by "
          + ", ".join(f"{name}: {count}" for name, count in schemes.items()) + ")")
    patients = [Patient(patient, partial(read_patient, patient, cases, mapping), subset="labelsTr")
                for patient, cases in sorted(by_patient.items())]
    test_patients = set()
    for image_path in sorted((folder / "imagesTs").glob(f"*_0000{ending}")):
        try:
            test_patients.add(group_case(image_path.name[: -len(f"_0000{ending}")], rule, patient_regex)[0])
        except DataError:
            test_patients.add(image_path.name)
    patients += [Patient(patient, subset="imagesTs", unlabeled="imagesTs has no labels")
                 for patient in sorted(test_patients)]
    return some_labelled(patients, folder, "dataset with labelsTr")


def read_nnunet(root: str | Path, *, label_map: dict[str, str] | None = None, patient_regex: str | None = None,
                max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every labelled training case of an nnU-Net raw dataset (the first bad file raises)."""
    return read_all(find_patients(root, label_map, patient_regex), max_patients=max_patients, progress=progress)


def dataset_folder(root: Path) -> Path:
    """``root`` itself if it holds dataset.json, else its single DatasetXXX_* subfolder (or v1's
    ``nnUNet_raw_data/TaskXXX_*`` below ``nnUNet_raw_data_base``)."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist (expected the {EXPECTED_LAYOUT})")
    if (root / "dataset.json").is_file():
        return root
    found = sorted(path.parent for path in root.glob("*/dataset.json"))
    if not found:  # nnU-Net v1's nnUNet_raw_data_base/nnUNet_raw_data/TaskXXX_Name
        found = sorted(path.parent for path in root.glob("nnUNet_raw_data/*/dataset.json"))
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{root}: holds several nnU-Net datasets ({', '.join(p.name for p in found)}); "
                        f"point data.root at one of them")
    raise DataError(f"{root}: no dataset.json found (expected the {EXPECTED_LAYOUT})")


def project_label(name: str) -> str | None:
    """The project label a dataset's label name stands for, or None when it is not recognised."""
    key = re.sub(r"[^a-z]", "", name.lower())
    if key in ("background", "bg", "bck", "clear"):
        return "background"
    right = key.startswith("rv") or "right" in key
    wall = "myo" in key or "wall" in key or key in ("mlv", "lvm")
    if right:  # the RV cavity; an RV wall has no class in the project's set
        return "rv" if not wall and (key.startswith("rv") or "ventric" in key) else None
    if wall:  # the myocardium, by convention that of the LV
        return "myo"
    if key.startswith("lv") or ("left" in key and "ventric" in key):
        return "lv"
    return None


def label_mapping(labels: dict, overrides: dict[str, str], spec_path: Path) -> dict[int, int]:
    """{dataset label value: project label value} from dataset.json's names and ``data.label_map``."""
    if labels and all(str(key).isdigit() for key in labels) and all(isinstance(v, str) for v in labels.values()):
        labels = {name: int(value) for value, name in labels.items()}  # nnU-Net v1: "1": "RV"
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{spec_path}: label {name!r} has value {value!r}; region-based labels are not "
                            f"supported (each name must map to one integer)")
    by_name = {name.lower(): name for name in labels}
    unknown = [name for name in overrides if name.lower() not in by_name]
    if unknown:
        raise DataError(f"data.label_map names {unknown}, which {spec_path} does not define (its labels: "
                        f"{', '.join(labels)})")
    targets = {by_name[name.lower()]: str(target) for name, target in overrides.items()}
    for name, target in targets.items():
        if target not in LABELS:
            raise DataError(f"data.label_map: {name} -> {target!r} is not a project label (one of "
                            f"{', '.join(LABELS)})")
    names = {name: targets.get(name) or project_label(name) for name in labels}
    unmapped = [name for name, target in names.items() if target is None]
    if unmapped:
        raise DataError(f"{spec_path}: cannot tell which project label (background, rv, myo, lv) the label "
                        f"name(s) {unmapped} stand for; map them, e.g. 'data.label_map={{{unmapped[0]}: lv}}' "
                        f"(background drops a structure)")
    print("nnU-Net labels: " + ", ".join(f"{name}={labels[name]} -> {target}" for name, target in names.items()))
    return {labels[name]: LABELS[target] for name, target in names.items()}


def read_patient(patient: str, cases: list[tuple], mapping: dict[int, int]) -> list[Volume]:
    """The volumes (one per case) of one patient, labels mapped to the project's set; nnU-Net's case ids kept."""
    volumes = []
    for case, phase, meta, image_path, label_path in cases:
        if not image_path.is_file():
            raise DataError(f"{label_path}: its image {image_path.name} is missing from imagesTr "
                            f"(nnU-Net names the single channel of case X X_0000)")
        image, spacing, affine = read_nifti(image_path)
        label, _, label_affine = read_nifti(label_path)
        label = check_pair(image_path, label_path, image, label, affine, label_affine, set(mapping))
        volumes.append(Volume(image=slices_first(image), label=slices_first(map_labels(label, mapping)),
                              spacing=spacing, patient=patient, phase=phase, meta=dict(meta), affine=affine,
                              source=str(image_path), case_id=case))
    return volumes
