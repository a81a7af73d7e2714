"""Segment whole NIfTI volumes with trained checkpoints, slice by slice, back on the input's grid.

The path of one volume (``Segmenter.segment``):

    file -> read_nifti: (X, Y, S) array, spacing and affine
         -> reoriented by its affine to the training orientation (seg/inference/orientation.py): the voxel order
            the training files had -- a volume stored slice axis first or mirrored is the same image
         -> the training preprocessing, from the checkpoint's own config (``prepare_volume``: clip to
            percentiles, z-score, resample in-plane to data.spacing, centre crop/pad to data.image_size)
         -> U-Net on batches of slices -> class probabilities (S, C, size, size) on the training grid:
            the softmax, averaged over the models of an ensemble and, with ``tta``, over the in-plane
            mirrorings (``Segmenter.probabilities``)
         -> back on the input grid (``to_input_grid``): the crop/pad undone (outside the network's
            field of view is background), resampled to the input's in-plane size (nearest by default)
         -> arg-max class -> the dataset's own label value (ACDC: rv 1, myo 2, lv 3)
         -> back in the input's voxel order -> a NIfTI with the input's affine and header.

``predict_files`` does it for a file or a folder: it refuses, before any work, an output folder that is,
contains or lies inside an input and any existing file it would replace (unless ``overwrite``), and
writes each file atomically; an input it cannot read is skipped, named and recorded.

Test-time mirroring (``tta``) follows nnU-Net's 2D inference (Isensee et al., Nature Methods 2021;
nnU-Net v1's ``_internal_maybe_mirror_and_pred_2D``): the network runs on the slice and on its mirror
images along each in-plane axis and both (4 passes), each output is mirrored back, and the softmax
probabilities are averaged with equal weights. nnU-Net v2 averages the logits instead and applies the
softmax once; this project keeps the average of probabilities, which is also how an ensemble of
checkpoints is combined (nnU-Net's ensembling of folds).

``seg-predict ckpt=... input=... output=...`` (seg/tools/predict.py) is the command-line face of this module.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config.options import OptionError
from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..data.mnms import MNMS_TO_PROJECT
from ..data.nnunet import dataset_folder, label_mapping
from ..data.readers import warn
from ..data.slices import TASKS, prepare_volume
from ..data.volumes import LABELS, DataError, Volume, slices_first
from ..model.build import build_model
from ..norms import spec
from .orientation import from_orientation, orientation_of_files, to_orientation, valid_axis_codes
from ..runtime.device import resolve_device

INTERPOLATIONS = {"nearest": "nearest-exact", "linear": "bilinear"}
# nnU-Net's mirror axes of a 2D configuration: x and y; the passes are no mirroring and every
# non-empty combination of them, as dimensions of an (N, C, H, W) batch
MIRRORINGS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))
# what the models of an ensemble must share: the task and its label values, the preprocessing, the input
FIT_KEYS = ("data.task", "labels", "data.image_size", "data.spacing", "data.clip_percentiles", "data.normalize",
            "model.in_channels")
# files of a folder that are not inputs, by name: ACDC's (and M&Ms') label maps and ACDC's 4D cine series
LEFT_OUT_BY_NAME = {"_gt": "label map(s) (*_gt)", "_4d": "cine series (*_4d)"}


@dataclass
class Member:
    """One trained model of a Segmenter (an ensemble has several)."""

    model: torch.nn.Module
    path: Path
    config: dict  # the run's resolved configuration, as stored in its checkpoint
    domains: tuple[str, ...] = ()  # the training domains (vendors) of a conditional norm (cin)
    memory_format: torch.memory_format = torch.contiguous_format

    def takes_domain(self) -> bool:
        return spec(self.config["norm"]["name"]).needs_domain


@dataclass
class Segmenter:
    """Trained U-Net(s) with the preprocessing, orientation and label values of the runs that trained them."""

    members: list[Member]
    device: torch.device
    label_values: np.ndarray  # class index -> label value written to the output
    orientation: str = ""  # axis codes of the training orientation; "" keeps every input as stored
    interpolation: str = "nearest"  # how class scores return to the input grid: nearest or linear
    batch_size: int = 16
    domain: str | None = None  # the vendor of the images to segment; None or unseen: cin's mean (gamma, beta)
    tta: bool = False  # average over the in-plane mirrorings (nnU-Net's test-time mirroring)
    orientation_source: str = ""  # where the orientation came from, in words

    @property
    def config(self) -> dict:
        return self.members[0].config

    @property
    def data(self) -> dict:
        return self.config["data"]

    @property
    def model(self) -> torch.nn.Module:
        return self.members[0].model

    @property
    def domains(self) -> tuple[str, ...]:
        return self.members[0].domains

    @property
    def checkpoints(self) -> list[str]:
        return [str(member.path) for member in self.members]

    def prepare(self, image: np.ndarray, spacing) -> torch.Tensor:
        """The network input (S, 1, size, size) of an image volume (X, Y, S) in the training orientation."""
        stack = slices_first(image)  # (S, X, Y), as the readers give it; no label (an empty one)
        volume = Volume(image=stack, label=np.zeros(stack.shape, np.uint8), spacing=tuple(spacing), patient="input")
        return prepare_volume(volume, image_size=self.data["image_size"], spacing=self.data["spacing"],
                              clip_percentiles=self.data["clip_percentiles"], normalize=self.data["normalize"]).image

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C, H, W) float32 on the CPU of network inputs (N, 1, H, W): the softmax,
        averaged with equal weights over the members and, with ``tta``, over ``MIRRORINGS``."""
        mirrorings = MIRRORINGS if self.tta else ((),)
        out = []
        for batch in images.split(self.batch_size):
            batch = batch.to(self.device)
            total = None
            for member in self.members:
                domain_id = member.domains.index(self.domain) if self.domain in member.domains else -1
                domains = torch.full((len(batch),), domain_id, device=self.device)
                for dims in mirrorings:
                    x = batch.flip(dims) if dims else batch
                    logits = member.model(x.contiguous(memory_format=member.memory_format), domains)
                    p = torch.softmax(logits.float(), 1)
                    p = p.flip(dims) if dims else p
                    total = p if total is None else total + p
            out.append((total / (len(self.members) * len(mirrorings))).cpu())
        return torch.cat(out)

    def segment(self, image: np.ndarray, spacing, affine: np.ndarray | None = None) -> np.ndarray:
        """Label volume, uint8 in the dataset's label values, of an image volume (X, Y, S) on its own grid.

        With ``affine`` the volume is first put into the training orientation (and the labels back
        into its own); without, it is taken as stored.
        """
        if affine is not None and self.orientation:
            image, spacing, _ = to_orientation(image, affine, spacing, self.orientation)
        scores = self.probabilities(self.prepare(image, spacing))
        scores = to_input_grid(scores, image.shape[:2], spacing, self.data["spacing"], self.interpolation)
        classes = scores.argmax(1).numpy()  # (S, X, Y)
        labels = np.moveaxis(self.label_values[classes], 0, -1)
        if affine is not None and self.orientation:
            labels = from_orientation(labels, affine, self.orientation)
        return np.ascontiguousarray(labels)


