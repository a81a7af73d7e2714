"""Segment whole NIfTI volumes with a trained checkpoint, slice by slice, back on the input's grid.

The path of one volume (``Segmenter.segment``):

    file -> read_nifti: (X, Y, S) array and spacing
         -> the training preprocessing, from the checkpoint's own config (``prepare_volume``: clip to
            percentiles, z-score, resample in-plane to data.spacing, centre crop/pad to data.image_size)
         -> U-Net on batches of slices -> class probabilities (S, C, size, size) on the training grid
         -> back on the input grid (``to_input_grid``): the crop/pad undone (outside the network's
            field of view is background), resampled to the input's in-plane size (nearest by default)
         -> arg-max class -> the dataset's own label value (ACDC: rv 1, myo 2, lv 3)
         -> a NIfTI with the input's affine and header (``predict_files``).

``python scripts/predict.py ckpt=... input=... output=...`` is the command-line face of this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint
from .data.slices import TASKS, class_names, prepare_volume
from .data.volumes import LABELS, DataError, Volume, read_nifti, slices_first
from .unet import UNet

INTERPOLATIONS = {"nearest": "nearest-exact", "linear": "bilinear"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Segmenter:
    """A trained U-Net with the preprocessing and label values of the run that trained it."""

    model: torch.nn.Module
    config: dict  # the run's resolved configuration, as stored in its checkpoint
    device: torch.device
    label_values: np.ndarray  # class index -> label value written to the output
    interpolation: str = "nearest"  # how class scores return to the input grid: nearest or linear
    batch_size: int = 16
    domains: tuple[str, ...] = ()  # the training domains (vendors) of a conditional norm (cin)
    domain: str | None = None  # the vendor of the images to segment; None or unseen: cin's mean (gamma, beta)

    @property
    def data(self) -> dict:
        return self.config["data"]

    @torch.no_grad()
    def segment(self, image: np.ndarray, spacing) -> np.ndarray:
        """Label volume (X, Y, S) uint8, in the dataset's label values, of an image volume (X, Y, S)."""
        stack = slices_first(image)  # (S, X, Y), as the readers give it; no label (an empty one)
        volume = Volume(image=stack, label=np.zeros(stack.shape, np.uint8), spacing=tuple(spacing), patient="input")
        prepared = prepare_volume(volume, image_size=self.data["image_size"], spacing=self.data["spacing"],
                                  clip_percentiles=self.data["clip_percentiles"], normalize=self.data["normalize"])
        memory_format = torch.channels_last if self.config["trainer"].get("channels_last") else torch.contiguous_format
        domain_id = self.domains.index(self.domain) if self.domain in self.domains else -1
        scores = torch.cat([
            torch.softmax(self.model(batch.to(self.device).contiguous(memory_format=memory_format),
                                     torch.full((len(batch),), domain_id, device=self.device)).float(), 1).cpu()
            for batch in prepared.image.split(self.batch_size)])
        scores = to_input_grid(scores, volume.image.shape[1:], volume.spacing, self.data["spacing"],
                               self.interpolation)
        classes = scores.argmax(1).numpy()  # (S, X, Y)
        return np.ascontiguousarray(np.moveaxis(self.label_values[classes], 0, -1))


def load_segmenter(checkpoint: str | os.PathLike, device: str = "auto", interpolation: str = "nearest",
                   batch_size: int = 16, domain: str | None = None) -> Segmenter:
    """The model of a run's checkpoint (best.pt or last.pt), rebuilt from the config stored in it."""
    from .train import resolve_device

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}")
    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{checkpoint}: not a training checkpoint of this project (no model and config)")
    config = state["config"]
    model_cfg, norm_cfg, task = config["model"], dict(config["norm"]), config["data"]["task"]
    model = UNet(in_channels=model_cfg["in_channels"], num_classes=len(TASKS[task]) + 1,
                 base_channels=model_cfg["base_channels"], depth=model_cfg["depth"], norm=norm_cfg.pop("name"),
                 norm_options=norm_cfg, init=model_cfg["init"], bias_init=model_cfg["bias_init"],
                 num_domains=max(len(state.get("domains", [])), 1), up=model_cfg.get("up", "transpose2"))
    model.load_state_dict(state["model"])
    target = resolve_device(device)
    memory_format = torch.channels_last if config["trainer"].get("channels_last") else torch.contiguous_format
    model = model.to(target, memory_format=memory_format).eval()
    values = dataset_label_values(config["data"])
    label_values = np.array([0] + [values[project] for project in TASKS[task]], np.uint8)
    return Segmenter(model, config, target, label_values, interpolation, batch_size,
                     tuple(state.get("domains", ())), domain)


# ---------------------------------------------------------------------------- geometry


