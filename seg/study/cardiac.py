"""The layers compared on what a cardiologist reads (comparison_cardiac.md / .csv): the error of the ejection
fraction and the HD95, beside the Dice of comparison.md, paired by patient as the Dice comparison is.

Per run and test patient, from metrics.json's ``per_volume`` (seg/evaluation/per_volume.py):

- ``hd95``: the mean over the patient's volumes of the volume's HD95 (mm; the mean over its classes where
  defined);
- ``ef_error``: the mean over the ventricles the task has (LV, RV) of |EF predicted - EF true| (percentage
  points; seg/evaluation/cardiac.py), from the patient's ED and ES volumes;
- ``dice``: the mean Dice of its volumes (comparison.md's unit).

Lower is better for ``hd95`` and ``ef_error``. The runs are those chosen on validation (``select_by_validation``),
grouped as comparison.md groups them (every factor but norm and learning rate). Per group and metric: each
layer's mean over patients (its replicate runs averaged per patient); pairs A - B on the patients both
runs of a fold and seed tested, averaged per patient, two-sided Wilcoxon with Holm's correction over the
group's pairs (seg/study/stats.py); average ranks over the blocks (fold x seed; 1 = lowest error) with
Friedman's test.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from ..evaluation.cardiac import clinical_indices
from .runs import show
from .stats import ALPHA, Paired, friedman_p, per_unit, ranks, replicate_key, set_holm
from .tables import complete_settings, column_sort_key, hashable, is_number, norm_sort_key, select_by_validation

METRICS = {"ef_error": ("|EF error|", "percentage points"), "hd95": ("HD95", "mm"), "dice": ("Dice", "")}
LOWER_IS_BETTER = {"ef_error": True, "hd95": True, "dice": False}


def run_patients(run: dict, metric: str) -> dict[str, float] | None:
    """{patient: value} of a finished run's test patients with a defined value; None without per_volume."""
    rows = run.get("per_volume")
    if run.get("status") != "ok" or not isinstance(rows, list):
        return None
    rows = [row for row in rows if isinstance(row, dict) and row.get("case") is not None]
    values: dict[str, list[float]] = {}
    if metric == "ef_error":
        classes = sorted({key[len("vol_true_"):] for row in rows for key in row if key.startswith("vol_true_")})
        try:
            patients = clinical_indices(rows, classes)
        except ValueError:
            return {}
        for p in patients:
            errors = [abs(p[f"{v}_ef_error"]) for v in ("lv", "rv") if is_number(p.get(f"{v}_ef_error"))]
            if errors:
                values[p["patient"]] = [statistics.fmean(errors)]
    else:
        for row in rows:
            if metric == "dice":
                value = row.get("dice")
            else:
                found = [v for k, v in row.items() if k.startswith(f"{metric}_") and is_number(v)]
                value = statistics.fmean(found) if found else None
            if is_number(value):
                values.setdefault(str(row.get("patient") or row["case"]), []).append(value)
    return {patient: statistics.fmean(v) for patient, v in values.items()}


def layer_means(runs: list[dict], metric: str) -> dict[str, float]:
    """{patient: mean over the runs that tested it}."""
    sums: dict[str, list[float]] = {}
    for run in runs:
        for patient, value in (run_patients(run, metric) or {}).items():
            sums.setdefault(patient, []).append(value)
    return {patient: statistics.fmean(v) for patient, v in sums.items()}


def pair(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict], metric: str) -> Paired:
    """A - B per (seed, patient) unit over the runs sharing fold and seed, as the Dice comparison pairs them."""
    differences = {}
    for run_a in runs_a:
        values_a = run_patients(run_a, metric)
        for run_b in (r for r in runs_b if replicate_key(r) == replicate_key(run_a)):
            values_b = run_patients(run_b, metric)
            if values_a is None or values_b is None:
                continue
            for patient in values_a.keys() & values_b.keys():
                differences[(*replicate_key(run_a), patient)] = (patient, values_a[patient] - values_b[patient])
    return Paired(name_a, name_b, per_unit(differences))


def groups(runs: list[dict]) -> list[tuple[str, dict]]:
    """(title, {norm: runs chosen on validation}) per group of every factor but norm and learning rate."""
    _, _, factors = complete_settings(runs)
    keys = [k for k in factors if k not in ("norm", "lr")]
    grouped: dict[tuple, list[dict]] = {}
    for entry in select_by_validation(runs):
        grouped.setdefault(tuple(hashable(entry["setting"].get(k)) for k in keys), []).append(entry)
    result = []
    for values, members in sorted(grouped.items(), key=lambda item: [column_sort_key(k)(v)
                                                                        for k, v in zip(keys, item[0])]):
        by_norm: dict = {}
        for entry in members:
            by_norm.setdefault(entry["setting"].get("norm"), []).append(entry)
        title = ", ".join(f"{k}={show(v)}" for k, v in zip(keys, values)) or "all runs"
        result.append((title, {n: by_norm[n] for n in sorted(by_norm, key=norm_sort_key)}))
    return result


