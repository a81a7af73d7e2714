"""seg-evaluate's tables beside its per-case table, as CSV and Markdown, and the Bland-Altman plot.

From the per-case rows (``Evaluation.volume_rows``; seg/evaluation/scores.py):

- **per phase x structure** (``<out>_phases.csv``): for each phase (ED, ES, then all volumes together;
  "—" for volumes whose phase the dataset does not give) and structure, the number of volumes, then the
  mean ± sample standard deviation (n - 1) of Dice, HD, HD95, ASSD and the volume error over the volumes
  where each is defined; the same per vendor where the cases have vendors (``vendor`` column; "all" for
  every vendor together);
- **clinical indices** (``<out>_clinical.csv``): per patient, predicted, true and error of each index
  (seg/evaluation/cardiac.py) the structures allow;
- **agreement** (``<out>_agreement.csv``): per index (and per vendor where there are vendors), n, Pearson r,
  bias, SD, 95% limits of agreement and MAE of predicted against true (seg/evaluation/agreement.py);
- ``<out>.md``: all of these and the per-case table in Markdown; ``<out>_bland_altman.png``: one panel per
  index (needs matplotlib, the ``study`` extra).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..data.volumes import DataError
from ..runtime.temporaries import temporary_path
from .agreement import agreement, plot_bland_altman
from .cardiac import UNITS, clinical_indices, indices_present, phase_of
from .files import Evaluation, format_score, write_rows
from .scores import mean_defined
from .surface import WITHOUT_SCIPY

GROUP_METRICS = ("dice", "hd", "hd95", "assd", "vol_error")
ALL = "all"


def output_paths(out: Path) -> dict[str, Path]:
    """Every file seg-evaluate writes for the per-case CSV ``out`` (``<stem>.csv``)."""
    stem = out.with_suffix("")
    return {"cases": out, "phases": Path(f"{stem}_phases.csv"), "clinical": Path(f"{stem}_clinical.csv"),
            "agreement": Path(f"{stem}_agreement.csv"), "markdown": Path(f"{stem}.md"),
            "plot": Path(f"{stem}_bland_altman.png")}


def mean_std(values) -> tuple[int, float, float]:
    """(n, mean, sample std) of the finite values; NaN mean below 1 value, NaN std below 2."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    mean = mean_defined(kept)
    return len(kept), mean, statistics.stdev(kept) if len(kept) > 1 else math.nan


def group_rows(rows: list[dict], classes: list[str], metrics: list[str], by_vendor: bool = False) -> list[dict]:
    """Per (vendor,) phase and structure: n volumes, then n, mean and std of each metric."""
    vendors = [ALL] + (sorted({row["vendor"] for row in rows if row["vendor"]}) if by_vendor else [])
    phases = sorted({phase_of(row["phase"]) or "—" for row in rows}, key=lambda p: ("ED", "ES", "—").index(p))
    result = []
    for vendor in vendors:
        of_vendor = [row for row in rows if vendor == ALL or row["vendor"] == vendor]
        for phase in [*phases, ALL] if len(phases) > 1 else phases:
            members = [row for row in of_vendor if phase == ALL or (phase_of(row["phase"]) or "—") == phase]
            if not members:
                continue
            for name in classes:
                entry = {**({"vendor": vendor} if by_vendor else {}), "phase": phase, "structure": name,
                         "volumes": len(members)}
                for metric in metrics:
                    n, mean, std = mean_std(row.get(f"{metric}_{name}") for row in members)
                    entry.update({f"{metric}_n": n, f"{metric}_mean": mean, f"{metric}_std": std})
                result.append(entry)
    return result


def agreement_rows(patients: list[dict], by_vendor: bool) -> list[dict]:
    """Per index (and vendor): the agreement statistics of predicted against true."""
    vendors = [ALL] + (sorted({p["vendor"] for p in patients if p["vendor"]}) if by_vendor else [])
    result = []
    for vendor in vendors:
        members = [p for p in patients if vendor == ALL or p["vendor"] == vendor]
        for index in indices_present(patients):
            stats = agreement([p.get(f"{index}_pred") for p in members], [p.get(f"{index}_true") for p in members])
            result.append({**({"vendor": vendor} if by_vendor else {}), "index": index, "unit": UNITS[index],
                           **stats.as_dict()})
    return result


def cell(mean: float, std: float, metric: str) -> str:
    if not math.isfinite(mean):
        return "—"
    return format_score(mean, metric) + (f" ± {format_score(std, metric)}" if math.isfinite(std) else "")


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def groups_markdown(groups: list[dict], metrics: list[str]) -> list[str]:
    keys = [key for key in ("vendor", "phase", "structure") if groups and key in groups[0]]
    units = {"dice": "", "hd": " (mm)", "hd95": " (mm)", "assd": " (mm)", "vol_error": " (ml)"}
    header = [*keys, "volumes", *(f"{metric}{units[metric]}" for metric in metrics)]
    return markdown_table(header, [[str(g[key]) for key in keys] + [str(g["volumes"])]
                                   + [cell(g[f"{m}_mean"], g[f"{m}_std"], m) for m in metrics] for g in groups])


