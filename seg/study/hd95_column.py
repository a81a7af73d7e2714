"""The HD95 column of the study's table (paper_table.md): per cell, the mean ± std over its finished runs of
the test ``hd95`` (mm; metrics.json, the mean over classes of the per-class mean over test volumes). Runs of a
trainer without scipy have none: their cells read "—", and a table none of whose runs has one shows no
HD95 column."""

from __future__ import annotations

import math
import statistics


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hd95_text(cell) -> str:
    """The HD95 (mm) of a study table's cell (``tables.Cell``, or None for an empty one)."""
    values = [r["hd95"] for r in (cell.runs if cell else []) if r.get("status") == "ok" and number(r.get("hd95"))]
    if not values:
        return "—"
    return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def has_hd95(cells) -> bool:
    """Whether any run of the cells has a test HD95."""
    return any(number(r.get("hd95")) for c in cells for r in c.runs)
