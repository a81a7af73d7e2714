"""Agreement between an index measured on the prediction and on the truth: correlation, bias, limits of
agreement (Bland & Altman, The Lancet 1986), and the Bland-Altman plot.

Over the patients where both values are defined (n of them), with d = predicted - true:

- **Pearson r** of predicted and true (NaN below 2 patients or when either side is constant);
- **bias** = mean(d); **SD** = the sample standard deviation of d (n - 1; NaN below 2 patients);
- **95% limits of agreement** = bias -/+ 1.96 SD;
- **MAE** = mean |d|.

The Bland-Altman plot puts each patient at ((predicted + true) / 2, d), with lines at the bias and the two
limits; one panel per index. It needs matplotlib (the ``study`` extra); without it no plot is drawn and
the caller says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.temporaries import temporary_path

LOA_FACTOR = 1.96
STATISTICS = ("n", "r", "bias", "sd", "loa_low", "loa_high", "mae")


@dataclass
class Agreement:
    """The agreement statistics of one index over n patients."""

    n: int
    r: float
    bias: float
    sd: float
    mae: float

    @property
    def loa_low(self) -> float:
        return self.bias - LOA_FACTOR * self.sd

    @property
    def loa_high(self) -> float:
        return self.bias + LOA_FACTOR * self.sd

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in STATISTICS}


def paired(predicted, true) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite numbers, as two float arrays."""
    p = np.asarray([np.nan if v is None else v for v in predicted], dtype=float)
    t = np.asarray([np.nan if v is None else v for v in true], dtype=float)
    keep = np.isfinite(p) & np.isfinite(t)
    return p[keep], t[keep]


def agreement(predicted, true) -> Agreement:
    """Pearson r, bias, SD of the differences and MAE of ``predicted`` against ``true`` (see the module)."""
    p, t = paired(predicted, true)
    d = p - t
    n = int(d.size)
    if n == 0:
        return Agreement(0, math.nan, math.nan, math.nan, math.nan)
    sd = float(np.std(d, ddof=1)) if n > 1 else math.nan
    r = math.nan
    if n > 1 and np.std(p) > 0 and np.std(t) > 0:
        r = float(np.corrcoef(p, t)[0, 1])
    return Agreement(n, r, float(d.mean()), sd, float(np.abs(d).mean()))


def plot_bland_altman(path: Path, panels: list[tuple[str, list, list]], title: str = "") -> Path | None:
    """A PNG of one Bland-Altman panel per (label, predicted values, true values); None when matplotlib is
    missing or no panel has a pair. Written to a temporary name and renamed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(label, *paired(p, t)) for label, p, t in panels]
    panels = [(label, p, t) for label, p, t in panels if p.size]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for axis, (label, p, t) in zip(axes.flat, panels):
        stats = agreement(p, t)
        axis.scatter((p + t) / 2, p - t, s=14, alpha=0.8)
        axis.axhline(stats.bias, color="black", linewidth=1)
        if math.isfinite(stats.sd):
            for limit in (stats.loa_low, stats.loa_high):
                axis.axhline(limit, color="grey", linestyle="--", linewidth=1)
        axis.axhline(0, color="lightgrey", linewidth=0.8, zorder=0)
        sd = f", SD {stats.sd:.2f}" if math.isfinite(stats.sd) else ""
        axis.set_title(f"{label}\nbias {stats.bias:+.2f}{sd} (n={stats.n})", fontsize=9)
        axis.set_xlabel("mean of predicted and true", fontsize=8)
        axis.set_ylabel("predicted − true", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    temporary = temporary_path(path, keep_suffix=".png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
    return path
