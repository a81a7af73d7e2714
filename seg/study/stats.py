"""Paired statistics of a sweep: layers compared on the same patients, with tests a reviewer accepts.

Used by seg/study/summary.py (comparison.md) and seg/study/claims.py (claims.md); the numbers come from the
runs' metrics.json (``per_volume``: each test volume's Dice, written by the trainer).

- **Pairing.** Two runs are paired when they share fold and seed: they saw the same split, so
  their test volumes are the same. Volumes are matched by case id; each paired volume gives a
  difference of Dice (A - B).
- **Unit of the tests: (seed, patient).** A patient's volumes (ED, ES) are not independent, so the
  differences are averaged per patient first -- separately per seed: each seed trains its own
  models (and draws its own split), so the training variance between seeds enters every test and
  interval instead of being averaged away. The per-seed mean difference is reported with its sign
  (``Paired.per_seed``), so a reader sees when seeds disagree.
- **Wilcoxon signed-rank test** (``scipy.stats.wilcoxon``, two-sided, zero differences dropped,
  exact below 50 units without ties), Holm-corrected over the pairs of one family. ``n_test`` is
  the number of units the test used (the non-zero differences). With fewer than ``MIN_UNITS`` of
  them a two-sided test cannot reach p < 0.05 (its smallest p is 2 / 2**n), so none is computed:
  the result says "too few".
- **95% t-intervals** of a mean (``t_interval``): mean ± t_{0.975, n-1} s / sqrt(n), none from fewer
  than 2 values. A percentile bootstrap covers far less than its nominal 95% at the sizes a study
  has (0.86-0.90 at n = 6-10 in simulation), and a non-inferiority decision made with it errs 4-7%
  of the time instead of 2.5%; the t-interval keeps both at n = 6-12 (tests/test_verdicts.py
  simulates it). Deterministic: the same numbers every time the summary is written.
- **Average ranks** (Demsar, JMLR 2006): per block (a task, fold and seed) the layers are ranked
  by test Dice (1 = best, ties share the mean rank); Friedman's test over the blocks and the
  Nemenyi critical difference CD = q_0.05(k) * sqrt(k (k + 1) / (6 N)). The blocks of one task are
  not independent data sets (they share patients), so the CD diagram is a picture, not a proof.

scipy is the ``study`` extra; without it ``wilcoxon_p`` and the Friedman test raise ImportError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
MIN_UNITS = 6  # the fewest paired patients for which a two-sided Wilcoxon test can give p < 0.05
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------- numbers


def t_interval(values, confidence: float = CONFIDENCE):
    """The t-interval of the mean of ``values`` (the last axis; vectorized over the others): (low, high),
    NaN where there are fewer than 2 values (no spread, no interval)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    n = values.shape[-1]
    if n < 2:
        nan = np.full(values.shape[:-1], math.nan)
        return (float(nan), float(nan)) if nan.ndim == 0 else (nan, nan)
    mean = values.mean(axis=-1)
    half = t.ppf(0.5 + confidence / 2, n - 1) * values.std(axis=-1, ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def wilcoxon_p(differences) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; None when there are fewer than
    ``MIN_UNITS`` (too few for a test); 1.0 when every difference is zero (nothing to test)."""
    differences = np.asarray(differences, dtype=float)
    if differences.size >= MIN_UNITS and not np.any(differences):
        return 1.0
    if np.count_nonzero(differences) < MIN_UNITS:
        return None  # the test drops zero differences: it needs MIN_UNITS non-zero ones
    from scipy.stats import wilcoxon

    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values over the family of those that are not None (kept in place)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def ranks(values: dict) -> dict:
    """{name: rank} with rank 1 for the highest value; ties share the mean of their ranks; a value of
    None (a run that diverged or failed) ranks after every number, such ties again sharing."""
    ordered = sorted(values, key=lambda name: (values[name] is None, -(values[name] or 0.0)))
    result, start = {}, 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and values[ordered[end + 1]] == values[ordered[start]]:
            end += 1
        for name in ordered[start:end + 1]:
            result[name] = (start + end) / 2 + 1
        start = end + 1
    return result


def nemenyi_cd(num_layers: int, num_blocks: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks (k layers, N blocks)."""
    from scipy.stats import studentized_range

    q = studentized_range.ppf(1 - alpha, num_layers, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(num_layers * (num_layers + 1) / (6 * num_blocks)))


def friedman_p(blocks: list[dict], layers: list) -> float | None:
    """Friedman's test that the layers' ranks do not differ over the blocks; None below 3 layers or 2 blocks,
    or when every block is a tie of all layers (nothing to test)."""
    if len(layers) < 3 or len(blocks) < 2:
        return None
    from scipy.stats import friedmanchisquare

    # friedmanchisquare ranks within blocks itself; ranks (diverged last) are passed so None is handled
    ranked = [ranks({layer: block[layer] for layer in layers}) for block in blocks]
    if all(len(set(r.values())) == 1 for r in ranked):
        return None
    p = float(friedmanchisquare(*[[-r[layer] for r in ranked] for layer in layers]).pvalue)
    return p if math.isfinite(p) else None


# ---------------------------------------------------------------------------- paired runs


@dataclass
class Paired:
    """A against B on their shared test patients: per-patient mean differences (A - B) and their summary."""

    a: str
    b: str
    differences: dict  # {(seed, patient): mean difference A - B}
    missing_volumes: int = 0  # runs among A's and B's without per-volume Dice (left out)
    levels: tuple = ()  # the mean Dice of each side (of each arm, for a difference in differences), paired volumes
    p: float | None = None  # Wilcoxon, two-sided; None: too few
    p_holm: float | None = None

    def __post_init__(self):
        self.p = wilcoxon_p(list(self.differences.values()))

    @property
    def n(self) -> int:
        """(seed, patient) units with a difference (the interval's n)."""
        return len(self.differences)

    @property
    def n_test(self) -> int:
        """The units the Wilcoxon test used: those with a non-zero difference."""
        return sum(1 for d in self.differences.values() if d != 0)

    @property
    def per_seed(self) -> dict:
        """{seed: mean difference over its patients}: the sign of the difference seed by seed."""
        sums: dict = {}
        for (seed, _), difference in self.differences.items():
            total, count = sums.get(seed, (0.0, 0))
            sums[seed] = (total + difference, count + 1)
        return {seed: total / count for seed, (total, count) in sorted(sums.items(), key=lambda i: str(i[0]))}

    def seeds_text(self) -> str:
        """'per seed: 0 -0.050, 1 +0.012': the mean difference of each seed, signed."""
        return "per seed: " + ", ".join(f"{seed} {value:+.3f}" for seed, value in self.per_seed.items())

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.differences.values()))) if self.differences else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return t_interval(list(self.differences.values()))

    @property
    def too_few(self) -> bool:
        return self.p is None

    @property
    def identical(self) -> bool:
        return self.n >= MIN_UNITS and not any(self.differences.values())

    def significant(self, alpha: float = ALPHA) -> bool:
        """Holm-adjusted p (the plain p if no family was set) below ``alpha``."""
        p = self.p_holm if self.p_holm is not None else self.p
        return p is not None and p < alpha

    def p_text(self) -> str:
        """'p = 0.0039 (Holm 0.012)', or why there is no p-value."""
        if self.identical:
            return f"identical on all {self.n} (seed, patient) units (p = 1)"
        if self.too_few:
            return (f"too few non-zero paired differences for a test (n = {self.n_test}; a two-sided test needs at "
                    f"least {MIN_UNITS})")
        holm_text = f" (Holm {self.p_holm:.2g})" if self.p_holm is not None else ""
        return f"p = {self.p:.2g}{holm_text}, n = {self.n_test} non-zero differences"


