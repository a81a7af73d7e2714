"""The built-in phantom: synthetic short-axis cine MRI written in the ACDC layout.

Why: the trainer must run (and its tests must pass) without the real ACDC data, which needs a
registration. ``generate_phantom`` writes a deterministic dataset that the ACDC reader reads like
the real thing, and that is hard enough for a U-Net to have to learn anatomy -- not to threshold
bright circles on black.

What it models, per patient, in millimetres (so that sizes are right at any pixel spacing):

- a torso: an ellipse with a bright subcutaneous fat ring, darker chest-wall muscle and
  mediastinum, dark lungs on both sides with a few pulmonary vessels, ribs, a vertebra with its
  spinal canal, the descending aorta, and the liver rising into the apical slices;
- a heart whose position, rotation, tilt and size vary: an LV blood pool (bright) inside a
  myocardial ring 8-12 mm thick (dark grey), papillary muscles and trabeculae (dark, inside the
  pool), an RV crescent (bright) wrapped around the septum with a thin free wall, and patchy
  epicardial fat around both;
- 6-12 slices from base to apex: the cavities shrink towards the apex, the RV vanishes first, the
  most apical slice may show myocardium only; ED and ES states, ES with smaller cavities and a
  thicker wall (myocardial area is conserved, and the base descends); slight slice-to-slice
  misregistration as from separate breath-holds;
- five ACDC groups that change the anatomy: NOR normal, DCM dilated thin-walled poorly contracting
  LV, HCM small cavity and thick (septum-dominant) wall, MINF an akinetic thinned wall segment,
  RV a dilated, poorly contracting RV that flattens the septum;
- acquisition: partial-volume blur (Gaussian PSF), a smooth multiplicative coil bias field, smooth
  tissue texture, Rician noise (magnitude of complex Gaussian noise), matrix sizes 192-320 per
  side (rectangular fields of view) and in-plane spacings 1.2-1.9 mm;
- four vendors "A".."D" (``VENDORS``) with their own contrast, intensity scale, noise, bias, blur,
  matrix and spacing conventions -- a domain shift for train-on-some, test-on-another experiments.

Labels (ACDC's: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity including the papillary
muscles) are rasterized from the same shapes as the image, before blur and noise. Everything is
drawn from ``numpy.random.default_rng`` seeded by (seed, patient number): patient k is the same
whatever the number of patients, and no global random state is used.

This is a cartoon of a chest, not real anatomy: shapes are ellipses and smooth polar curves, the
physics is a few multiplications, and no claim is made that results on it transfer to patients.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..runtime.temporaries import temporary_path
from .phantom_anatomy import (GENERATOR_VERSION, GROUPS, VENDORS, VENDOR_NAMES, _Acquisition, _balanced_choice,
                              _draw_body, _draw_heart, _heart_state, _patient_rngs, _sample_acquisition,
                              _sample_body, _sample_heart, _uniform)
from .phantom_shapes import _Canvas, _gaussian_blur, _smooth_field

__all__ = ["GROUPS", "VENDORS", "generate_phantom"]


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

def generate_phantom(root: str | os.PathLike, num_patients: int = 100, seed: int = 0, *,
                     progress: bool = True) -> Path:
    """Write an ACDC-layout tree under ``root`` and return ``root``.

    ``root/database/training/patient001 ... patientNNN/`` each hold ``Info.cfg`` (ED, ES, Group,
    Height, NbFrame, Weight and the phantom-only ``Vendor``), the ED and ES frames
    ``patientXXX_frameYY.nii.gz`` (int16) with their ``_gt`` labels (uint8), and a short
    ``patientXXX_4d.nii.gz`` (x, y, slice, time) kept small since readers ignore it: systole only,
    frames 1, (1 + ES) / 2 and ES of the NbFrame-frame cine, the first and last identical to the
    ED and ES files. ``root/phantom.json`` marks the tree complete.

    The tree is written to a temporary sibling folder and renamed to ``root`` at the end, so an
    interrupted run never leaves a half tree at ``root``; one killed outright (SIGTERM, SIGKILL)
    leaves the temporary, ``<root>.tmp-<host>-<pid>-<token>``, which the next run removes
    (``seg.runtime.temporaries``). If a complete tree appeared at ``root``
    meanwhile (another process finished first), it is kept and this copy discarded.
    """
    if isinstance(num_patients, bool) or not isinstance(num_patients, (int, np.integer)) or num_patients < 1:
        raise ValueError(f"num_patients must be a positive integer, got {num_patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling (same file system, so the final rename is atomic), with the usual permissions; its
    # name carries this host and pid, so that a later run can remove it if this process is killed.
    tmp = temporary_path(root)
    tmp.mkdir()
    try:
        training = tmp / "database" / "training"
        training.mkdir(parents=True)
        # Patients are independent (each has its own random generator), so threads change the
        # speed, never the result; numpy's array maths and zlib release the GIL.
        workers = max(1, min(4, os.cpu_count() or 1, int(num_patients)))
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=int(num_patients), desc="Generating phantom", unit="patient",
                     disable=not progress) as bar:
            futures = [pool.submit(_write_patient, training, index, int(seed))
                       for index in range(1, int(num_patients) + 1)]
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        info = {"generator_version": GENERATOR_VERSION, "num_patients": int(num_patients), "seed": int(seed)}
        (tmp / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _publish(tmp: Path, root: Path) -> None:
    """Rename the finished ``tmp`` tree to ``root``; keep an existing complete tree instead."""
    if root.is_dir() and not any(root.iterdir()):
        try:
            root.rmdir()  # an empty folder (e.g. made by hand) is not a tree: replace it
        except OSError:
            pass
    try:
        os.replace(tmp, root)
        return
    except OSError:
        if not root.exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    if not (root / "phantom.json").is_file():
        raise FileExistsError(f"{root}: exists and is not a complete phantom (no phantom.json); "
                              f"move it away or choose another folder")


# ----------------------------------------------------------------------------------------------
# One patient: sample, render, write
# ----------------------------------------------------------------------------------------------

def _bias_field(rng: np.random.Generator, canvas: _Canvas, z: np.ndarray, strength: float,
                at: tuple[float, float]) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, (S, rows, cols), 1 at the point ``at`` mid-stack.

    The exponential of a random quadratic in (u, v) whose linear part drifts along the stack, with
    a bias towards the anterior surface coil; softly limited to a factor of about 2 either way.
    """
    k = [float(x) for x in rng.normal(0.0, strength, 7)]
    k[1] -= abs(float(rng.normal(0.0, strength)))  # surface coil on the chest: brighter in front

    def log_bias(u, v, zz):
        u, v = u / 150.0, v / 150.0
        return (k[0] * u + k[1] * v + k[2] * u * u + k[3] * v * v + k[4] * u * v
                + (zz - 0.5) * (k[5] * u + k[6] * v))

    field = log_bias(canvas.u[None, None, :], canvas.v[None, :, None], z.reshape(-1, 1, 1))
    field = field - log_bias(at[0], at[1], 0.5)
    return np.exp(0.7 * np.tanh(field / 0.7)).astype(np.float32)