def clinical_markdown(patients: list[dict], by_vendor: bool) -> list[str]:
    indices = indices_present(patients)
    header = ["patient", *(["vendor"] if by_vendor else []),
              *(f"{index} pred / true ({UNITS[index]})" for index in indices)]
    lines = []
    for p in patients:
        values = [f"{format_score(p.get(f'{i}_pred'), 'x')} / {format_score(p.get(f'{i}_true'), 'x')}" for i in indices]
        lines.append([p["patient"], *([p["vendor"] or "—"] if by_vendor else []), *values])
    return markdown_table(header, lines)


def agreement_markdown(rows: list[dict]) -> list[str]:
    keys = [key for key in ("vendor", "index") if rows and key in rows[0]]
    header = [*keys, "unit", "n", "Pearson r", "bias", "SD", "95% limits of agreement", "MAE"]
    lines = []
    for row in rows:
        number = [format_score(row[key], "x") for key in ("bias", "sd")]
        limits = (f"[{format_score(row['loa_low'], 'x')}, {format_score(row['loa_high'], 'x')}]"
                  if math.isfinite(row["sd"]) else "—")
        r = f"{row['r']:.3f}" if math.isfinite(row["r"]) else "—"
        lines.append([*(str(row[key]) for key in keys), row["unit"], str(row["n"]), r, *number, limits,
                      format_score(row["mae"], "x")])
    return markdown_table(header, lines)


def write_report(evaluation: Evaluation, out: Path) -> dict[str, Path | None]:
    """Write the per-case CSV ``out`` and the tables and plot beside it (``output_paths``); returns
    {what: path, or None for a plot that was not drawn}. The caller has checked that none exists."""
    paths = output_paths(out)
    rows = evaluation.volume_rows()
    by_vendor = evaluation.has_vendors
    metrics = [m for m in GROUP_METRICS if m in evaluation.metrics]
    groups = group_rows(rows, evaluation.classes, metrics)
    vendor_groups = group_rows(rows, evaluation.classes, metrics, by_vendor=True) if by_vendor else []
    try:
        patients = clinical_indices(rows, evaluation.classes)
    except ValueError as err:  # two volumes of one phase
        raise DataError(f"{err}; the clinical indices need one ED and one ES volume per patient") from None
    patients = [p for p in patients if len(p) > 2]  # patients with at least one index
    agreements = agreement_rows(patients, by_vendor)
    evaluation.write_csv(paths["cases"])
    write_rows(paths["phases"], vendor_groups if by_vendor else groups)  # by vendor: vendor "all" first
    if patients:
        write_rows(paths["clinical"], patients)
        write_rows(paths["agreement"], agreements)
    indices = indices_present(patients)
    plot = plot_bland_altman(paths["plot"], [(f"{i} ({UNITS[i]})", [p.get(f"{i}_pred") for p in patients],
                                               [p.get(f"{i}_true") for p in patients]) for i in indices],
                             title=f"Bland–Altman: predicted vs true, {len(patients)} patients") if indices else None
    lines = ["# Evaluation", "", "## Per case", "", evaluation.markdown(), "",
             "## Per phase and structure", "",
             "Mean ± sample SD over the volumes where each figure is defined (Dice: the structure in the "
             "prediction or the truth; distances: in both).", "", *groups_markdown(groups, metrics), ""]
    if by_vendor:
        lines += ["## Per vendor, phase and structure", "",
                  *groups_markdown([g for g in vendor_groups if g["vendor"] != ALL], metrics), ""]
    if patients:
        lines += ["## Clinical indices per patient", "", *clinical_markdown(patients, by_vendor), "",
                  "## Agreement of the clinical indices (predicted against true)", "",
                  "bias = mean(predicted − true); SD of the differences (n − 1); 95% limits of agreement = "
                  "bias ± 1.96 SD; MAE = mean |predicted − true|.", "", *agreement_markdown(agreements), ""]
        lines.append(f"Bland–Altman plot: {paths['plot'].name}" if plot else
                     "No Bland–Altman plot: it needs matplotlib (pip install -e '.[study]').")
    else:
        lines.append("No clinical index: they need a patient's ED and ES volumes (phases from Info.cfg or the "
                     "file names) and the LV, RV or myocardium among the classes.")
    if not evaluation.has_distances:
        lines.append(f"Note: {WITHOUT_SCIPY}.")
    temporary = temporary_path(paths["markdown"], keep_suffix=".md")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(paths["markdown"])
    written = {**paths, "plot": plot, **({} if patients else {"clinical": None, "agreement": None})}
    for what, path in paths.items():  # a file of an earlier evaluation (overwrite=true) not written this time
        if written[what] is None and path.exists():
            path.unlink()
    return written
