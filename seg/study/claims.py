"""The normalization papers' claims, tested on the runs of a sweep (claims.md).

Each claim is checked wherever the sweep holds the runs it needs (``experiment=claims`` holds all
of them), separately in each *context*: the runs that share everything but the layer, the batch
size, the learning rate, the fold and the seed (e.g. one task, one held-out vendor). A claim is made
of comparisons of two layers (or one layer at two batch sizes) on the same test patients
(seg/study/stats.py: paired per patient, Wilcoxon signed-rank, Holm-corrected within the claim, 95%
bootstrap interval of the mean difference). Every run is the one whose learning rate was chosen
on validation Dice (seg/study/summary.py), so no claim is judged on a rate picked by its test Dice.

A verdict is earned (``Comparison.verdict``):
- **insufficient** (with the reason) unless each arm of the comparison finished on at least
  ``MIN_SEEDS`` seeds (a seed is finished when all its runs are) and *segments*: its mean test
  Dice reaches ``FLOOR_FRACTION`` of the best arm's in the same context, and that best arm
  reaches ``MIN_BEST`` (a sweep where every layer sits at Dice 0.06 learned nothing to compare);
  also when there are too few non-zero paired differences for a test;
- **divergence is a result**: "A >= B" is *not reproduced* when A diverged on a seed where B
  finished ("A < B": not reproduced when B diverged where A finished);
- otherwise on the statistics, over (seed, patient) units (seg/study/stats.py): "A < B" is
  *reproduced* when A is significantly worse (Holm-adjusted p < 0.05 and the 95% t-interval of
  A - B below 0), *not reproduced* when the interval's lower end is above -``MARGIN``,
  *inconclusive* otherwise; "A >= B" is the opposite: not reproduced when A is significantly
  worse, reproduced when the interval's lower end is above -``MARGIN`` (non-inferiority: with a
  95% two-sided interval the error at a true difference of -``MARGIN`` is 2.5%).
Every arm's finished seeds, its runs' statuses and the per-seed sign of each difference are
printed beside the verdict. A claim of several comparisons joined by "and" is reproduced when all
are, not reproduced when one is not; joined by "or", reproduced when one is, not reproduced when
none can be; insufficient where a comparison it needs is.

The claims (as tested here):
1. BN degrades at batch size <= 2 while GN does not (Wu & He, "Group Normalization", ECCV 2018),
   both halves tested, from the largest batch size >= 4 to the smallest <= 2 (without a held-out
   domain): BN small < BN large, and GN small >= GN large (non-inferiority by ``MARGIN``). The
   difference in differences (how much more BN loses than GN) is shown for reference.
2. IN and GN >= BN at batch 1 (Zhou & Yang, "Normalization in Training U-Net for 2D Biomedical
   Semantic Segmentation", RA-L 2019).
3. ILN >= BIN and ILN >= the best single layer at batch 1 (Zhou et al., "U-Net Training with
   Instance-Layer Normalization", MMMI 2019); the best of BN, IN, LN, GN by mean *validation* Dice.
4. Instance-type or conditional layers help under a held-out vendor (the domain-shift setting;
   e.g. Ulyanov et al. 2016 for IN, Dumoulin et al. 2017 for CIN, Huang & Belongie 2017 for AdaIN):
   BN < L for at least one L of IN, ILN, BIN, CIN, AdaIN, SPADE, SEAN, on the held-out vendor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import math

from .stats import ALPHA, MIN_UNITS, Paired, pair_changes, pair_runs, set_holm

MARGIN = 0.01  # Dice: a layer "no worse" than another may be worse by less than this
MIN_SEEDS = 3  # seeds each arm must have finished on for a verdict: training variance is part of every verdict
FLOOR_FRACTION = 0.5  # an arm segments when its mean test Dice is at least this fraction of the context's best arm
MIN_BEST = 0.5  # ... and that best arm reaches this Dice (otherwise no layer learned the task)
SINGLE = ("bn", "in", "ln", "gn")
SHIFT_HELPERS = ("in", "iln", "bin", "cin", "adain", "spade", "sean")
DOMAIN_KEYS = ("test_vendors", "test_centres", "train_vendors", "train_centres")
AUGMENT_KEY = "data.augment.preset"  # a factor of experiment=domain_shift: claim 4 says which augmentation
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "insufficient")


@dataclass
class Arm:
    """The selected runs of one layer (at one batch size) in one context: one entry per fold and seed, a run
    or a stand-in whose status says how every rate of it ended (seg/study/tables.py select_by_validation)."""

    name: str
    entries: list[dict]

    def seeds(self) -> dict:
        """{seed: [status of each of its entries]}."""
        result: dict = {}
        for entry in self.entries:
            result.setdefault((entry.get("setting") or {}).get("seed"), []).append(str(entry.get("status")))
        return result

    @property
    def finished_seeds(self) -> set:
        return {seed for seed, statuses in self.seeds().items() if all(s == "ok" for s in statuses)}

    @property
    def diverged_seeds(self) -> set:
        return {seed for seed, statuses in self.seeds().items() if "diverged" in statuses}

    @property
    def mean_dice(self) -> float:
        values = [e["dice"] for e in self.entries if e.get("status") == "ok" and isinstance(e.get("dice"), float)
                  and math.isfinite(e["dice"])]
        return sum(values) / len(values) if values else math.nan

    def text(self) -> str:
        """'ILN: 1/3 seeds finished (runs: 2 ok, 4 diverged), mean test Dice 0.812'."""
        counts: dict = {}
        for entry in self.entries:
            counts[str(entry.get("status"))] = counts.get(str(entry.get("status")), 0) + 1
        runs = ", ".join(f"{k} {status}" for status, k in sorted(counts.items(), key=lambda i: i[0] != "ok"))
        dice = f", mean test Dice {self.mean_dice:.3f}" if math.isfinite(self.mean_dice) else ""
        return f"{self.name}: {len(self.finished_seeds)}/{len(self.seeds())} seeds finished (runs: {runs}){dice}"


@dataclass
class Comparison:
    """One comparison of a claim: ``pair`` = A vs B; ``kind`` "<" (A is worse) or ">=" (A is no worse);
    ``arms``: the arms of A and B (A1, A2, B1, B2 for a difference in differences); ``best``: the mean test
    Dice of the best arm of the context, which the floor is relative to."""

    pair: Paired
    kind: str
    arms: list[Arm] = field(default_factory=list)
    best: float = math.nan

    @property
    def floor(self) -> float:
        return FLOOR_FRACTION * self.best

    def divergence(self) -> str | None:
        """Why divergence decides the comparison ("not reproduced"), or None."""
        if len(self.arms) != 2:
            return None
        a, b = self.arms
        worse, other = (a, b) if self.kind == ">=" else (b, a)
        seeds = sorted((worse.diverged_seeds & other.finished_seeds), key=str)
        if not seeds:
            return None
        return (f"{worse.name} diverged on seed(s) {', '.join(map(str, seeds))} where {other.name} finished")

    def insufficient(self) -> list[str]:
        """The reasons the runs do not support a verdict (empty: they do)."""
        reasons = []
        for arm in self.arms:
            if len(arm.finished_seeds) < MIN_SEEDS:
                reasons.append(f"{arm.name} finished on {len(arm.finished_seeds)} seed(s), a verdict needs "
                               f"{MIN_SEEDS}")
        if not self.best >= MIN_BEST:
            reasons.append(f"no arm of this context segments: the best mean test Dice is {self.best:.3f} "
                           f"< {MIN_BEST}")
        else:
            reasons += [f"{arm.name} does not segment (mean test Dice {arm.mean_dice:.3f} < floor {self.floor:.3f}, "
                        f"{FLOOR_FRACTION} x the best arm's {self.best:.3f})" for arm in self.arms
                        if math.isfinite(arm.mean_dice) and not arm.mean_dice >= self.floor]
        if self.pair.too_few and not self.pair.identical:
            reasons.append(f"too few non-zero paired differences for a test (n = {self.pair.n_test}; "
                           f"at least {MIN_UNITS})")
        return reasons

    @property
    def verdict(self) -> str:
        if self.divergence():
            return "not reproduced"
        if self.insufficient():
            return "insufficient"
        low, high = self.pair.ci
        worse = self.pair.significant() and self.pair.mean < 0 and high < 0
        no_worse = low > -MARGIN
        if self.kind == "<":
            return "reproduced" if worse else "not reproduced" if no_worse else "inconclusive"
        return "not reproduced" if worse else "reproduced" if no_worse else "inconclusive"

    def text(self) -> str:
        low, high = self.pair.ci
        interval = f"[95% CI {low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "[no interval: fewer than 2 units]"
        numbers = (f"mean {self.pair.mean:+.3f} {interval}, {self.pair.n} (seed, patient) units, "
                   f"{self.pair.seeds_text()}, " if self.pair.n else "no paired patients, ")
        missing = f"; {self.pair.missing_volumes} run(s) without per-volume Dice left out" \
            if self.pair.missing_volumes else ""
        why = self.divergence() or (self.verdict == "insufficient" and "; ".join(self.insufficient()))
        reason = f" ({why})" if why else ""
        arms = "".join(f"\n  - {arm.text()}" for arm in self.arms)
        return (f"{self.pair.a} {self.kind} {self.pair.b}: {numbers}{self.pair.p_text()} -> "
                f"**{self.verdict}**{reason}{missing}{arms}")


@dataclass
class Claim:
    number: int
    statement: str
    source: str
    context: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    join: str = "and"
    note: str = ""  # why it is not tested here, how it is tested, or what was chosen (the best single layer)
    context_lines: list[str] = field(default_factory=list)  # comparisons shown for reference, not in the verdict

    @property
    def verdict(self) -> str:
        if not self.comparisons:
            return "not tested"
        verdicts = [c.verdict for c in self.comparisons]
        if self.join == "or":  # reproduced when one is; not reproduced when none can be
            if "reproduced" in verdicts:
                return "reproduced"
            if all(v == "not reproduced" for v in verdicts):
                return "not reproduced"
        elif "not reproduced" in verdicts:
            return "not reproduced"
        elif all(v == "reproduced" for v in verdicts):
            return "reproduced"
        return "insufficient" if "insufficient" in verdicts else "inconclusive"


CLAIMS = {
    1: ("BN degrades at batch size <= 2 while GN does not", "Wu & He, Group Normalization (ECCV 2018)"),
    2: ("IN and GN >= BN at batch size 1", "Zhou & Yang, Normalization in Training U-Net (RA-L 2019)"),
    3: ("ILN >= BIN and ILN >= the best single layer", "Zhou et al., U-Net Training with Instance-Layer "
                                                       "Normalization (MMMI 2019)"),
    4: ("Instance-type or conditional layers beat BN on a held-out vendor", "domain shift (IN: Ulyanov et al. "
                                                                            "2016; CIN: Dumoulin et al. 2017; "
                                                                            "AdaIN: Huang & Belongie 2017)"),
}


def label(norm: str, batch: int | None = None) -> str:
    return norm.upper() if batch is None else f"{norm.upper()} (batch {batch})"


def contexts(runs: list[dict], factors: list[str]) -> dict[tuple, list[dict]]:
    """The selected runs split by every factor but layer, batch size, learning rate, fold and seed."""
    keys = [k for k in factors if k not in ("norm", "batch_size", "lr", "fold", "seed")]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        setting = run["setting"]
        groups.setdefault(tuple((k, _hashable(setting.get(k))) for k in keys), []).append(run)
    return groups


def evaluate_claims(runs: list[dict], factors: list[str]) -> list[Claim]:
    """Every claim in every context of the selected runs where its runs exist; one 'not tested' line for a
    claim tested nowhere."""
    results: list[Claim] = []
    for context, members in sorted(contexts(runs, factors).items(), key=lambda item: str(item[0])):
        where = ", ".join(f"{k}={_show(v)}" for k, v in context if v is not None) or "all runs"
        shifted = any(k in DOMAIN_KEYS and v for k, v in context)
        cells: dict[tuple, list[dict]] = {}
        for run in members:
            cells.setdefault((run["setting"].get("norm"), run["setting"].get("batch_size")), []).append(run)
        means = [Arm("", entries).mean_dice for entries in cells.values()]
        best = max((m for m in means if math.isfinite(m)), default=math.nan)
        built = [claim_4(cells)] if shifted else [claim_1(cells), claim_2(cells), claim_3(cells)]
        for claim in built:
            if claim is not None:
                for comparison in claim.comparisons:
                    comparison.best = best
                if claim.number == 4:
                    claim.note = f"{claim.note}; {augmentation_note(dict(context).get(AUGMENT_KEY))}"
                claim.context = where
                set_holm([c.pair for c in claim.comparisons])
                results.append(claim)
    for number, (statement, source) in CLAIMS.items():
        if not any(c.number == number for c in results):
            results.append(Claim(number, statement, source, note=NEEDS[number]))
    return sorted(results, key=lambda c: (c.number, c.context))


def augmentation_note(preset) -> str:
    """What claim 4's verdict in one context says about augmentation (a factor of experiment=domain_shift)."""
    if preset is None:
        return "augmentation: as the runs were configured (not a factor of this sweep)"
    if preset == "none":
        return ("augmentation: none (data.augment.preset=none): the layer's effect alone; compare the verdict "
                "with data.augment.preset=nnunet")
    return (f"augmentation: data.augment.preset={preset}: the layer's effect on top of intensity augmentation; a "
            f"claim reproduced without augmentation but not here is one that augmentation also delivers")