def trained_model(state: dict) -> torch.nn.Module:
    """The model of a training checkpoint (``build_model`` of its own config), its weights loaded, on the CPU
    in eval mode."""
    model = build_model(state["config"], num_domains=max(len(state.get("domains", [])), 1))
    model.load_state_dict(state["model"])
    return model.eval()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint of this project, or a one-line error naming ``ckpt=``."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"ckpt={path}: no such file")
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"ckpt={path}: not a checkpoint of this project, or damaged "
                              f"({str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"ckpt={path}: not a checkpoint of this project (no model and config)")
    bad = [name for name, value in state["model"].items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"ckpt={path}: its weights hold non-finite values (NaN or inf: {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}); the run that wrote it diverged -- use a checkpoint of an epoch "
                              f"before (its best.pt), or train again (a lower lr, optim.grad_clip)")
    diverged = run_record(path).get("status") == "diverged"
    if diverged:
        record = run_record(path)
        warn(f"ckpt={path} is from a run that diverged (its metrics.json: the loss became "
             f"{record.get('diverged_loss')} at step {record.get('diverged_step')}): its weights are those saved "
             f"before; check its Dice, or use a run that finished")
    return state


def run_record(path: Path) -> dict:
    """The metrics.json of the run folder a checkpoint lies in (``<run>/checkpoints/<name>.pt``), or {}."""
    record = path.parent.parent / "metrics.json"
    try:
        metrics = json.loads(record.read_text()) if path.parent.name == "checkpoints" else {}
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def fit_values(state: dict) -> dict:
    """The values of ``FIT_KEYS`` of one checkpoint."""
    config = state["config"]
    values = {key: config[key.split(".")[0]].get(key.split(".")[1]) for key in FIT_KEYS if "." in key}
    values["labels"] = dict(sorted(dataset_label_values(config["data"]).items()))
    return {key: values[key] for key in FIT_KEYS}


