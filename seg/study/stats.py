"""Paired statistics of a sweep: layers compared on the same patients, with tests a reviewer accepts.

Used by seg/study/summary.py (comparison.md) and seg/study/claims.py (claims.md); the numbers come from the
runs' metrics.json (``per_volume``: each test volume's Dice, written by the trainer).

- **Pairing.** Two runs are paired when they share fold and seed: they saw the same split, so
  their test volumes are the same. Volumes are matched by case id; each paired volume gives a
  difference of Dice (A - B).
- **Unit of the tests: the patient.** A patient's volumes (ED, ES) and its replicate runs (the
  folds and seeds in which it was a test patient) are not independent, so the differences are
  averaged per patient first; the tests and intervals are over patients.
- **Wilcoxon signed-rank test** (``scipy.stats.wilcoxon``, two-sided, zero differences dropped,
  exact below 50 patients without ties), Holm-corrected over the pairs of one family. With fewer
  than ``MIN_UNITS`` patients a two-sided test cannot reach p < 0.05 (its smallest p is 2 / 2**n),
  so none is computed: the result says "too few".
- **95% bootstrap intervals** of a mean over patients: ``RESAMPLES`` resamples of the patients with
  replacement, percentile interval, generator seeded with ``BOOTSTRAP_SEED`` (the same numbers
  every time the summary is written).
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
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------- numbers


def bootstrap_ci(values, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; (nan, nan) for no values."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(differences) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; None when there are fewer than
    ``MIN_UNITS`` (too few for a test); 1.0 when every difference is zero (nothing to test)."""
    differences = np.asarray(differences, dtype=float)
    if differences.size < MIN_UNITS:
        return None
    if not np.any(differences):
        return 1.0
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
    differences: dict  # {patient: mean difference A - B}
    missing_volumes: int = 0  # runs among A's and B's without per-volume Dice (left out)
    levels: tuple = ()  # the mean Dice of each side (of each arm, for a difference in differences), paired volumes
    p: float | None = None  # Wilcoxon, two-sided; None: too few
    p_holm: float | None = None

    def __post_init__(self):
        self.p = wilcoxon_p(list(self.differences.values()))

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.differences.values()))) if self.differences else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return bootstrap_ci(list(self.differences.values()))

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
        if self.too_few:
            return f"too few paired patients for a test (n = {self.n}; a two-sided test needs at least {MIN_UNITS})"
        if self.identical:
            return f"identical on all {self.n} patients (p = 1)"
        holm_text = f" (Holm {self.p_holm:.2g})" if self.p_holm is not None else ""
        return f"p = {self.p:.2g}{holm_text}"


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


def per_patient(differences: dict) -> dict:
    """{patient: mean difference} from {(fold, seed, case): (patient, difference)}."""
    sums: dict = {}
    for patient, difference in differences.values():
        total, count = sums.get(patient, (0.0, 0))
        sums[patient] = (total + difference, count + 1)
    return {patient: total / count for patient, (total, count) in sums.items()}


def mean_of(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def pair_runs(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict]) -> Paired:
    """A's and B's runs paired by fold and seed, their volumes by case id, averaged per patient."""
    paired, missing = paired_volumes(runs_a, runs_b)
    differences = {key: (patient, a - b) for key, (patient, a, b) in paired.items()}
    levels = (mean_of(a for _, a, _ in paired.values()), mean_of(b for _, _, b in paired.values()))
    return Paired(name_a, name_b, per_patient(differences), missing, levels)


def pair_changes(name_a: str, change_a: tuple[list[dict], list[dict]], name_b: str,
                 change_b: tuple[list[dict], list[dict]]) -> Paired:
    """A difference in differences: per volume (A1 - A2) - (B1 - B2), all four runs sharing fold and seed,
    averaged per patient; e.g. how much more BN loses than GN from a large batch to a small one.
    ``levels``: the mean Dice of A1, A2, B1, B2 on those volumes."""
    first, missing_a = paired_volumes(*change_a)
    second, missing_b = paired_volumes(*change_b)
    shared = [key for key in first if key in second]
    differences = {key: (first[key][0], (first[key][1] - first[key][2]) - (second[key][1] - second[key][2]))
                   for key in shared}
    levels = tuple(mean_of(source[key][i] for key in shared) for source in (first, second) for i in (1, 2))
    return Paired(name_a, name_b, per_patient(differences), missing_a + missing_b, levels)


def set_holm(family: list[Paired]) -> None:
    """Holm-adjust the p-values of one family of comparisons, in place."""
    for pair, adjusted in zip(family, holm([pair.p for pair in family])):
        pair.p_holm = adjusted