def replicate_key(run: dict) -> tuple:
    """What makes two runs of one setting see the same test patients: their fold and seed (a fixed
    ``data.split_seed`` is part of the setting)."""
    setting = run.get("setting") or {}
    return setting.get("fold"), setting.get("seed")


def volume_dice(run: dict) -> dict | None:
    """{case: (patient, Dice)} of a finished run's test volumes with a defined Dice; None without per_volume."""
    rows = run.get("per_volume")
    if run.get("status") != "ok" or not isinstance(rows, list):
        return None
    return {row["case"]: (row.get("patient") or row["case"], row["dice"]) for row in rows
            if isinstance(row, dict) and row.get("case") is not None and isinstance(row.get("dice"), (int, float))
            and math.isfinite(row["dice"])}


def patient_means(runs: list[dict]) -> tuple[dict, int]:
    """{patient: mean test Dice over its volumes and the runs that tested it}; and how many finished runs had
    no per-volume Dice."""
    sums: dict = {}
    missing = 0
    for run in runs:
        volumes = volume_dice(run)
        if volumes is None:
            missing += run.get("status") == "ok"
            continue
        for patient, dice in volumes.values():
            total, count = sums.get(patient, (0.0, 0))
            sums[patient] = (total + dice, count + 1)
    return {patient: total / count for patient, (total, count) in sums.items()}, missing