def training_orientation(state: dict) -> tuple[str, str] | None:
    """(axis codes, where they come from) of the images a checkpoint was trained on, or None.

    The checkpoint's own record (key ``orientation``) when it has one; else the orientation of the
    NIfTI files of its training data (``data.root``, relative to the working directory), when they
    are still there -- the most common one if they differ.
    """
    recorded = state.get("orientation")
    if isinstance(recorded, str) and valid_axis_codes(recorded):
        return recorded, "recorded in the checkpoint"
    root = state["config"]["data"].get("root")
    counts = orientation_of_files(root) if root else None
    if not counts:
        return None
    codes, count = counts.most_common(1)[0]
    if len(counts) == 1:
        return codes, f"of the training data ({count} NIfTI file(s) under {root})"
    mixed = ", ".join(f"{c} {n}" for c, n in counts.most_common())
    return codes, f"the most common of the training data's NIfTI files under {root} ({mixed})"


def check_orientation(orientation: str) -> None:
    """``auto``, ``""`` (inputs as stored) or valid axis codes, else an OptionError naming ``orientation=``."""
    if orientation not in ("auto", "") and not valid_axis_codes(orientation):
        raise OptionError(f"orientation={orientation}: give auto or three axis codes, one of L/R, P/A and I/S "
                          f"each (e.g. RAS), as nibabel.aff2axcodes writes them")


def parse_checkpoints(text: str) -> list[str]:
    """``a.pt``, ``[a.pt,b.pt]`` (Hydra's list syntax) or a glob (``<sweep>/*/checkpoints/best.pt``) -> the paths.

    A sweep's job folders hold commas (``0_lr=0.1,norm=bn``): the list is split at the commas that end a
    checkpoint -- the text so far names an existing file or ends in ``.pt`` -- so a path is never cut inside
    a folder name. A glob (``*``, ``?``) is expanded, in sorted order; one that matches nothing is refused."""
    text = text.strip()
    listed = text.startswith("[") and text.endswith("]")
    pieces = text[1:-1].split(",") if listed else [text]
    paths, current = [], ""
    for index, piece in enumerate(pieces):
        current = f"{current},{piece}" if current else piece
        last = index == len(pieces) - 1
        item = unquoted(current.strip())
        if last or item.endswith(".pt") or Path(item).is_file():
            if item:
                paths.extend(expand_glob(item))
            current = ""
    if not paths:
        raise OptionError(f"ckpt={text}: names no checkpoint")
    for path in paths:
        if paths.count(path) > 1:
            raise OptionError(f"ckpt={text}: names {path} twice")
    return paths


def unquoted(item: str) -> str:
    """``'a,b.pt'`` or ``"a,b.pt"`` (Hydra's quoting) -> ``a,b.pt``."""
    return item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item


