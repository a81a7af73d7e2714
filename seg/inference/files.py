"""Volumes in and label files out: which files of a folder are inputs, where each prediction goes (refused
before any work when it would replace an input or an existing file), the NIfTI written atomically on the
input's grid, and the record of a prediction (``predict_files``)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..config.options import OptionError
from ..data.slices import class_names
from ..data.volumes import NIFTI_SUFFIXES, DataError, case_name, read_nifti
from ..runtime.temporaries import temporary_path
from .orientation import axis_codes
from .predict import LEFT_OUT_BY_NAME, Segmenter


def output_name(path: Path) -> str:
    """The prediction's file name: the input's (nnU-Net's channel suffix _0000 dropped), as .nii.gz."""
    name = case_name(path)
    return (name[:-5] if name.endswith("_0000") else name) + ".nii.gz"


def left_out_by_name(path: Path) -> str | None:
    """The ``LEFT_OUT_BY_NAME`` suffix of a file that is not an input when found in a folder, else None."""
    name = case_name(path)
    return next((suffix for suffix in LEFT_OUT_BY_NAME if name.endswith(suffix)), None)


def scan_inputs(source: Path, key: str = "input") -> tuple[list[Path], dict[str, int]]:
    """(the input NIfTI file, or every NIfTI file below that folder except label maps and cine series,
    {suffix: how many files were left out by name})."""
    if source.is_file():
        return [source], {}
    if not source.is_dir():
        raise OptionError(f"{key}={source}: no such file or folder")
    found, left_out = [], {}
    for path in sorted(source.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(source).parts)
        if hidden or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        suffix = left_out_by_name(path)
        if suffix:
            left_out[suffix] = left_out.get(suffix, 0) + 1
        else:
            found.append(path)
    if not found:
        raise OptionError(f"{key}={source}: no NIfTI image (*.nii.gz, *.nii) found"
                          + (" other than label maps and cine series" if left_out else ""))
    return found, left_out


def find_volumes(source: Path) -> list[Path]:
    """The input NIfTI file, or every NIfTI file below a folder that is not a ``_gt`` or ``_4d`` file."""
    return scan_inputs(Path(source))[0]


@dataclass
class Plan:
    """What predict_files will read and write, checked before any work."""

    source: Path
    output: Path
    inputs: list[Path]
    targets: list[Path]
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return self.output / "predictions.json"


def plan_outputs(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Plan:
    """The inputs and the files to write, refusing (naming ``output=``) an output folder that is, contains
    or lies inside an input -- also through symbolic links -- and, unless ``overwrite``, any existing file
    it would replace. Nothing is written here."""
    source, given = Path(source), str(output)
    output = Path(output)
    inputs, left_out = scan_inputs(source)
    if output.exists() and not output.is_dir():
        raise OptionError(f"output={given}: is a file, not a folder")
    existing = next(folder for folder in [output, *output.absolute().parents] if folder.exists())
    if not existing.is_dir():
        raise OptionError(f"output={given}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"output={given}: {existing} is not writable")
    out, src = output.resolve(), source.resolve()
    if source.is_dir():
        if out == src:
            raise OptionError(f"output={given}: is the input folder; the label maps would replace the images")
        if src in out.parents:
            raise OptionError(f"output={given}: lies inside the input folder {source}; give a folder outside it")
        if out in src.parents:
            raise OptionError(f"output={given}: contains the input folder {source}; give a folder outside it")
    for path in inputs:
        real = path.resolve()
        if out == real.parent or out in real.parents:
            linked = f" (a link to {real})" if real != path.absolute() else ""
            raise OptionError(f"output={given}: contains the input {path}{linked}; give a folder outside it")
    targets, origin = [], {}
    for path in inputs:
        target = output / output_name(path)
        if target in origin:
            raise OptionError(f"input={source}: {origin[target]} and {path} would both be written as {target.name}")
        origin[target] = path
        targets.append(target)
    plan = Plan(source, output, inputs, targets, left_out)
    existing = [t for t in [*targets, plan.record] if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise OptionError(f"output={given}: would overwrite {len(existing)} existing file(s): {names} "
                          f"(pass overwrite=true to replace them)")
    return plan


def write_labels(path: Path, labels: np.ndarray, like) -> None:
    """Save ``labels`` with the affine and header of the nibabel image ``like``, as uint8 without scaling;
    written to a temporary file and renamed, so an interrupted run never leaves half a file."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(like)(labels.reshape(like.shape).astype(np.uint8), like.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    temporary = temporary_path(path, hidden=True, keep_suffix=".nii.gz")  # nibabel reads the format from it
    try:
        image.to_filename(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    temporary = temporary_path(path, hidden=True)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass
class Prediction:
    """What predict_files did: the files written and the inputs skipped, each with its reason."""

    written: list[Path]
    skipped: list[dict]
    plan: Plan


def segment_file(segmenter: Segmenter, path: Path):
    """(label volume, nibabel image of the input) of one NIfTI file; DataError names the file."""
    image, spacing, affine = read_nifti(path)
    if not all(np.isfinite(s) and s > 0 for s in spacing[:2]):
        raise DataError(f"{path}: voxel spacing {spacing} is not positive")
    if segmenter.orientation:
        try:
            axis_codes(affine)
        except Exception as err:  # a singular affine: no direction to reorient by
            raise DataError(f"{path}: its affine gives no orientation ({err})") from None
    return segmenter.segment(image, spacing, affine), nib.load(str(path))


def predict_files(segmenter: Segmenter, source: str | os.PathLike | Plan, output: str | os.PathLike | None = None,
                  log=print, warn=None, overwrite: bool = False) -> Prediction:
    """Segment the volume ``source`` (or each volume below that folder) into ``output``.

    ``source`` may be a ``Plan`` (from ``plan_outputs``, already checked). A folder's input that cannot
    be read is skipped: named through ``warn`` (default: stderr) and listed in the result and in
    ``output/predictions.json``, which also records the checkpoints, task, label values, orientation
    and options (evaluate.py reads the labels). A single input file that cannot be read is an error.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    plan = source if isinstance(source, Plan) else plan_outputs(source, output, overwrite)
    if plan.left_out:
        log("left out by name: " + ", ".join(f"{plan.left_out[suffix]} {what}"
                                             for suffix, what in LEFT_OUT_BY_NAME.items() if suffix in plan.left_out))
    if segmenter.orientation:
        log(f"orientation: inputs reoriented to {segmenter.orientation} ({segmenter.orientation_source})")
    plan.output.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path, target in zip(plan.inputs, plan.targets):
        try:
            labels, like = segment_file(segmenter, path)
        except DataError as err:
            if plan.source.is_file():
                raise
            warn(f"skipped: {err}")  # the message names the file
            skipped.append({"input": str(path), "reason": str(err)})
            continue
        try:
            write_labels(target, labels, like)
        except OSError as err:  # a full disk, a folder made read-only meanwhile: the files so far stay
            raise DataError(f"{target}: cannot be written ({err.strerror or err}); {len(written)} file(s) "
                            f"written before it are kept") from None
        written.append(target)
        log(f"{path} -> {target}")
    task = segmenter.data["task"]
    record = {"task": task, "labels": dict(zip(class_names(task), segmenter.label_values[1:].tolist())),
              "checkpoints": segmenter.checkpoints, "tta": segmenter.tta, "interpolation": segmenter.interpolation,
              "orientation": segmenter.orientation, "orientation_source": segmenter.orientation_source,
              "domain": segmenter.domain, "cases": [p.name for p in written], "skipped": skipped}
    write_text_atomic(plan.record, json.dumps(record, indent=2))
    return Prediction(written, skipped, plan)