NEEDS = {
    1: "needs BN and GN runs at a batch size <= 2 and at one >= 4, without a held-out domain",
    2: "needs IN, GN and BN runs at batch size 1, without a held-out domain",
    3: "needs ILN with BIN or a single layer (BN, IN, LN, GN) at batch size 1, without a held-out domain",
    4: "needs BN and an instance-type or conditional layer tested on a held-out vendor (data.test_vendors)",
}


def compare(cells: dict, a: tuple, b: tuple, kind: str, names: tuple | None = None) -> Comparison:
    """Arm ``a`` (norm, batch) against arm ``b``: their runs paired, each arm kept for the verdict's checks."""
    name_a, name_b = names or (label(a[0]), label(b[0]))
    arm_a, arm_b = Arm(name_a, cells[a]), Arm(name_b, cells[b])
    return Comparison(pair_runs(name_a, cells[a], name_b, cells[b]), kind, [arm_a, arm_b])


def claim_1(cells: dict) -> Claim | None:
    batches = sorted({b for (norm, b) in cells if norm in ("bn", "gn") and isinstance(b, int)})
    both = [b for b in batches if ("bn", b) in cells and ("gn", b) in cells]
    small, large = [b for b in both if b <= 2], [b for b in both if b >= 4]
    if not small or not large:
        return None
    s, l = small[0], large[-1]
    claim = Claim(1, *CLAIMS[1])
    claim.comparisons = [compare(cells, ("bn", s), ("bn", l), "<", (label("bn", s), label("bn", l))),
                         compare(cells, ("gn", s), ("gn", l), ">=", (label("gn", s), label("gn", l)))]
    bn, gn = (cells[("bn", s)], cells[("bn", l)]), (cells[("gn", s)], cells[("gn", l)])
    reference = pair_changes(f"BN change {l} -> {s}", bn, f"GN change {l} -> {s}", gn)
    low, high = reference.ci
    interval = f"[95% CI {low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "[no interval]"
    claim.context_lines = [f"for reference, not in the verdict: {reference.a} - {reference.b}: mean "
                           f"{reference.mean:+.3f} {interval}, {reference.n} (seed, patient) units, "
                           f"{reference.seeds_text()} (how much more BN loses than GN)"]
    claim.note = (f"Both halves are tested: BN at batch {s} < BN at batch {l} (BN degrades), and GN at batch {s} >= "
                  f"GN at batch {l} by a non-inferiority margin of {MARGIN} Dice (GN does not).")
    return claim


