"""The phantom's anatomy: the vendors' acquisitions and the groups' hearts, the random streams of a patient,
and a torso and a heart sampled per patient and drawn slice by slice at ED and ES (seg/data/phantom.py
writes them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .phantom_shapes import _Canvas, _harmonics, _paint, _polar, _sector, _wobble


GENERATOR_VERSION = 1
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")

# Acquisition conventions per vendor. Intensities are relative to blood = 1 before ``scale``
# (the blood-pool value in the stored int16 units); ``noise`` is the Rician sigma relative to
# blood; ``bias`` the std of the coefficients of the log bias field; ``blur`` the PSF sigma in
# pixels; ``texture`` the amplitude of the smooth multiplicative tissue texture. The matrix is the
# field of view over the spacing, rounded to ``matrix_multiple`` and clipped to 192-320; the
# anterior-posterior (phase) side is ``phase_fov`` times the left-right one.
VENDORS: dict[str, dict] = {
    "A": {
        "scale": (170.0, 230.0), "noise": 0.040, "bias": 0.15, "blur": 0.55, "texture": 0.06,
        "spacing": (1.30, 1.50), "fov": (320.0, 380.0), "phase_fov": (0.80, 0.95), "matrix_multiple": 16,
        "slice_spacing": (8.0, 10.0),
        "contrast": {"blood": 1.0, "myocardium": 0.30, "fat": 0.90, "muscle": 0.27, "liver": 0.36,
                     "lung": 0.05, "marrow": 0.45, "csf": 0.85, "bone": 0.10},
    },
    "B": {
        "scale": (1800.0, 2600.0), "noise": 0.025, "bias": 0.25, "blur": 0.70, "texture": 0.05,
        "spacing": (1.45, 1.70), "fov": (340.0, 400.0), "phase_fov": (0.75, 0.875), "matrix_multiple": 8,
        "slice_spacing": (7.0, 9.0),
        "contrast": {"blood": 1.0, "myocardium": 0.22, "fat": 1.15, "muscle": 0.21, "liver": 0.30,
                     "lung": 0.03, "marrow": 0.60, "csf": 1.10, "bone": 0.06},
    },
    "C": {
        "scale": (500.0, 800.0), "noise": 0.070, "bias": 0.35, "blur": 0.50, "texture": 0.08,
        "spacing": (1.60, 1.90), "fov": (330.0, 380.0), "phase_fov": (1.0, 1.0), "matrix_multiple": 2,
        "slice_spacing": (9.0, 10.0),
        "contrast": {"blood": 1.0, "myocardium": 0.40, "fat": 0.72, "muscle": 0.36, "liver": 0.46,
                     "lung": 0.08, "marrow": 0.42, "csf": 0.80, "bone": 0.15},
    },
    "D": {
        "scale": (1000.0, 1400.0), "noise": 0.033, "bias": 0.10, "blur": 0.90, "texture": 0.05,
        "spacing": (1.20, 1.35), "fov": (330.0, 400.0), "phase_fov": (0.85, 1.0), "matrix_multiple": 32,
        "slice_spacing": (6.5, 8.0),
        "contrast": {"blood": 1.0, "myocardium": 0.33, "fat": 1.00, "muscle": 0.30, "liver": 0.40,
                     "lung": 0.05, "marrow": 0.50, "csf": 0.95, "bone": 0.08},
    },
}
VENDOR_NAMES = tuple(VENDORS)
MATRIX_RANGE = (192, 320)

# How each ACDC group shapes the heart (ranges sampled uniformly; lengths in mm, angles in degrees).
# r_endo: basal LV cavity radius at ED; wall: basal wall thickness at ED; ef: LV ejection fraction;
# rv_thick: RV cavity depth beyond the septum at the base at ED; rv_ef: RV ejection fraction;
# rv_horn: angle from the RV axis to the RV insertion points (half the extent of the crescent).
GROUP_HEARTS = {
    "NOR": {"r_endo": (22, 26), "wall": (8.0, 10.0), "ef": (0.55, 0.70), "rv_thick": (14, 20),
            "rv_ef": (0.45, 0.60), "rv_horn": (68, 84)},
    "MINF": {"r_endo": (25, 30), "wall": (8.5, 10.5), "ef": (0.25, 0.45), "rv_thick": (13, 19),
             "rv_ef": (0.35, 0.55), "rv_horn": (68, 84)},
    "DCM": {"r_endo": (30, 36), "wall": (7.0, 8.5), "ef": (0.12, 0.35), "rv_thick": (14, 21),
            "rv_ef": (0.25, 0.45), "rv_horn": (70, 86)},
    "HCM": {"r_endo": (17, 22), "wall": (11.5, 15.0), "ef": (0.65, 0.80), "rv_thick": (12, 18),
            "rv_ef": (0.50, 0.65), "rv_horn": (64, 78)},
    "RV": {"r_endo": (20, 25), "wall": (8.0, 10.0), "ef": (0.50, 0.65), "rv_thick": (24, 34),
           "rv_ef": (0.20, 0.40), "rv_horn": (84, 100)},
}


# ----------------------------------------------------------------------------------------------
# Random streams and per-patient choices
# ----------------------------------------------------------------------------------------------

def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _patient_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators for patient ``index``: anatomy/acquisition, and image noise."""
    anatomy, noise = np.random.SeedSequence([seed, 0, index]).spawn(2)
    return np.random.default_rng(anatomy), np.random.default_rng(noise)