def paired_volumes(runs_a: list[dict], runs_b: list[dict]) -> tuple[dict, int]:
    """{(fold, seed, case): (patient, Dice A, Dice B)} over the runs of A and B that share fold and seed and
    the volumes they share; and how many finished runs had no per-volume Dice."""
    by_key_b: dict = {}
    for run in runs_b:
        by_key_b.setdefault(replicate_key(run), []).append(run)
    paired: dict = {}
    missing = sum(volume_dice(run) is None and run.get("status") == "ok" for run in [*runs_a, *runs_b])
    for run_a in runs_a:
        volumes_a = volume_dice(run_a)
        for run_b in by_key_b.get(replicate_key(run_a), []):
            volumes_b = volume_dice(run_b)
            if volumes_a is None or volumes_b is None:
                continue
            for case, (patient, dice_a) in volumes_a.items():
                if case in volumes_b:
                    paired[(*replicate_key(run_a), case)] = (patient, dice_a, volumes_b[case][1])
    return paired, missing


def per_unit(differences: dict) -> dict:
    """{(seed, patient): mean difference} from {(fold, seed, case): (patient, difference)}: a patient's
    volumes (and folds, in repeated splits) averaged within each seed."""
    sums: dict = {}
    for (_, seed, _), (patient, difference) in differences.items():
        total, count = sums.get((seed, patient), (0.0, 0))
        sums[(seed, patient)] = (total + difference, count + 1)
    return {unit: total / count for unit, (total, count) in sums.items()}


def mean_of(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def pair_runs(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict]) -> Paired:
    """A's and B's runs paired by fold and seed, their volumes by case id, averaged per (seed, patient)."""
    paired, missing = paired_volumes(runs_a, runs_b)
    differences = {key: (patient, a - b) for key, (patient, a, b) in paired.items()}
    levels = (mean_of(a for _, a, _ in paired.values()), mean_of(b for _, _, b in paired.values()))
    return Paired(name_a, name_b, per_unit(differences), missing, levels)


def pair_changes(name_a: str, change_a: tuple[list[dict], list[dict]], name_b: str,
                 change_b: tuple[list[dict], list[dict]]) -> Paired:
    """A difference in differences: per volume (A1 - A2) - (B1 - B2), all four runs sharing fold and seed,
    averaged per (seed, patient); e.g. how much more BN loses than GN from a large batch to a small one.
    ``levels``: the mean Dice of A1, A2, B1, B2 on those volumes."""
    first, missing_a = paired_volumes(*change_a)
    second, missing_b = paired_volumes(*change_b)
    shared = [key for key in first if key in second]
    differences = {key: (first[key][0], (first[key][1] - first[key][2]) - (second[key][1] - second[key][2]))
                   for key in shared}
    levels = tuple(mean_of(source[key][i] for key in shared) for source in (first, second) for i in (1, 2))
    return Paired(name_a, name_b, per_unit(differences), missing_a + missing_b, levels)


def set_holm(family: list[Paired]) -> None:
    """Holm-adjust the p-values of one family of comparisons, in place."""
    for pair, adjusted in zip(family, holm([pair.p for pair in family])):
        pair.p_holm = adjusted
