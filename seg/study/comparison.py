"""The layers compared pairwise on per-volume test Dice (comparison.md): Wilcoxon tests with Holm's
correction, t-intervals, average ranks, Friedman and Nemenyi."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .plots import plot_comparison
from .runs import show
from .stats import (ALPHA, CONFIDENCE, MIN_UNITS, friedman_p, nemenyi_cd, pair_runs, patient_means, ranks,
                    replicate_key, set_holm, t_interval)
from .tables import column_sort_key, complete_settings, hashable, is_number, norm_sort_key, select_by_validation

# ---------------------------------------------------------------------------- paired comparison


@dataclass
class LayerResult:
    """A norm's test Dice per patient (mean of its volumes and runs) over the selected runs of one group."""

    norm: str
    runs: list[dict]
    patients: dict  # {patient: mean Dice}
    missing: int  # finished runs without per-volume Dice

    @property
    def mean(self) -> float:
        return statistics.fmean(self.patients.values()) if self.patients else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return t_interval(list(self.patients.values()))


@dataclass
class Comparison:
    """The norms of one group (one value of every factor but norm and learning rate), compared pairwise."""

    where: dict
    layers: list[LayerResult]
    pairs: list  # [Paired], Holm-adjusted over the group
    blocks: dict  # {(fold, seed): {norm: test Dice or None}}

    def title(self) -> str:
        return ", ".join(f"{key}={show(value)}" for key, value in self.where.items()) or "all runs"


@dataclass
class RankFamily:
    """Average ranks over the blocks (task x fold x seed) of the groups that compare the same norms."""

    layers: list
    blocks: list  # [{norm: Dice or None}]
    titles: list  # the groups pooled

    @property
    def average(self) -> dict:
        all_ranks = [ranks(block) for block in self.blocks]
        return {layer: statistics.fmean(r[layer] for r in all_ranks) for layer in self.layers}

    @property
    def drawable(self) -> bool:
        """A critical-difference diagram fits: at least 3 layers and 3 blocks."""
        return len(self.layers) >= 3 and len(self.blocks) >= 3


def comparisons(runs: list[dict], metric: str = "dice") -> tuple[list[Comparison], list[RankFamily]]:
    """The selected runs (rate chosen on validation) grouped by every factor but norm and learning rate;
    each group's layers, pairs and rank blocks; and the rank families over the groups."""
    _, _, factors = complete_settings(runs)
    selected = select_by_validation(runs)
    keys = [k for k in factors if k not in ("norm", "lr")]
    groups: dict[tuple, list[dict]] = {}
    for entry in selected:
        groups.setdefault(tuple(hashable(entry["setting"].get(k)) for k in keys), []).append(entry)
    result = []
    for values, members in sorted(groups.items(), key=lambda item: [column_sort_key(k)(v)
                                                                      for k, v in zip(keys, item[0])]):
        by_norm: dict = {}
        for entry in members:
            by_norm.setdefault(entry["setting"].get("norm"), []).append(entry)
        norms = sorted(by_norm, key=norm_sort_key)
        layers = [LayerResult(n, by_norm[n], *patient_means(by_norm[n])) for n in norms]
        pairs = [pair_runs(show(a), by_norm[a], show(b), by_norm[b])
                 for i, a in enumerate(norms) for b in norms[i + 1:]]
        set_holm(pairs)
        blocks: dict = {}
        for entry in members:
            value = entry.get(metric) if entry.get("status") == "ok" and is_number(entry.get(metric)) else None
            blocks.setdefault(replicate_key(entry), {})[entry["setting"].get("norm")] = value
        complete = {key: block for key, block in blocks.items() if set(block) == set(norms)}
        result.append(Comparison(dict(zip(keys, values)), layers, pairs, complete))
    families: dict[tuple, RankFamily] = {}
    for comparison in result:
        names = tuple(layer.norm for layer in comparison.layers)
        if len(names) >= 2 and comparison.blocks:
            family = families.setdefault(names, RankFamily(list(names), [], []))
            family.blocks.extend(comparison.blocks.values())
            family.titles.append(comparison.title())
    return result, list(families.values())


def pair_result(pair) -> str:
    """What a pair's test says, in words."""
    if pair.too_few or pair.identical:
        return pair.p_text()
    if pair.significant():
        return f"{pair.a} > {pair.b}" if pair.mean > 0 else f"{pair.a} < {pair.b}"
    return "no significant difference"


def fmt(value: float, signed: bool = False) -> str:
    return "—" if value is None or not math.isfinite(value) else (f"{value:+.3f}" if signed else f"{value:.3f}")


