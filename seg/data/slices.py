"""From volumes to training tensors: preprocessing, task labels and patient-level splits.

Per volume (``prepare_volume``, the part that is cached): intensities clipped to percentiles and
z-scored; slices resampled in-plane to a fixed spacing (if set) and centre-cropped/padded to
``image_size``; labels kept in the project's label set. Per run (``make_slice_set``, cheap): the
slices annotated for the task are kept, labels mapped to the task's classes. The slices of a
split live in one ``SliceSet`` -- plain tensors that are moved to the training device once, from
which batches are gathered by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .volumes import LABELS, DataError, Volume, annotation_bit

# task -> project label values that form its foreground classes 1..K (in order)
TASKS: dict[str, tuple[int, ...]] = {
    "rv": (LABELS["rv"],),
    "lv": (LABELS["lv"],),
    "myo": (LABELS["myo"],),
    "multi": (LABELS["rv"], LABELS["myo"], LABELS["lv"]),
}


def class_names(task: str) -> list[str]:
    """Names of the task's foreground classes, in class-index order (1, 2, ...)."""
    names = {value: name for name, value in LABELS.items()}
    return [names[value] for value in TASKS[task]]


@dataclass
class SliceSet:
    """The 2D slices of a set of volumes, as tensors.

    images (N, 1, H, W) float32; labels (N, H, W) uint8 task classes; volume_index (N,) int64,
    the position in ``cases`` of each slice's volume (so per-volume 3D metrics restack slices).
    """

    images: torch.Tensor
    labels: torch.Tensor
    volume_index: torch.Tensor
    cases: list[dict]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> SliceSet:
        return SliceSet(self.images.to(device), self.labels.to(device), self.volume_index.to(device), self.cases)

    def domain_ids(self, domains: list[str], key: str = "vendor") -> torch.Tensor:
        """(N,) int64 per slice: the position in ``domains`` of its volume's ``key`` (e.g. vendor), -1 if absent."""
        position = {name: i for i, name in enumerate(domains)}
        per_case = torch.tensor([position.get(str(case.get(key, "")), -1) for case in self.cases], dtype=torch.int64)
        return per_case.to(self.volume_index.device)[self.volume_index]


def normalize_intensity(image: np.ndarray, clip_percentiles, method: str) -> np.ndarray:
    """Clip to the given percentiles of the volume, then z-score it (or leave it: ``none``)."""
    if clip_percentiles:
        low, high = np.percentile(image, clip_percentiles)
        image = np.clip(image, low, high)
    if method == "zscore":
        image = (image - image.mean()) / max(float(image.std()), 1e-6)
    elif method != "none":
        raise ValueError(f"unknown intensity normalization {method!r}; valid: zscore, none")
    return image.astype(np.float32)