def _balanced_choice(options: tuple[str, ...], seed: int, stream: int, index: int) -> str:
    """Option of patient ``index`` (1-based): every block of len(options) patients holds each once."""
    block, position = divmod(index - 1, len(options))
    order = np.random.default_rng([seed, stream, block]).permutation(len(options))
    return options[int(order[position])]


def _round_matrix(size: float, multiple: int) -> int:
    size = int(round(size / multiple)) * multiple
    return int(np.clip(size, *MATRIX_RANGE))


@dataclass
class _Acquisition:
    vendor: str
    shape: tuple[int, int, int]   # (slices, x = anterior->posterior rows, y = right->left columns)
    spacing: float                # in-plane, mm
    slice_spacing: float          # mm
    z: np.ndarray                 # (S,) position of each slice along the LV: 0 base, ~1 apex
    scale: float
    noise: float
    blur: float
    texture: float
    bias: float
    contrast: dict
    nb_frame: int
    es_frame: int
    cine_step: int                # the 4D file holds frames 1, 1 + step, 1 + 2 step = ES


def _sample_acquisition(vendor: str, rng: np.random.Generator) -> _Acquisition:
    spec = VENDORS[vendor]
    spacing = round(_uniform(rng, *spec["spacing"]), 4)
    ny = _round_matrix(_uniform(rng, *spec["fov"]) / spacing, spec["matrix_multiple"])
    nx = _round_matrix(ny * _uniform(rng, *spec["phase_fov"]), spec["matrix_multiple"])
    slice_spacing = round(_uniform(rng, *spec["slice_spacing"]) * 2) / 2
    # The stack ends near the apex and climbs towards the base; at most 12 slices, so a fine
    # slice spacing on a long ventricle leaves the base uncovered (as a short stack would).
    lv_length = _uniform(rng, 65.0, 90.0)
    dz = slice_spacing / lv_length
    z_last = _uniform(rng, 0.92, 1.0)
    num_slices = int(np.clip(math.floor((z_last + 0.05) / dz) + 1, 6, 12))
    z = z_last - dz * np.arange(num_slices - 1, -1, -1)
    contrast = {name: value * (1.0 if name == "blood" else _uniform(rng, 0.9, 1.1))
                for name, value in spec["contrast"].items()}
    # The cine: 25-30 frames, ES at 32-42 % of the cycle; the 4D file stores systole in two equal
    # steps (so ES - 1 is even).
    nb_frame = int(rng.integers(25, 31))
    to_es = 2 * int(round(nb_frame * _uniform(rng, 0.16, 0.21)))
    return _Acquisition(
        vendor=vendor, shape=(num_slices, nx, ny), spacing=spacing, slice_spacing=slice_spacing,
        z=z.astype(np.float32), scale=_uniform(rng, *spec["scale"]), noise=spec["noise"] * _uniform(rng, 0.8, 1.25),
        blur=spec["blur"] * _uniform(rng, 0.85, 1.15), texture=spec["texture"], bias=spec["bias"],
        contrast=contrast, nb_frame=nb_frame, es_frame=1 + to_es, cine_step=to_es // 2)


# ----------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------

@dataclass
class _Body:
    """The static chest (does not move between cardiac phases)."""
    center: tuple[float, float]    # torso centre (u, v), mm
    half_width: float              # torso semi-axes (left-right, anterior-posterior), mm
    half_depth: float
    fat: float                     # subcutaneous fat thickness, mm
    params: dict                   # everything else, sampled once


@dataclass
class _Heart:
    group: str
    center: tuple[float, float]    # LV centre at the base (u, v), mm
    tilt: tuple[float, float]      # LV centre displacement from base to apex, mm
    jitter: np.ndarray             # (S, 2) per-slice breath-hold misregistration, mm
    shift: tuple[float, float]     # LV centre displacement from ED to ES, mm
    theta_rv: float                # direction LV -> RV, radians (image coordinates)
    twist: float                   # change of theta_rv from base to apex, radians
    r_endo: float
    wall: float
    z_endo: float                  # ventricular coordinate where the LV cavity closes
    z_epi: float                   # ... where the myocardium ends (beyond the apex of the stack)
    shape_power: float             # profile exponent: 2 ellipsoid, larger more cylindrical
    k_es: float                    # ES / ED cavity radius ratio
    descent: float                 # base descent at ES, as a fraction of the LV length
    rv_thick: float
    rv_k_es: float
    rv_horn: float                 # radians
    rv_skew: float                 # asymmetry of the crescent (thicker towards one insertion)
    z_rv: float                    # ventricular coordinate where the RV ends
    rv_wall: float
    endo_wobble: list
    wall_wobble: list
    fat: float                     # epicardial fat thickness scale, mm
    fat_wobble: list
    rv_fat: float
    septal_flattening: float       # RV group: D-shaped LV
    septal_boost: float            # HCM: thicker septum
    infarct: tuple | None          # MINF: (angle, half width, depth, z from, z to)
    papillary: list                # [(angle, radius mm)] x 2
    trabeculae: list               # [(angle, radius mm, presence (S,) bool)]
    rv_trabeculae: list            # [(offset angle, radius mm, presence (S,) bool)]
    rv_blood: float                # RV blood relative to LV blood (flow)


def _sample_body(rng: np.random.Generator, center: tuple[float, float], height: float, bmi: float,
                 num_slices: int) -> _Body:
    size = (height / 170.0) ** 0.5 * (bmi / 25.0) ** 0.35
    half_width = 165.0 * size * _uniform(rng, 0.95, 1.05)
    half_depth = half_width * _uniform(rng, 0.62, 0.72)
    fat = float(np.clip(4.0 + (bmi - 18.0) * 1.2, 4.0, 32.0)) * _uniform(rng, 0.8, 1.2)
    inner_d = half_depth - fat
    r_vertebra = _uniform(rng, 14.0, 18.0)
    vertebra_v = inner_d - _uniform(rng, 30.0, 38.0) - r_vertebra
    r_aorta = _uniform(rng, 10.0, 13.5)
    params = {
        "torso_wobble": _wobble(rng, 0.03),
        "inner_wobble": [(0.0, -_uniform(rng, 0.0, 0.04))] + _wobble(rng, 0.04)[1:],  # more fat at the back
        "lungs": [  # (centre u, centre v, semi-axis u, semi-axis v) as fractions of the inner torso
            (-_uniform(rng, 0.45, 0.50), _uniform(rng, 0.0, 0.10), _uniform(rng, 0.40, 0.44),
             _uniform(rng, 0.68, 0.76)),
            (_uniform(rng, 0.48, 0.54), _uniform(rng, 0.05, 0.15), _uniform(rng, 0.38, 0.42),
             _uniform(rng, 0.64, 0.72)),
        ],
        "lung_wobble": [_wobble(rng, 0.05), _wobble(rng, 0.05)],
        "vessels": [],
        "ribs": [],
        "liver": (_uniform(rng, 0.40, 0.70), _uniform(rng, -0.40, -0.30), _uniform(rng, 0.28, 0.40),
                  _uniform(rng, 0.45, 0.55), _uniform(rng, 0.50, 0.60), _wobble(rng, 0.05)),
        "vertebra": (_uniform(rng, -6.0, 6.0), vertebra_v, r_vertebra, _uniform(rng, 6.0, 8.0)),
        # the descending aorta lies left-anterolateral of the vertebral body
        "aorta": (r_vertebra + r_aorta * _uniform(rng, 0.4, 0.9), -_uniform(rng, 0.5, 1.0) * r_vertebra, r_aorta,
                  _uniform(rng, 0.75, 0.95)),
    }
    for lung in range(2):  # pulmonary vessels: small greyish dots, different in each slice
        for _ in range(int(rng.integers(6, 11))):
            angle, radius = _uniform(rng, 0, 2 * math.pi), math.sqrt(_uniform(rng, 0.0, 0.6))
            params["vessels"].append((lung, radius * math.cos(angle), radius * math.sin(angle),
                                      _uniform(rng, 1.2, 3.5), rng.random(num_slices) < 0.6,
                                      rng.normal(0.0, 0.05, 2)))
    for k in range(int(rng.integers(8, 13))):  # ribs (and the sternum on top) inside the fat ring
        angle = -math.pi / 2 + (k + _uniform(rng, -0.3, 0.3)) * 2 * math.pi / 12
        if abs(math.sin(angle) - 1.0) < 0.15:
            continue  # none over the spine
        params["ribs"].append((angle, _uniform(rng, 3.0, 7.0), _uniform(rng, 4.0, 7.0), _uniform(rng, 2.5, 4.0),
                               rng.random(num_slices) < 0.55))
    return _Body(center=center, half_width=half_width, half_depth=half_depth, fat=fat, params=params)


def _sample_heart(rng: np.random.Generator, center: tuple[float, float], group: str, height: float, bmi: float,
                  num_slices: int) -> _Heart:
    g = GROUP_HEARTS[group]
    size = (height / 170.0) ** 0.4
    ef = _uniform(rng, *g["ef"])
    descent = _uniform(rng, 0.04, 0.08) if ef < 0.4 else _uniform(rng, 0.08, 0.14)
    theta_rv = math.pi + _uniform(rng, 0.05, 0.6)
    papillary = [(math.pi + side * _uniform(rng, 0.6, 1.0), _uniform(rng, 3.5, 5.0) * (1.3 if group == "HCM" else 1.0))
                 for side in (-1, 1)]
    trabeculae = [(_uniform(rng, 0, 2 * math.pi), _uniform(rng, 1.3, 2.2), rng.random(num_slices) < 0.5)
                  for _ in range(int(rng.integers(3, 7)))]
    rv_trabeculae = [(_uniform(rng, -0.4, 0.4), _uniform(rng, 1.5, 2.8), rng.random(num_slices) < 0.6)
                     for _ in range(int(rng.integers(1, 3)))]
    infarct = None
    if group == "MINF":
        z_from = _uniform(rng, 0.0, 0.5)
        infarct = (_uniform(rng, math.radians(60), math.radians(300)), math.radians(_uniform(rng, 30, 50)),
                   _uniform(rng, 0.4, 0.6), z_from, z_from + _uniform(rng, 0.4, 0.8))
    z_endo = _uniform(rng, 0.90, 0.98)
    return _Heart(
        group=group, center=center,
        tilt=(_uniform(rng, 0.0, 10.0), _uniform(rng, -8.0, 2.0)),
        jitter=np.clip(rng.normal(0.0, 1.0, (num_slices, 2)), -2.5, 2.5),
        shift=(float(rng.normal(0, 1.5)), float(rng.normal(0, 1.5))),
        theta_rv=theta_rv, twist=_uniform(rng, -0.25, 0.25),
        r_endo=_uniform(rng, *g["r_endo"]) * size, wall=_uniform(rng, *g["wall"]),
        z_endo=z_endo, z_epi=z_endo + _uniform(rng, 0.12, 0.2),
        shape_power=_uniform(rng, 2.5, 3.5) if group == "DCM" else _uniform(rng, 2.0, 2.8),
        k_es=math.sqrt((1.0 - ef) / (1.0 - descent)), descent=descent,
        rv_thick=_uniform(rng, *g["rv_thick"]) * size,
        rv_k_es=math.sqrt(1.0 - _uniform(rng, *g["rv_ef"])),
        rv_horn=math.radians(_uniform(rng, *g["rv_horn"])), rv_skew=_uniform(rng, -0.3, 0.3),
        z_rv=_uniform(rng, 0.70, 0.86), rv_wall=_uniform(rng, 3.0, 4.0) * (1.4 if group == "RV" else 1.0),
        endo_wobble=_wobble(rng, 0.035), wall_wobble=_wobble(rng, 0.08, orders=3, first=1),
        fat=float(np.clip(1.0 + (bmi - 18.0) * 0.3, 1.0, 7.0)) * _uniform(rng, 0.7, 1.3),
        fat_wobble=_wobble(rng, 0.5, orders=4, first=1), rv_fat=_uniform(rng, 0.5, 2.0),
        septal_flattening=_uniform(rng, 0.06, 0.14) if group == "RV" else 0.0,
        septal_boost=_uniform(rng, 0.25, 0.5) if group == "HCM" else 0.0,
        infarct=infarct, papillary=papillary, trabeculae=trabeculae, rv_trabeculae=rv_trabeculae,
        rv_blood=_uniform(rng, 0.92, 1.02))


def _profile(z: np.ndarray, end: float, power: float) -> np.ndarray:
    """Radius factor along the LV: 1 at the base (z <= 0), 0 at ``end``; a superellipse in between."""
    t = np.clip(z / end, 0.0, 1.0)
    return (1.0 - t ** power) ** (1.0 / power)


def _heart_state(h: _Heart, z: np.ndarray, alpha: float) -> dict:
    """Per-slice (S,) geometry at cardiac state ``alpha`` (0 ED, 1 ES)."""
    descent = alpha * h.descent
    zv = np.clip((z - descent) / (1.0 - descent), 0.0, None)      # ventricular coordinate
    r_endo_ed = h.r_endo * _profile(zv, h.z_endo, h.shape_power)
    r_epi_ed = (h.r_endo + h.wall) * _profile(zv, h.z_epi, h.shape_power)
    r_endo = r_endo_ed * (1.0 + alpha * (h.k_es - 1.0))
    # Myocardium is incompressible: the ring keeps its area, grown by the longitudinal shortening.
    ring = (r_epi_ed ** 2 - r_endo_ed ** 2) / (1.0 - descent)
    wall = np.sqrt(r_endo ** 2 + ring) - r_endo
    rv_profile = np.clip(1.0 - (zv / h.z_rv) ** 2, 0.0, None) ** 0.7
    rv_thick = h.rv_thick * (1.0 + alpha * (h.rv_k_es - 1.0)) * rv_profile
    cu = h.center[0] + h.tilt[0] * z + h.jitter[:, 0] + alpha * h.shift[0]
    cv = h.center[1] + h.tilt[1] * z + h.jitter[:, 1] + alpha * h.shift[1]
    return {"zv": zv, "cu": cu, "cv": cv, "r_endo": r_endo, "wall": wall, "wall_ed": r_epi_ed - r_endo_ed,
            "rv_thick": rv_thick, "theta_rv": h.theta_rv + h.twist * z}


def _draw_heart(image: np.ndarray, label: np.ndarray, U, V, h: _Heart, g: dict, alpha: float,
                c: dict, inv_px: float) -> None:
    """Paint the heart at state ``g`` into the window ``image``/``label`` (views) with coordinates U, V."""
    def col(a):  # per-slice (S,) -> broadcastable (S, 1, 1) float32
        return np.asarray(a, np.float32).reshape(-1, 1, 1)

    cu, cv, theta = col(g["cu"]), col(g["cv"]), col(g["theta_rv"])
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    du, dv = U - cu, V - cv
    rho, c0, s0 = _polar(du, dv)
    # angle measured from the RV axis (the septum is at angle 0)
    cr, sr = c0 * cos_t + s0 * sin_t, s0 * cos_t - c0 * sin_t

    # --- LV outlines as functions of angle ---
    r_endo = col(g["r_endo"]) * (1.0 + _harmonics(cr, sr, h.endo_wobble))
    if h.septal_flattening:
        r_endo = r_endo * (1.0 - h.septal_flattening * _sector(cr, sr, 0.0, math.radians(55)))
    wall = col(g["wall"]) * (1.0 + _harmonics(cr, sr, h.wall_wobble))
    if h.septal_boost:
        wall = wall * (1.0 + h.septal_boost * _sector(cr, sr, 0.0, math.radians(65)))
    if h.infarct is not None:  # thinned and akinetic: keeps its (thinned) ED thickness at ES
        angle, half_width, depth, z_from, z_to = h.infarct
        inside = col((g["zv"] >= z_from) & (g["zv"] <= z_to)) * _sector(cr, sr, angle, half_width)
        wall = wall + inside * (col(g["wall_ed"]) * (1.0 - depth) - wall)
    r_epi = r_endo + wall
    # Epicardial fat: patchy, absent in places (a small negative offset keeps it off the bare wall).
    fat = h.fat * np.clip(0.3 + 1.5 * _harmonics(cr, sr, h.fat_wobble), 0.0, 3.0) - 0.8

    # --- RV: a crescent hugging the LV epicardium on the septal side, thickest on the RV axis and
    # tapering to the insertion points at +-horn (narrower towards the apex) ---
    depth = col(g["rv_thick"])
    present = depth >= 2.5
    horn = h.rv_horn * (0.7 + 0.3 * np.clip(depth / h.rv_thick, 0.0, 1.0))
    off_axis = np.arctan2(sr, cr)                       # angle from the RV axis, radians
    r_mean = col(g["r_endo"] + g["wall"])

    def rv_sd(grow):
        """Signed distance to the RV outline grown by ``grow`` mm (0: the cavity)."""
        x = off_axis / (horn + grow / r_mean)
        taper = np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0)) * (1.0 + h.rv_skew * x)
        margin = 1.5  # pulls the outline inside the LV beyond the horns (no rim around the LV)
        return np.where(present, rho - (r_epi + (depth + grow + margin) * taper - margin), np.float32(1e4))

    def disk_sd(center_u, center_v, radius, on):
        return np.where(col(on), np.sqrt((U - col(center_u)) ** 2 + (V - col(center_v)) ** 2) - col(radius),
                        np.float32(1e4))

    # --- paint, outermost first ---
    grow_fat = h.rv_wall + h.rv_fat * fat   # patchy too (negative where the LV has none)
    _paint(image, rho - (r_epi + fat), c["fat"], inv_px)                    # epicardial fat
    _paint(image, rv_sd(grow_fat), c["fat"], inv_px)
    _paint(image, rv_sd(h.rv_wall), c["myocardium"], inv_px)                # RV free wall
    sd_rv = rv_sd(0.0)
    _paint(image, sd_rv, c["blood"] * h.rv_blood, inv_px)                   # RV cavity
    for angle, radius, on in h.rv_trabeculae:                              # RV trabeculae
        dist = g["r_endo"] + g["wall"] + 0.55 * g["rv_thick"]
        ang = g["theta_rv"] + angle * 0.6
        _paint(image, disk_sd(g["cu"] + dist * np.cos(ang), g["cv"] + dist * np.sin(ang), radius,
                              on & (g["rv_thick"] > 8.0)), c["myocardium"], inv_px)
    sd_epi = rho - r_epi
    _paint(image, sd_epi, c["myocardium"], inv_px)                         # LV myocardium
    sd_endo = rho - r_endo
    _paint(image, sd_endo, c["blood"], inv_px)                             # LV blood pool
    window = np.clip(np.sin(math.pi * (g["zv"] - 0.1) / 0.8), 0.0, None) ** 0.5
    for angle, radius in h.papillary:                                       # papillary muscles
        r_pm = np.minimum(radius * window * (1.0 + 0.3 * alpha), 0.35 * g["r_endo"])
        dist = g["r_endo"] - 0.45 * r_pm
        ang = g["theta_rv"] + angle
        _paint(image, disk_sd(g["cu"] + dist * np.cos(ang), g["cv"] + dist * np.sin(ang), r_pm, r_pm > 1.0),
               c["myocardium"], inv_px)
    for angle, radius, on in h.trabeculae:                                 # endocardial trabeculae
        dist = g["r_endo"] - 0.3 * radius
        ang = g["theta_rv"] + angle
        _paint(image, disk_sd(g["cu"] + dist * np.cos(ang), g["cv"] + dist * np.sin(ang), radius,
                              on & (g["zv"] > 0.3) & (g["r_endo"] > 4 * radius)), c["myocardium"], inv_px)

    # Labels: the same outlines, before any blur (LV cavity includes papillary muscles/trabeculae).
    np.putmask(label, sd_rv < 0, 1)
    np.putmask(label, sd_epi < 0, 2)
    np.putmask(label, sd_endo < 0, 3)