def uncrop(x: torch.Tensor, size: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """Undo ``slices.crop_or_pad`` on the last two dimensions: back to ``size``; ``fill`` (C,) where the
    crop had cut the image (outside the network's field of view)."""
    out = fill.view(1, -1, 1, 1).expand(x.shape[0], -1, *size).clone()
    source, target = [slice(None)] * 2, [slice(None)] * 2
    for axis, (have, want) in enumerate(zip(x.shape[-2:], size)):
        excess = want - have  # > 0: the image was cropped by this much; < 0: it was padded
        if excess >= 0:
            target[axis] = slice(excess // 2, excess // 2 + have)
        else:
            source[axis] = slice(-excess // 2, -excess // 2 + want)
    out[..., target[0], target[1]] = x[..., source[0], source[1]]
    return out


def to_input_grid(scores: torch.Tensor, input_size: tuple[int, int], input_spacing, spacing: float | None,
                  interpolation: str = "nearest") -> torch.Tensor:
    """Class scores (S, C, size, size) on the training grid -> (S, C, X, Y) on the input's grid.

    The inverse of ``prepare_volume``'s geometry: the resampled size is recomputed exactly as there,
    the crop/pad undone (background outside), then the scores resampled to the input size --
    ``nearest`` (equivalent to resampling the arg-max labels with nearest) or ``linear``
    (bilinear on the probabilities, smoother boundaries).
    """
    size = tuple(input_size)
    if spacing:
        size = (max(1, round(input_size[0] * input_spacing[0] / spacing)),
                max(1, round(input_size[1] * input_spacing[1] / spacing)))
    background = torch.zeros(scores.shape[1], dtype=scores.dtype)
    background[0] = 1.0
    scores = uncrop(scores, size, background)
    if size != tuple(input_size):
        mode = INTERPOLATIONS[interpolation]
        scores = F.interpolate(scores, size=tuple(input_size), mode=mode,
                               **({"align_corners": False} if mode == "bilinear" else {}))
    return scores


# ---------------------------------------------------------------------------- label values


def dataset_label_values(data_cfg: dict) -> dict[int, int]:
    """{project label value: the dataset's own value} for the format the model was trained on.

    ACDC layout (and the phantom), Sunnybrook and RVSC: the project's values are ACDC's (rv 1,
    myo 2, lv 3). M&Ms: 1 LV, 2 MYO, 3 RV. nnU-Net: the values of its dataset.json, read from
    the training data folder when it is still there (else ACDC's, with a warning).
    """
    identity = {value: value for value in LABELS.values()}
    data_format = data_cfg.get("format")
    if data_format == "mnms":
        from .data.mnms import MNMS_TO_PROJECT

        return {project: own for own, project in MNMS_TO_PROJECT.items()}
    if data_format == "nnunet":
        from .data.nnunet import dataset_folder, label_mapping
        from .data.readers import warn

        try:
            spec_path = dataset_folder(Path(str(data_cfg.get("root")))) / "dataset.json"
            mapping = label_mapping(json.loads(spec_path.read_text())["labels"], data_cfg.get("label_map") or {},
                                    spec_path)
        except (DataError, OSError, KeyError, json.JSONDecodeError) as err:
            warn(f"cannot read the training dataset's labels ({err}); writing the project's values "
                 f"(rv 1, myo 2, lv 3)")
            return identity
        values = dict(identity)
        for own, project in sorted(mapping.items(), reverse=True):  # the smallest value wins a tie
            values[project] = own
        return values
    return identity


# ---------------------------------------------------------------------------- files


def is_label_file(path: Path) -> bool:
    """A ground-truth file by its name (ACDC/M&Ms ``_gt``)."""
    return case_name(path).endswith("_gt")


def case_name(path: Path) -> str:
    """The file name without its NIfTI suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_name(path: Path) -> str:
    """The prediction's file name: the input's (nnU-Net's channel suffix _0000 dropped), as .nii.gz."""
    name = case_name(path)
    return (name[:-5] if name.endswith("_0000") else name) + ".nii.gz"


def find_volumes(source: Path) -> list[Path]:
    """The input NIfTI file, or every NIfTI file below a folder that is not a ``_gt`` label file."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    found = sorted(p for p in source.rglob("*") if p.name.endswith(NIFTI_SUFFIXES) and not is_label_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    if not found:
        raise DataError(f"{source}: no NIfTI image (*.nii.gz, *.nii) found")
    return found


def write_labels(path: Path, labels: np.ndarray, like) -> None:
    """Save ``labels`` with the affine and header of the nibabel image ``like``, as uint8 without scaling."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(like)(labels.reshape(like.shape).astype(np.uint8), like.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.to_filename(str(path))


def predict_files(segmenter: Segmenter, source: str | os.PathLike, output: str | os.PathLike,
                  log=print) -> list[Path]:
    """Segment the volume ``source`` (or each volume below that folder) into ``output``; returns the
    files written. A folder's 4D files (e.g. ACDC's _4d cine) are skipped with a notice.

    ``output/predictions.json`` records the checkpoint's task and label values (evaluate.py reads it).
    """
    import nibabel as nib

    source, output = Path(source), Path(output)
    inputs = find_volumes(source)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in inputs:
        target = output / output_name(path)
        if target in written:
            raise DataError(f"{path}: a prediction named {target.name} was already written from another input")
        try:
            image, spacing, _ = read_nifti(path)
        except DataError as err:
            if source.is_file():
                raise
            log(f"skipped: {err}")  # the message names the file
            continue
        write_labels(target, segmenter.segment(image, spacing), nib.load(str(path)))
        written.append(target)
        log(f"{path} -> {target}")
    task = segmenter.data["task"]
    record = {"task": task, "labels": dict(zip(class_names(task), segmenter.label_values[1:].tolist())),
              "interpolation": segmenter.interpolation, "cases": [p.name for p in written]}
    (output / "predictions.json").write_text(json.dumps(record, indent=2))
    return written


def parse_key_values(argv: list[str], defaults: dict, usage: str) -> dict:
    """Hydra-style ``key=value`` arguments over ``defaults`` (None: required); a bad one ends with ``usage``."""
    values = dict(defaults)
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"error: unexpected argument {argument!r} (known: {', '.join(defaults)})\n{usage}")
        values[key] = value
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise SystemExit(f"error: missing {', '.join(f'{k}=...' for k in missing)}\n{usage}")
    return values