def crop_or_pad(x: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Centre-crop or pad the last two dimensions of ``x`` to ``size`` x ``size``."""
    for dim in (-2, -1):
        excess = x.shape[dim] - size
        if excess > 0:
            x = x.narrow(dim, excess // 2, size)
        elif excess < 0:
            before = -excess // 2
            pad = [0, 0, 0, 0]
            pad[(0 if dim == -1 else 2):(2 if dim == -1 else 4)] = [before, -excess - before]
            x = F.pad(x, pad, value=fill)
    return x


@dataclass
class PreparedVolume:
    """One volume after preprocessing, before the task: what the cache stores.

    image (S, 1, size, size) float32; label (S, size, size) uint8 in the project's label set;
    annotated (S,) uint8 annotation bits per slice; case: patient, phase, spacing (as read), grid_spacing
    (x, y, slice in mm of the prepared grid: the in-plane spacing after resampling) and metadata.
    """

    image: torch.Tensor
    label: torch.Tensor
    annotated: torch.Tensor
    case: dict = field(default_factory=dict)


def prepare_volume(volume: Volume, *, image_size: int, spacing: float | None, clip_percentiles,
                   normalize: str) -> PreparedVolume:
    """Normalise, resample in-plane to ``spacing`` mm and crop/pad one volume to ``image_size``."""
    image = torch.from_numpy(normalize_intensity(volume.image, clip_percentiles, normalize)).unsqueeze(1)
    label = torch.from_numpy(volume.label).unsqueeze(1)
    grid = [float(s) for s in volume.spacing]  # the spacing of the prepared grid (x, y, slice), mm
    if spacing:
        sx, sy = volume.spacing[0], volume.spacing[1]
        size = (max(1, round(image.shape[-2] * sx / spacing)), max(1, round(image.shape[-1] * sy / spacing)))
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            label = F.interpolate(label.float(), size=size, mode="nearest-exact").to(torch.uint8)
        grid[:2] = [volume.image.shape[1] * volume.spacing[0] / size[0],
                    volume.image.shape[2] * volume.spacing[1] / size[1]]
    image = crop_or_pad(image, image_size, fill=float(image.min()))
    label = crop_or_pad(label, image_size, fill=0)[:, 0]
    case = {"case": volume.case, "patient": volume.patient, "phase": volume.phase,
            "spacing": [float(s) for s in volume.spacing], "grid_spacing": grid, **volume.meta}
    return PreparedVolume(image.contiguous(), label.contiguous(), torch.from_numpy(volume.annotation().copy()), case)


def task_labels(label: torch.Tensor, task: str) -> torch.Tensor:
    """Project labels -> the task's classes 0..K (uint8)."""
    out = torch.zeros_like(label)
    for cls, value in enumerate(TASKS[task], start=1):
        out[label == value] = cls
    return out


def task_annotation_mask(task: str) -> int:
    """The annotation bits a slice must carry to be a training slice for ``task``."""
    return sum(annotation_bit(value) for value in TASKS[task])


def preprocess(volume: Volume, *, task: str, image_size: int, spacing: float | None, clip_percentiles,
               normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume -> (images (S, 1, size, size) float32, labels (S, size, size) uint8 task classes)."""
    prepared = prepare_volume(volume, image_size=image_size, spacing=spacing, clip_percentiles=clip_percentiles,
                              normalize=normalize)
    return prepared.image, task_labels(prepared.label, task)


def central_slices(num_slices: int, keep: int | None) -> slice:
    """The ``keep`` central slice indices of a stack (all when ``keep`` is None)."""
    if keep is None or keep >= num_slices:
        return slice(0, num_slices)
    start = (num_slices - keep) // 2
    return slice(start, start + keep)


def make_slice_set(volumes: list[PreparedVolume], *, task: str, max_slices_per_volume: int | None = None) -> SliceSet:
    """Stack the slices of prepared ``volumes`` that are annotated for ``task`` into one ``SliceSet``.

    A slice on which the task's structures were not all delineated is left out (its unmarked
    pixels are unknown, not background); a volume left with no slice is left out entirely.
    Then the ``max_slices_per_volume`` central slices of each volume are kept.
    """
    needed = task_annotation_mask(task)
    images, labels, index, cases = [], [], [], []
    for volume in volumes:
        annotated = (volume.annotated & needed) == needed
        if not annotated.any():
            continue
        image, label = volume.image, volume.label
        if not annotated.all():
            image, label = image[annotated], label[annotated]
        keep = central_slices(image.shape[0], max_slices_per_volume)
        images.append(image[keep])
        labels.append(task_labels(label[keep], task))
        index.append(torch.full((images[-1].shape[0],), len(cases), dtype=torch.int64))
        cases.append({**volume.case, "num_slices": images[-1].shape[0]})
    if not images:
        raise DataError(f"no volumes with slices annotated for task {task!r} to build a slice set from")
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(index), cases)


def split_patients(patients: list[str], *, seed: int, val_fraction: float,
                   test_fraction: float) -> dict[str, list[str]]:
    """Deterministic patient-level split (both frames of a patient stay together).

    Each of validation and test gets round(fraction * P) patients, at least one when its fraction
    is positive; the rest train. The order is a permutation of the sorted ids seeded by ``seed``.
    """
    unique = sorted(set(patients))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    sizes = {}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"data.{name}_fraction must be in [0, 1), got {fraction}")
        sizes[name] = max(1, round(fraction * len(unique))) if fraction > 0 else 0
    if sizes["test"] + sizes["val"] >= len(unique):
        raise DataError(f"only {len(unique)} patients: not enough for a training set besides "
                        f"{sizes['val']} validation and {sizes['test']} test patients")
    test, val = order[:sizes["test"]], order[sizes["test"]:sizes["test"] + sizes["val"]]
    return {"train": order[sizes["test"] + sizes["val"]:], "val": val, "test": test}