def _draw_body(canvas: _Canvas, body: _Body, z: np.ndarray, c: dict) -> None:
    """Paint the static chest: torso, fat ring, ribs, lungs and vessels, liver, spine, aorta."""
    p = body.params
    tu, tv = body.center
    iw, idp = body.half_width - body.fat, body.half_depth - body.fat
    canvas.blob(c["fat"], tu, tv, body.half_width, body.half_depth, wobble=p["torso_wobble"])
    canvas.blob(c["muscle"], tu, tv, iw, idp, wobble=p["inner_wobble"])
    shrink = 1.0 - 0.2 * z                                     # lungs shrink towards the diaphragm
    for (fu, fv, au, av), wob in zip(p["lungs"], p["lung_wobble"]):
        canvas.blob(c["lung"], tu + fu * iw, tv + fv * idp, au * iw * shrink, av * idp * shrink, wobble=wob)
    for lung, fu, fv, radius, present, drift in p["vessels"]:
        lu, lv, au, av = p["lungs"][lung]
        cu = tu + (lu + au * fu) * iw + drift[0] * iw * np.arange(len(z))
        cv = tv + (lv + av * fv) * idp * shrink + drift[1] * idp * np.arange(len(z))
        canvas.blob(c["blood"] * 0.35, cu, cv, radius, radius, present=present)
    for angle, depth, length, width, present in p["ribs"]:
        ru, rv = (iw - depth) * math.cos(angle), (idp - depth) * math.sin(angle)
        canvas.blob(c["bone"], tu + ru, tv + rv, length, width, phi=angle + math.pi / 2, present=present)
    z_from, fu, fv, au, av, wob = p["liver"]
    grow = np.clip((z - z_from) / 0.5, 0.0, 1.0) ** 0.5
    canvas.blob(c["liver"], tu + fu * iw, tv + (1.0 - fv) * idp - av * idp * grow, au * iw * grow + 0.01,
                av * idp * grow + 0.01, wobble=wob, present=grow > 0.05)
    vu, vv, r_vertebra, r_canal = p["vertebra"]
    canvas.blob(c["bone"], tu + vu, tv + vv, r_vertebra + 1.5, r_vertebra + 1.0)
    canvas.blob(c["marrow"], tu + vu, tv + vv, r_vertebra, r_vertebra * 0.85)
    canvas.blob(c["bone"], tu + vu, tv + vv + r_vertebra + r_canal + 2.0, r_canal + 2.0, r_canal + 2.0)
    canvas.blob(c["csf"], tu + vu, tv + vv + r_vertebra + r_canal + 2.0, r_canal, r_canal)
    canvas.blob(c["muscle"] * 1.3, tu + vu, tv + vv + r_vertebra + r_canal + 2.0, r_canal * 0.55, r_canal * 0.5)
    au_, av_, r_aorta, brightness = p["aorta"]
    canvas.blob(c["blood"] * brightness, tu + vu + au_, tv + vv + av_, r_aorta, r_aorta)