def expand_glob(path: str) -> list[str]:
    """``path``, or the files its ``*`` / ``?`` pattern matches (sorted; ``[`` taken literally, as sweep folder
    names hold lists); a pattern that matches none is refused."""
    if not any(char in path for char in "*?"):
        return [path]
    found = sorted(p for p in glob.glob(path.replace("[", "[[]")) if Path(p).is_file())
    if not found:
        raise OptionError(f"ckpt={path}: the pattern matches no file")
    return found


def load_segmenter(checkpoint: str | os.PathLike | list, device: str = "auto", interpolation: str = "nearest",
                   batch_size: int = 16, domain: str | None = None, tta: bool = False,
                   orientation: str = "auto") -> Segmenter:
    """The model of a run's checkpoint (best.pt or last.pt), or an ensemble of several (a list),
    rebuilt from the config stored in each; every option is checked first.

    ``orientation``: ``auto`` (the training orientation, from the checkpoint or its training data;
    refused when neither tells), axis codes such as ``RAS``, or ``""`` to take every input as stored.
    """
    if interpolation not in INTERPOLATIONS:
        raise OptionError(f"interpolation={interpolation}: choose {' or '.join(INTERPOLATIONS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size}: must be an integer >= 1")
    check_orientation(orientation)
    target = resolve_device(device, key="device")
    paths = [Path(p) for p in (checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint])]
    states = [read_checkpoint(path) for path in paths]
    first = fit_values(states[0])
    for path, state in zip(paths[1:], states[1:]):
        values = fit_values(state)
        for key in FIT_KEYS:
            if values[key] != first[key]:
                raise CheckpointError(
                    f"ckpt: {path} does not fit {paths[0]} in one ensemble: {key} is {first[key]} there, "
                    f"{values[key]} here (the models of an ensemble share task, label values and preprocessing)")

    members = []
    for path, state in zip(paths, states):
        config = state["config"]
        memory_format = torch.channels_last if config["trainer"].get("channels_last") else torch.contiguous_format
        members.append(Member(trained_model(state).to(target, memory_format=memory_format), path, config,
                              tuple(state.get("domains", ())), memory_format))
    if tta:
        unmirrored = [str(member.path) for member in members
                      if not (member.config["data"].get("augment") or {}).get("flip")]
        if unmirrored:
            warn(f"tta=true: {', '.join(unmirrored)} {'was' if len(unmirrored) == 1 else 'were'} trained without "
                 f"mirrored images (data.augment.flip=false): mirroring its inputs shows it images unlike its "
                 f"training ones and can lower its Dice; predict without tta, or with a model trained with "
                 f"data.augment.flip=true")
    if domain and not any(member.takes_domain() for member in members):
        norms = ", ".join(sorted({member.config["norm"]["name"] for member in members}))
        raise OptionError(f"domain={domain}: the model (norm={norms}) takes no domain")

    source = "given" if orientation else "none: every input taken as stored"
    if orientation == "auto":
        found = [training_orientation(state) for state in states]
        for path, orient in zip(paths, found):
            if orient is None:
                raise OptionError(
                    f"orientation=auto: {path} does not record the orientation of its training images, and no "
                    f"NIfTI file of its training data is found under data.root="
                    f"{states[paths.index(path)]['config']['data'].get('root')}; give it, e.g. orientation=RAS "
                    f"(the axis codes of the training images: nibabel.aff2axcodes of their affine)")
        codes = {orient[0] for orient in found}
        if len(codes) > 1:
            raise CheckpointError(f"ckpt: the models were trained on images of different orientations "
                                  f"({', '.join(f'{p}: {o[0]}' for p, o in zip(paths, found))}); predict with each "
                                  f"alone, or give orientation=")
        orientation, source = found[0]
    values = dataset_label_values(states[0]["config"]["data"])
    label_values = np.array([0] + [values[project] for project in TASKS[states[0]["config"]["data"]["task"]]],
                            np.uint8)
    return Segmenter(members, target, label_values, orientation, interpolation, batch_size, domain or None, tta,
                     source)


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
        return {project: own for own, project in MNMS_TO_PROJECT.items()}
    if data_format == "nnunet":
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