def write_comparison(sweep_dir: Path, runs: list[dict], metric: str = "dice", plots: bool = True) -> Path | None:
    """comparison.md, comparison.csv and (with matplotlib) comparison.png; None when scipy is missing."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        print("summary: scipy is not installed, comparison.md skipped (pip install -e '.[study]')")
        return None
    groups, families = comparisons(runs, metric)
    groups = [group for group in groups if len(group.layers) >= 2]
    if not groups:
        return None  # one norm per setting: nothing to compare
    lines = [f"# Paired comparison: {sweep_dir}", "",
             f"Each norm at the learning rate chosen on validation (per fold and seed; paper_table.md). Per-volume "
             f"test Dice (metrics.json `per_volume`) of runs sharing fold and seed are paired by case; the unit of a "
             f"pair is (seed, patient): a patient's volumes averaged within each seed, so the seeds' training "
             f"variance is in the test, and the mean difference of each seed is shown with its sign. Layer means "
             f"(per patient) and mean differences with {CONFIDENCE:.0%} t-intervals (none from fewer than 2 "
             f"values); two-sided Wilcoxon signed-rank tests, Holm-corrected over the pairs of each table, "
             f"significant below {ALPHA}; n: the non-zero differences the test used (of all units); no test below "
             f"{MIN_UNITS} of them.", ""]
    csv_rows = []
    for group in groups:
        lines += [f"## {group.title()}", "", "| norm | runs | patients | mean test Dice | 95% CI |",
                  "|---|---|---|---|---|"]
        for layer in group.layers:
            low, high = layer.ci
            finished = sum(r.get("status") == "ok" for r in layer.runs)
            lines.append(f"| {show(layer.norm)} | {finished}/{len(layer.runs)} | {len(layer.patients)} | "
                         f"{fmt(layer.mean)} | [{fmt(low)}, {fmt(high)}] |")
            csv_rows.append({"kind": "layer", "group": group.title(), "a": show(layer.norm), "n": len(layer.patients),
                             "mean": layer.mean, "ci_low": low, "ci_high": high})
        missing = sum(layer.missing for layer in group.layers)
        if missing:
            lines += ["", f"{missing} finished run(s) have no per-volume Dice in metrics.json (written before it "
                          f"existed) and are left out of the patients' means and the pairs."]
        if group.pairs:
            lines += ["", "| A | B | n (of units) | mean A − B | 95% CI | per seed | p | result |",
                      "|---|---|---|---|---|---|---|---|"]
        for pair in group.pairs:
            low, high = pair.ci
            p = "—" if pair.p is None else f"{pair.p:.2g} (Holm {pair.p_holm:.2g})"
            seeds = ", ".join(f"{seed}: {value:+.3f}" for seed, value in pair.per_seed.items())
            lines.append(f"| {pair.a} | {pair.b} | {pair.n_test} (of {pair.n}) | {fmt(pair.mean, True)} | "
                         f"[{fmt(low, True)}, {fmt(high, True)}] | {seeds or '—'} | {p} | {pair_result(pair)} |")
            csv_rows.append({"kind": "pair", "group": group.title(), "a": pair.a, "b": pair.b, "n": pair.n_test,
                             "mean": pair.mean, "ci_low": low, "ci_high": high, "p": pair.p, "p_holm": pair.p_holm,
                             "result": pair_result(pair)})
        lines.append("")
    if families:
        lines += ["## Average ranks", "",
                  "Per block (a task or other setting, a fold and a seed) the norms are ranked by test Dice of the run "
                  "chosen on validation (1 = best; a run that diverged or failed ranks last); the blocks of one "
                  "setting share patients, so Friedman's test and the Nemenyi critical difference (CD) describe "
                  "these runs rather than independent data sets.", ""]
    for family in families:
        average = family.average
        p = friedman_p(family.blocks, family.layers)
        cd = nemenyi_cd(len(family.layers), len(family.blocks)) if len(family.layers) >= 2 else math.nan
        names = ", ".join(map(show, family.layers))
        lines += [f"### {names} — {len(family.blocks)} blocks ({'; '.join(family.titles)})",
                  "", "| norm | average rank |", "|---|---|"]
        lines += [f"| {show(n)} | {average[n]:.2f} |" for n in sorted(family.layers, key=lambda n: average[n])]
        test = ("Friedman: no test (fewer than 3 norms or 2 blocks, or all norms tie in every block)" if p is None
                else f"Friedman p = {p:.2g}")
        drawn = ("critical-difference diagram in comparison.png" if family.drawable
                 else "no critical-difference diagram (it needs at least 3 norms and 3 blocks)")
        lines += ["", f"{test}; Nemenyi CD (alpha {ALPHA}) = {fmt(cd)}; {drawn}.", ""]
        for n in family.layers:
            csv_rows.append({"kind": "rank", "group": "; ".join(family.titles), "a": show(n), "n": len(family.blocks),
                             "mean": average[n], "p": p, "result": f"CD {cd:.3f}"})
    markdown = sweep_dir / "comparison.md"
    markdown.write_text("\n".join(lines))
    fieldnames = ["kind", "group", "a", "b", "n", "mean", "ci_low", "ci_high", "p", "p_holm", "result"]
    with open(sweep_dir / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(csv_rows)
    if plots:
        plot_comparison(sweep_dir, groups, families)
    return markdown
