"""The phantom's geometry primitives: signed distances of ellipses and blobs in millimetres, painting,
blurring and smooth fields (arrays slices-first)."""

from __future__ import annotations

import math

import numpy as np


# ----------------------------------------------------------------------------------------------
# Geometry primitives (millimetres; arrays slices-first, broadcast as (S, rows, columns))
# ----------------------------------------------------------------------------------------------

def _harmonics(c, s, coeffs):
    """sum_k a_k cos(k t) + b_k sin(k t), k = 1, 2, ..., from c = cos t and s = sin t."""
    total = 0.0
    ck, sk = c, s
    for k, (a, b) in enumerate(coeffs, start=1):
        if k > 1:
            ck, sk = ck * c - sk * s, sk * c + ck * s
        if a or b:
            total = total + a * ck + b * sk
    return total


def _sector(c, s, center: float, half_width: float):
    """Angular bump: 1 at angle ``center``, falling smoothly to 0 at +-``half_width`` (radians)."""
    cos_delta = c * math.cos(center) + s * math.sin(center)
    edge = math.cos(half_width)
    return np.clip((cos_delta - edge) / (1.0 - edge), 0.0, 1.0)


def _polar(du, dv):
    rho = np.sqrt(du * du + dv * dv) + np.float32(1e-3)
    return rho, du / rho, dv / rho


def _ellipse_radius(c, s, ax1, ax2):
    """Radius of an ellipse with semi-axes ``ax1`` (along angle 0) and ``ax2``, at angle (c, s)."""
    return ax1 * ax2 / np.sqrt((ax2 * c) ** 2 + (ax1 * s) ** 2)


def _blob_sd(U, V, cu, cv, ax1, ax2, phi=0.0, wobble=()):
    """Approximate signed distance (mm, negative inside) to a wobbly rotated ellipse.

    The radial distance to the boundary along the ray from the centre: exact for a circle and
    close enough for the soft edges of mildly eccentric shapes. Semi-axis ``ax1`` lies along
    angle ``phi``; ``wobble`` are (cos, sin) harmonic coefficients relative to the radius.
    """
    rho, c, s = _polar(U - cu, V - cv)
    if not (isinstance(phi, float) and phi == 0.0):
        cp, sp = np.cos(phi).astype(np.float32), np.sin(phi).astype(np.float32)
        c, s = c * cp + s * sp, s * cp - c * sp
    radius = _ellipse_radius(c, s, ax1, ax2)
    if wobble:
        radius = radius * (1.0 + _harmonics(c, s, wobble))
    return rho - radius


def _wobble(rng: np.random.Generator, amplitude: float, orders: int = 4, first: int = 2) -> list[tuple[float, float]]:
    """Random harmonic coefficients (decaying with order) for a shape outline; orders < first are 0."""
    return [(0.0, 0.0) if k < first else tuple(float(x) for x in rng.normal(0.0, amplitude / (k - first + 1), 2))
            for k in range(1, orders + 1)]


class _Canvas:
    """A slices-first float image on a millimetre grid, painted shape by shape with soft edges.

    Rows (x) run anterior -> posterior, columns (y) the patient's right -> left; both centred on 0.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: float):
        self.image = np.zeros(shape, np.float32)
        self.spacing = spacing
        self.v = ((np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing).astype(np.float32)
        self.u = ((np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing).astype(np.float32)

    def window(self, u_lo: float, u_hi: float, v_lo: float, v_hi: float):
        """Index slices and (1, 1, w) / (1, h, 1) coordinates of the pixels in a mm box (or None)."""
        sp = self.spacing
        j0 = max(0, int(math.floor((u_lo - self.u[0]) / sp)))
        j1 = min(len(self.u), int(math.ceil((u_hi - self.u[0]) / sp)) + 1)
        i0 = max(0, int(math.floor((v_lo - self.v[0]) / sp)))
        i1 = min(len(self.v), int(math.ceil((v_hi - self.v[0]) / sp)) + 1)
        if j1 <= j0 or i1 <= i0:
            return None
        return (slice(i0, i1), slice(j0, j1)), self.u[None, None, j0:j1], self.v[None, i0:i1, None]

    def blob(self, value: float, cu, cv, ax1, ax2, phi=0.0, wobble=(), present=None) -> None:
        """Paint a wobbly ellipse; centres/axes may be per-slice (S,) arrays; ``present`` (S,) bool."""
        cu, cv, ax1, ax2 = (np.asarray(a, np.float32) for a in (cu, cv, ax1, ax2))
        extent = float(np.max(np.maximum(ax1, ax2))) * (1.0 + sum(abs(a) + abs(b) for a, b in wobble)) \
            + 2 * self.spacing
        box = self.window(float(cu.min()) - extent, float(cu.max()) + extent,
                          float(cv.min()) - extent, float(cv.max()) + extent)
        if box is None:
            return
        (rows, cols), U, V = box
        shaped = [a.reshape(-1, 1, 1) if a.ndim else a for a in (cu, cv, ax1, ax2)]
        if not isinstance(phi, float):
            phi = np.asarray(phi, np.float32).reshape(-1, 1, 1)
        sd = _blob_sd(U, V, *shaped, phi=phi, wobble=wobble)
        if present is not None:
            sd = np.where(np.asarray(present).reshape(-1, 1, 1), sd, np.float32(1e4))
        _paint(self.image[:, rows, cols], sd, value, 1.0 / self.spacing)


def _paint(target: np.ndarray, sd: np.ndarray, value, inv_px: float) -> None:
    """Alpha-composite ``value`` into ``target`` (a view) with a one-pixel anti-aliased edge."""
    alpha = np.clip(np.float32(0.5) - sd * np.float32(inv_px), 0.0, 1.0)
    target += alpha * (value - target)


def _gaussian_blur(image: np.ndarray, sigma: float, mode: str = "edge") -> np.ndarray:
    """Separable Gaussian blur (sigma in pixels) of the last two axes; ``mode`` pads the borders."""
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = image
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode=mode)
        n = out.shape[axis]
        result = np.zeros_like(out)
        for k, weight in enumerate(taps):  # sum of shifted copies, one per kernel tap
            shifted = padded[..., k:k + n, :] if axis == -2 else padded[..., k:k + n]
            result += weight * shifted
        out = result
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random texture: white noise low-passed at ~6 mm and ~1.5 mm."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    fx = np.fft.fftfreq(shape[1]).astype(np.float32)[:, None]
    fy = np.fft.rfftfreq(shape[2]).astype(np.float32)[None, :]
    f2 = fx * fx + fy * fy
    coarse, fine = 6.0 / spacing, 1.5 / spacing
    # Gaussian low-passes scaled by their width have equal output variance: fine is half as strong.
    transfer = (np.exp(-2 * math.pi ** 2 * coarse ** 2 * f2) * coarse
                + 0.5 * np.exp(-2 * math.pi ** 2 * fine ** 2 * f2) * fine)
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape[1:]).astype(np.float32)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