def claim_2(cells: dict) -> Claim | None:
    if not all((norm, 1) in cells for norm in ("bn", "in", "gn")):
        return None
    claim = Claim(2, *CLAIMS[2])
    claim.comparisons = [compare(cells, (n, 1), ("bn", 1), ">=") for n in ("in", "gn")]
    return claim


def claim_3(cells: dict) -> Claim | None:
    singles = [n for n in SINGLE if (n, 1) in cells]
    if ("iln", 1) not in cells or not (singles or ("bin", 1) in cells):
        return None
    claim = Claim(3, *CLAIMS[3])
    if ("bin", 1) in cells:
        claim.comparisons.append(compare(cells, ("iln", 1), ("bin", 1), ">="))
    scored = [(mean_validation(cells[(n, 1)]), n) for n in singles]
    scored = [(score, n) for score, n in scored if score is not None]
    if scored:  # ties go to the first in SINGLE's order (BN, IN, LN, GN)
        score, best = max(scored, key=lambda item: (item[0], -SINGLE.index(item[1])))
        claim.note = (f"best single layer on validation: {best.upper()} (mean validation Dice {score:.3f}; "
                      + ", ".join(f"{n.upper()} {v:.3f}" for v, n in sorted(scored, reverse=True)) + ")")
        claim.comparisons.append(compare(cells, ("iln", 1), (best, 1), ">="))
    elif singles:
        claim.note = "no single layer has a validation Dice: the best single layer cannot be chosen"
    if ("bin", 1) in cells:
        claim.note += ("" if not claim.note else ". ") + (
            "At batch size 1 BIN's batch and instance statistics are the same, so its mixing weight gets no "
            "gradient: BIN trains as BN and evaluates with BN's running statistics, and ILN >= BIN effectively "
            "tests ILN >= BN")
    return claim if claim.comparisons else None