def verdict(p: Paired, metric: str) -> str:
    if p.too_few or p.identical:
        return p.p_text()
    if not p.significant():
        return "no significant difference"
    a_better = (p.mean < 0) == LOWER_IS_BETTER[metric]
    return f"{p.a if a_better else p.b} better"


def fmt(value, signed: bool = False) -> str:
    return "—" if not is_number(value) else (f"{value:+.3f}" if signed else f"{value:.3f}")


def write_cardiac_comparison(sweep_dir: Path, runs: list[dict]) -> Path | None:
    """comparison_cardiac.md and .csv; None without scipy, or when no group holds two layers with per-volume
    HD95 or EF figures."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        return None
    lines = [f"# Paired comparison on EF error and HD95: {sweep_dir}", "",
             "Each norm at the learning rate chosen on validation. Per test patient: |EF error| = mean over the "
             "task's ventricles of |EF predicted − EF true| (percentage points), HD95 = mean over its volumes "
             "(mm), Dice = mean over its volumes; lower is better for the first two. Pairs: runs sharing fold "
             f"and seed, per patient; two-sided Wilcoxon, Holm over each table's pairs, significant below {ALPHA}. "
             "Average ranks over the blocks (fold × seed), 1 = best.", ""]
    rows, shown = [], False
    for title, by_norm in groups(runs):
        if len(by_norm) < 2:
            continue
        for metric, (label, unit) in METRICS.items():
            means = {norm: layer_means(members, metric) for norm, members in by_norm.items()}
            if sum(bool(m) for m in means.values()) < 2:
                continue
            shown = True
            norms = list(by_norm)
            lines += [f"## {title}: {label}" + (f" ({unit})" if unit else ""), "",
                      "| norm | patients | mean | average rank |", "|---|---|---|---|"]
            blocks: dict = {}
            for norm, members in by_norm.items():
                for run in members:
                    values = run_patients(run, metric)
                    mean = statistics.fmean(values.values()) if values else None
                    sign = -1 if LOWER_IS_BETTER[metric] else 1
                    blocks.setdefault(replicate_key(run), {})[norm] = None if mean is None else sign * mean
            complete = [block for block in blocks.values() if set(block) == set(norms)]
            average = ({n: statistics.fmean(ranks(b)[n] for b in complete) for n in norms} if complete else {})
            for norm in norms:
                values = list(means[norm].values())
                mean = statistics.fmean(values) if values else math.nan
                lines.append(f"| {show(norm)} | {len(values)} | {fmt(mean)} | {fmt(average.get(norm))} |")
                rows.append({"group": title, "metric": metric, "kind": "layer", "a": show(norm), "n": len(values),
                             "mean": mean, "rank": average.get(norm)})
            friedman = friedman_p(complete, norms) if complete else None
            lines += ["", f"Friedman over {len(complete)} blocks: " + ("no test" if friedman is None
                                                                     else f"p = {friedman:.2g}"), ""]
            pairs = [pair(show(a), by_norm[a], show(b), by_norm[b], metric)
                     for i, a in enumerate(norms) for b in norms[i + 1:]]
            set_holm(pairs)
            lines += ["| A | B | patients | mean A − B | p | result |", "|---|---|---|---|---|---|"]
            for p in pairs:
                text = "—" if p.p is None else f"{p.p:.2g} (Holm {p.p_holm:.2g})"
                lines.append(f"| {p.a} | {p.b} | {p.n} | {fmt(p.mean, True)} | {text} | {verdict(p, metric)} |")
                rows.append({"group": title, "metric": metric, "kind": "pair", "a": p.a, "b": p.b, "n": p.n,
                             "mean": p.mean, "p": p.p, "p_holm": p.p_holm, "result": verdict(p, metric)})
            lines.append("")
    if not shown:
        return None
    markdown = sweep_dir / "comparison_cardiac.md"
    markdown.write_text("\n".join(lines))
    with open(sweep_dir / "comparison_cardiac.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["group", "metric", "kind", "a", "b", "n", "mean", "rank", "p",
                                                    "p_holm", "result"])
        writer.writeheader()
        writer.writerows(rows)
    return markdown