def _cine_alphas(acq: _Acquisition) -> list[float]:
    """Cardiac state (0 ED .. 1 ES) of each frame stored in the 4D file: a smooth contraction."""
    steps = (acq.es_frame - 1) // acq.cine_step
    return [0.5 - 0.5 * math.cos(math.pi * j / steps) for j in range(steps + 1)]


def _synthesize_patient(index: int, seed: int) -> dict:
    """Everything for patient ``index``: Info.cfg values, spacing, ED/ES images and labels, 4D cine."""
    rng, noise_rng = _patient_rngs(seed, index)
    vendor = _balanced_choice(VENDOR_NAMES, seed, 1, index)
    group = _balanced_choice(GROUPS, seed, 2, index)
    height = float(np.clip(rng.normal(170.0, 9.0), 150.0, 198.0))
    bmi = float(np.clip(rng.normal(25.5, 4.0), 17.5, 38.0))
    weight = bmi * (height / 100.0) ** 2
    acq = _sample_acquisition(vendor, rng)
    # Placement (mm from the centre of the field of view): the field of view is centred near the
    # heart; the torso centre lies to the patient's right of and behind the LV.
    lv = (float(np.clip(rng.normal(0, 10), -25, 25)), float(np.clip(rng.normal(0, 10), -20, 20)))
    torso = (lv[0] - _uniform(rng, 20.0, 40.0), lv[1] + _uniform(rng, 22.0, 38.0))
    body = _sample_body(rng, torso, height, bmi, acq.shape[0])
    heart = _sample_heart(rng, lv, group, height, bmi, acq.shape[0])

    canvas = _Canvas(acq.shape, acq.spacing)
    _draw_body(canvas, body, acq.z, acq.contrast)
    texture = 1.0 + acq.texture * _smooth_field(rng, acq.shape, acq.spacing)
    bias = _bias_field(rng, canvas, acq.z, acq.bias, lv)
    # Signal chain: tissue values x texture -> blur (PSF) -> x coil bias x scale -> Rician noise.
    gain = bias * np.float32(acq.scale)
    static = _gaussian_blur(canvas.image * texture, acq.blur) * gain

    # The heart is drawn in a window around it; the image there is the background plus a blurred
    # difference (blur is linear), so the whole frame is blurred only once per patient.
    reach = (heart.r_endo + 1.6 * heart.wall + 3 * heart.fat
             + 1.35 * (heart.rv_thick + heart.rv_wall + heart.rv_fat * heart.fat + 1.5)
             + 2.5 + 3 * 1.5 + 4 * acq.blur * acq.spacing + 2 * acq.spacing)  # + jitter, ES shift, blur
    box = canvas.window(lv[0] - reach, lv[0] + reach + heart.tilt[0], lv[1] - reach + min(0.0, heart.tilt[1]),
                        lv[1] + reach)
    (rows, cols), U, V = box
    inv_px = 1.0 / acq.spacing

    def frame(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        raw = canvas.image[:, rows, cols].copy()
        label = np.zeros(acq.shape, np.uint8)
        _draw_heart(raw, label[:, rows, cols], U, V, heart, _heart_state(heart, acq.z, alpha), alpha,
                    acq.contrast, inv_px)
        delta = (raw - canvas.image[:, rows, cols]) * texture[:, rows, cols]
        image = static.copy()
        image[:, rows, cols] += _gaussian_blur(delta, acq.blur, mode="constant") * gain[:, rows, cols]
        # Rician noise: the magnitude of the signal plus complex Gaussian noise.
        noise = noise_rng.standard_normal((2, *acq.shape), dtype=np.float32)
        noise *= np.float32(acq.noise * acq.scale)
        image += noise[0]
        np.hypot(image, noise[1], out=image)
        np.rint(image, out=image)
        np.clip(image, 0, 32767, out=image)
        return image.astype(np.int16), label

    ed_image, ed_label = frame(0.0)
    es_image, es_label = frame(1.0)
    alphas = _cine_alphas(acq)
    cine = [ed_image] + [frame(alpha)[0] for alpha in alphas[1:-1]] + [es_image]
    info = {"ED": 1, "ES": acq.es_frame, "Group": group, "Height": round(height, 1), "NbFrame": acq.nb_frame,
            "Weight": round(weight, 1), "Vendor": vendor}
    return {"info": info, "acq": acq, "frames": {1: (ed_image, ed_label), acq.es_frame: (es_image, es_label)},
            "cine": cine}


def _to_nifti_order(volume: np.ndarray) -> np.ndarray:
    """(S, x, y) -> (x, y, S), as ACDC stores its volumes."""
    return np.transpose(volume, (1, 2, 0))


def _save(path: Path, array: np.ndarray, zooms: tuple[float, ...], time_unit: str = "unknown") -> None:
    import nibabel as nib  # imported here: only generating pays for it

    affine = np.diag([zooms[0], zooms[1], zooms[2], 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * z for n, z in zip(array.shape[:3], zooms[:3])]  # centred volume
    image = nib.Nifti1Image(array, affine)
    image.header.set_zooms(zooms)
    image.header.set_xyzt_units("mm", time_unit)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_patient(training: Path, index: int, seed: int) -> None:
    data = _synthesize_patient(index, seed)
    name = f"patient{index:03d}"
    folder = training / name
    folder.mkdir()
    acq = data["acq"]
    zooms = (acq.spacing, acq.spacing, acq.slice_spacing)
    for number, (image, label) in data["frames"].items():
        _save(folder / f"{name}_frame{number:02d}.nii.gz", _to_nifti_order(image), zooms)
        _save(folder / f"{name}_frame{number:02d}_gt.nii.gz", _to_nifti_order(label), zooms)
    cine = np.stack([_to_nifti_order(image) for image in data["cine"]], axis=-1)
    heart_period_ms = 60000.0 / 65.0
    _save(folder / f"{name}_4d.nii.gz", cine, (*zooms, heart_period_ms * acq.cine_step / acq.nb_frame), "msec")
    (folder / "Info.cfg").write_text("".join(f"{key}: {value}\n" for key, value in data["info"].items()))
