"""Contour-annotated DICOM datasets (Sunnybrook, RVSC): DICOM slices, contour files, masks, volumes.

These datasets ship one DICOM file per image (a slice at one time frame of a cine) and, for the
images an expert delineated, text files of ``x y`` points (pixel coordinates, x = column,
y = row). Here a contour is parsed and checked, rasterised into a mask with an even-odd
point-in-polygon test on pixel centres (pixel (row r, column c) has its centre at x = c, y = r,
as in the tools that drew them), and the annotated images of a patient are stacked into one
volume per cardiac frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .readers import read_text
from .volumes import DataError, Volume

DEFAULT_FRAMES_PER_SLICE = 20  # both Sunnybrook and RVSC cines have 20 phases per slice


@dataclass
class DicomImage:
    """The pixels (float32, rows x columns, modality LUT applied) and geometry of one DICOM file."""

    pixels: np.ndarray
    spacing: tuple[float, float, float]  # (row, column, slice) in mm; slice 0.0 when unknown
    frames_per_slice: int
    manufacturer: str
    path: Path
    location: float | None = None  # SliceLocation (mm), when the file has one


def import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise DataError("reading DICOM datasets (Sunnybrook, RVSC) needs pydicom: pip install pydicom") from None
    return pydicom


def read_dicom(path: Path) -> DicomImage:
    """One single-frame DICOM image; a missing, truncated or non-DICOM file, NaN pixels or no spacing are refused."""
    pydicom = import_pydicom()
    from pydicom.pixels import apply_modality_lut

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float32)
    except Exception as err:  # pydicom raises many types for a bad file
        raise DataError(f"{path}: not a readable DICOM image ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected one 2D image, found pixel data of shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: contains NaN or infinite pixels")
    spacing = dataset.get("PixelSpacing")
    if spacing is None or len(spacing) != 2 or not all(float(s) > 0 for s in spacing):
        raise DataError(f"{path}: no valid PixelSpacing (found {spacing!r}); masks cannot be resampled without it")
    between = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 0.0
    frames = int(dataset.get("CardiacNumberOfImages") or 0) or DEFAULT_FRAMES_PER_SLICE
    location = dataset.get("SliceLocation")
    return DicomImage(pixels, (float(spacing[0]), float(spacing[1]), float(between)), frames,
                      str(dataset.get("Manufacturer", "")), path, None if location is None else float(location))


def slice_step(images: list[AnnotatedImage]) -> float | None:
    """The distance between neighbouring slices from SliceLocation (median over the stack), None without it.

    This is the through-plane step, which can exceed SliceThickness (RVSC: 7 mm slices 8.4 mm
    apart, the step its official evaluation uses); slices further apart in the stack count by
    their index difference.
    """
    steps = []
    for first, second in zip(images, images[1:]):
        if first.dicom.location is None or second.dicom.location is None:
            return None
        apart = second.slice_index - first.slice_index
        if apart > 0:
            steps.append(abs(second.dicom.location - first.dicom.location) / apart)
    steps = [step for step in steps if step > 0]
    return float(np.median(steps)) if steps else None


def read_contour(path: Path) -> np.ndarray:
    """An ``x y`` per line contour file as (N, 2) float points; an unparseable line is refused naming it."""
    points = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            x, y = map(float, fields)  # ValueError for a non-number or a count other than two
        except ValueError:
            x = y = math.nan
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DataError(f"{path}: line {number} is not an 'x y' pair of numbers: {line.strip()!r}")
        points.append((x, y))
    if len(points) < 3:
        raise DataError(f"{path}: {len(points)} point(s); a contour needs at least 3")
    return np.asarray(points, dtype=np.float64)


def polygon_mask(points: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """Boolean (rows, columns) mask of the pixels whose centres lie inside the closed polygon ``points``.

    Even-odd rule: a horizontal ray from a pixel centre crosses the boundary an odd number of
    times iff the centre is inside. Only the polygon's bounding box is tested.
    """
    rows, cols = shape
    x, y = points[:, 0], points[:, 1]
    if x.min() < -1 or y.min() < -1 or x.max() > cols or y.max() > rows:
        raise DataError(f"{path}: contour points reach x {x.min():.1f}..{x.max():.1f}, "
                        f"y {y.min():.1f}..{y.max():.1f}, outside the {cols} x {rows} image")
    r0, r1 = max(0, math.floor(y.min())), min(rows, math.ceil(y.max()) + 1)
    c0, c1 = max(0, math.floor(x.min())), min(cols, math.ceil(x.max()) + 1)
    py, px = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    inside = np.zeros(py.shape, dtype=bool)
    for xa, ya, xb, yb in zip(x, y, np.roll(x, -1), np.roll(y, -1)):
        if ya == yb:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (ya > py) != (yb > py)
        inside ^= crosses & (px < xa + (py - ya) * (xb - xa) / (yb - ya))
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = inside
    if not mask.any():
        raise DataError(f"{path}: the contour encloses no pixel centre")
    return mask


@dataclass
class AnnotatedImage:
    """One delineated image: its pixels, project-label mask, which labels were drawn, and where it sits."""

    number: int  # the image number in its series (from the file names)
    dicom: DicomImage
    label: np.ndarray  # uint8, project labels
    annotated: int  # annotation bits of the labels drawn on it
    first_number: int = 1  # the number of the first image of the series (Sunnybrook 1, RVSC 0)

    @property
    def slice_index(self) -> int:
        return (self.number - self.first_number) // self.dicom.frames_per_slice

    @property
    def frame(self) -> int:
        return (self.number - self.first_number) % self.dicom.frames_per_slice


@dataclass
class PatientImages:
    """The annotated images of one patient, to be stacked into volumes."""

    patient: str
    cavity_label: int  # the label whose area tells end-diastole (largest) from end-systole
    meta: dict = field(default_factory=dict)
    images: list[AnnotatedImage] = field(default_factory=list)

    def volumes(self) -> list[Volume]:
        """One volume per annotated cardiac frame, slices in slice order (base to apex).

        The slice spacing is the step between slices from SliceLocation (``slice_step``), else
        SpacingBetweenSlices or SliceThickness.

        With exactly two annotated frames -- the datasets' ED and ES -- the one with the larger
        cavity is ED (end-diastole is the cavity's largest volume) and the other ES; otherwise each
        volume's phase is named ``frameNN``.
        """
        if not self.images:
            raise DataError(f"patient {self.patient}: no annotated image found")
        frames: dict[int, list[AnnotatedImage]] = {}
        for image in sorted(self.images, key=lambda im: im.number):
            frames.setdefault(image.frame, []).append(image)
        names = {frame: f"frame{frame:02d}" for frame in frames}
        if len(frames) == 2:
            area = {frame: sum(int((im.label == self.cavity_label).sum()) for im in group)
                    for frame, group in frames.items()}
            ed = max(area, key=area.get)
            names = {frame: "ED" if frame == ed else "ES" for frame in frames}
        volumes = []
        for frame, group in sorted(frames.items()):
            group.sort(key=lambda im: im.slice_index)
            shape = group[0].dicom.pixels.shape
            for image in group:
                if image.dicom.pixels.shape != shape:
                    raise DataError(f"{image.dicom.path}: image size {image.dicom.pixels.shape} differs from "
                                    f"{shape} of {group[0].dicom.path.name} in the same cine")
            spacing = group[0].dicom.spacing
            step = slice_step(group)
            if step is not None:
                spacing = (spacing[0], spacing[1], round(step, 4))
            volumes.append(Volume(image=np.stack([im.dicom.pixels for im in group]),
                                  label=np.stack([im.label for im in group]), spacing=spacing,
                                  patient=self.patient, phase=names[frame], meta={**self.meta, "frame": frame},
                                  source=str(group[0].dicom.path),
                                  annotated=np.array([im.annotated for im in group], dtype=np.uint8)))
        return volumes