def claim_4(cells: dict) -> Claim | None:
    batches = sorted(b for (norm, b) in cells if norm == "bn" and isinstance(b, int))
    for batch in batches:
        helpers = [n for n in SHIFT_HELPERS if (n, batch) in cells]
        if helpers:
            claim = Claim(4, *CLAIMS[4], join="or")
            claim.comparisons = [compare(cells, ("bn", batch), (n, batch), "<") for n in helpers]
            claim.note = f"batch size {batch}"
            return claim
    return None


def mean_validation(runs: list[dict]) -> float | None:
    values = [r["best_val_dice"] for r in runs if r.get("status") == "ok" and isinstance(r.get("best_val_dice"), float)]
    return sum(values) / len(values) if values else None


def write_claims(path: Path, claims: list[Claim], scope: str) -> Path:
    """claims.md: the verdict table, then each claim's comparisons with their statistics."""
    lines = [
        "# The normalization papers' claims, tested on this sweep", "",
        f"**Scope: {scope}** These verdicts say whether each claim holds for these runs; they say nothing "
        "about the papers' own data sets.", "",
        "How: each layer's learning rate was chosen on validation Dice (per fold and seed); two layers are "
        "compared on the test patients they share (runs with the same fold and seed), per-volume Dice averaged "
        f"per (seed, patient) -- the unit of the tests, so the seeds' training variance is in them; two-sided "
        f"Wilcoxon signed-rank test, Holm-corrected over the comparisons of a claim (alpha {ALPHA}; n: the "
        f"non-zero differences it used; none below {MIN_UNITS}); 95% t-interval of the mean difference. "
        f"\"A < B\" is reproduced when A is significantly worse, not reproduced when the interval excludes A "
        f"being worse by more than {MARGIN} Dice; \"A >= B\" is reproduced when the interval excludes A being "
        f"worse by more than {MARGIN} (non-inferiority), not reproduced when A is significantly worse or A diverged "
        f"on a seed where B finished; anything else is inconclusive. **insufficient**: an arm finished on fewer "
        f"than {MIN_SEEDS} seeds, or does not segment (mean test Dice below {FLOOR_FRACTION} x the best arm's of "
        f"its context, or the best arm below {MIN_BEST}), or too few paired differences: the runs do not "
        f"support a verdict. Each arm's finished seeds and run statuses, and the difference of each seed, are "
        f"listed under its comparison.", "",
        "| # | claim | source | where | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        lines.append(f"| {claim.number} | {claim.statement} | {claim.source} | {claim.context or '—'} | "
                     f"**{claim.verdict}** |")
    lines.append("")
    for claim in claims:
        heading = f"{claim.context}: {claim.verdict}" if claim.context else "not tested"
        lines += [f"## {claim.number}. {claim.statement} — {heading}", ""]
        if claim.note:
            lines += [claim.note, ""]
        lines += [f"- {comparison.text()}" for comparison in claim.comparisons]
        lines += [f"- {line}" for line in claim.context_lines]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)
