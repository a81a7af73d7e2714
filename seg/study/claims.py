"""The normalization papers' claims, tested on the runs of a sweep (claims.md).

Each claim is checked wherever the sweep holds the runs it needs (``experiment=claims`` holds all
of them), separately in each *context*: the runs that share everything but the layer, the batch
size, the learning rate, the fold and the seed (e.g. one task, one held-out vendor). A claim is made
of comparisons of two layers (or one layer at two batch sizes) on the same test patients
(seg/study/stats.py: paired per patient, Wilcoxon signed-rank, Holm-corrected within the claim, 95%
bootstrap interval of the mean difference). Every run is the one whose learning rate was chosen
on validation Dice (seg/study/summary.py), so no claim is judged on a rate picked by its test Dice.

A comparison "A < B" (A is worse) is
- *reproduced* when A is significantly worse: Holm-adjusted p < 0.05 and the interval of A - B
  below 0;
- *not reproduced* when the interval's lower end is above -``MARGIN`` (A is not worse by more
  than the margin, or is better);
- *inconclusive* otherwise, and whenever there are too few paired patients for a test.
A comparison "A >= B" is the opposite: not reproduced when A is significantly worse, reproduced
when the interval's lower end is above -``MARGIN`` (non-inferiority), inconclusive otherwise.
No verdict rests on layers that did not learn: a comparison where neither side reaches a mean
test Dice of ``FLOOR`` (claim 1: where a large-batch arm, the reference of the changes, does not)
is inconclusive -- two models that segment nothing are "equal" without telling anything.
A claim of several comparisons joined by "and" is reproduced when all are, not reproduced when
one is not; joined by "or", reproduced when one is, not reproduced when none can be.

The claims (as tested here):
1. BN degrades at batch size <= 2 while GN does not (Wu & He, "Group Normalization", ECCV 2018):
   BN loses more than GN from the largest batch size >= 4 to the smallest <= 2 -- per volume,
   (BN small - BN large) - (GN small - GN large) < 0 (without a held-out domain). The difference
   in differences cancels what the batch size does to both layers alike (on a small CPU budget the
   large batch takes fewer steps); the two plain comparisons are shown for reference.
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

from .stats import ALPHA, BOOTSTRAP_SEED, MIN_UNITS, RESAMPLES, Paired, pair_changes, pair_runs, set_holm

MARGIN = 0.01  # Dice: a layer "no worse" than another may be worse by less than this
FLOOR = 0.05  # mean Dice below which a layer has not learned to segment: no verdict rests on such a pair
SINGLE = ("bn", "in", "ln", "gn")
SHIFT_HELPERS = ("in", "iln", "bin", "cin", "adain", "spade", "sean")
DOMAIN_KEYS = ("test_vendors", "test_centres", "train_vendors", "train_centres")
AUGMENT_KEY = "data.augment.preset"  # a factor of experiment=domain_shift: claim 4 says which augmentation
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass
class Comparison:
    """One comparison of a claim: ``pair`` = A vs B; ``kind`` "<" (A is worse) or ">=" (A is no worse).

    ``references``: positions in ``pair.levels`` of the arms that must segment (mean Dice >= ``FLOOR``) for
    a verdict; None: at least one side must (two layers that both learned nothing are not compared).
    """

    pair: Paired
    kind: str
    references: tuple | None = None

    @property
    def unlearned(self) -> bool:
        levels = self.pair.levels
        if not levels:
            return False
        if self.references is None:
            return all(not level >= FLOOR for level in levels)
        return any(not levels[i] >= FLOOR for i in self.references)

    @property
    def verdict(self) -> str:
        if self.pair.too_few or self.unlearned:
            return "inconclusive"
        low, high = self.pair.ci
        worse = self.pair.significant() and self.pair.mean < 0 and high < 0
        no_worse = low > -MARGIN
        if self.kind == "<":
            return "reproduced" if worse else "not reproduced" if no_worse else "inconclusive"
        return "not reproduced" if worse else "reproduced" if no_worse else "inconclusive"

    def text(self) -> str:
        low, high = self.pair.ci
        numbers = (f"mean {self.pair.mean:+.3f} [95% CI {low:+.3f}, {high:+.3f}], n = {self.pair.n} patients, "
                   if self.pair.n else "no paired patients, ")
        missing = f"; {self.pair.missing_volumes} run(s) without per-volume Dice left out" \
            if self.pair.missing_volumes else ""
        levels = " / ".join(f"{level:.3f}" for level in self.pair.levels)
        which = "a reference arm does not segment" if self.references else "neither side segments"
        unlearned = f" (mean Dice {levels}: {which}, Dice < {FLOOR})" if self.unlearned else ""
        return (f"{self.pair.a} {self.kind} {self.pair.b}: {numbers}{self.pair.p_text()} -> "
                f"**{self.verdict}**{unlearned}{missing}")


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
            return "not reproduced" if all(v == "not reproduced" for v in verdicts) else "inconclusive"
        if "not reproduced" in verdicts:
            return "not reproduced"
        return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive"


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
        built = [claim_4(cells)] if shifted else [claim_1(cells), claim_2(cells), claim_3(cells)]
        for claim in built:
            if claim is not None:
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


def claim_1(cells: dict) -> Claim | None:
    batches = sorted({b for (norm, b) in cells if norm in ("bn", "gn") and isinstance(b, int)})
    both = [b for b in batches if ("bn", b) in cells and ("gn", b) in cells]
    small, large = [b for b in both if b <= 2], [b for b in both if b >= 4]
    if not small or not large:
        return None
    s, l = small[0], large[-1]
    bn, gn = (cells[("bn", s)], cells[("bn", l)]), (cells[("gn", s)], cells[("gn", l)])
    claim = Claim(1, *CLAIMS[1])
    # the large-batch arms are the references the changes are measured from: they must segment
    claim.comparisons = [Comparison(pair_changes(f"BN change {l} -> {s}", bn, f"GN change {l} -> {s}", gn), "<",
                                    references=(1, 3))]
    claim.context_lines = [f"for reference, not in the verdict: {c.text()}" for c in (
        Comparison(pair_runs(label("bn", s), bn[0], label("bn", l), bn[1]), "<"),
        Comparison(pair_runs(label("gn", s), gn[0], label("gn", l), gn[1]), ">="))]
    claim.note = (f"Tested as a difference in differences: per volume, (BN at batch {s} - BN at batch {l}) - "
                  f"(GN at batch {s} - GN at batch {l}) < 0, i.e. BN loses more than GN going to the small batch. "
                  f"What the batch size does to both layers alike (fewer steps, another rate) cancels.")
    return claim


def claim_2(cells: dict) -> Claim | None:
    if not all((norm, 1) in cells for norm in ("bn", "in", "gn")):
        return None
    claim = Claim(2, *CLAIMS[2])
    claim.comparisons = [Comparison(pair_runs(label(n), cells[(n, 1)], label("bn"), cells[("bn", 1)]), ">=")
                         for n in ("in", "gn")]
    return claim


def claim_3(cells: dict) -> Claim | None:
    singles = [n for n in SINGLE if (n, 1) in cells]
    if ("iln", 1) not in cells or not (singles or ("bin", 1) in cells):
        return None
    claim = Claim(3, *CLAIMS[3])
    if ("bin", 1) in cells:
        claim.comparisons.append(Comparison(pair_runs(label("iln"), cells[("iln", 1)], label("bin"),
                                                      cells[("bin", 1)]), ">="))
    scored = [(mean_validation(cells[(n, 1)]), n) for n in singles]
    scored = [(score, n) for score, n in scored if score is not None]
    if scored:  # ties go to the first in SINGLE's order (BN, IN, LN, GN)
        score, best = max(scored, key=lambda item: (item[0], -SINGLE.index(item[1])))
        claim.note = (f"best single layer on validation: {best.upper()} (mean validation Dice {score:.3f}; "
                      + ", ".join(f"{n.upper()} {v:.3f}" for v, n in sorted(scored, reverse=True)) + ")")
        claim.comparisons.append(Comparison(pair_runs(label("iln"), cells[("iln", 1)], label(best),
                                                      cells[(best, 1)]), ">="))
    elif singles:
        claim.note = "no single layer has a validation Dice: the best single layer cannot be chosen"
    return claim if claim.comparisons else None


def claim_4(cells: dict) -> Claim | None:
    batches = sorted(b for (norm, b) in cells if norm == "bn" and isinstance(b, int))
    for batch in batches:
        helpers = [n for n in SHIFT_HELPERS if (n, batch) in cells]
        if helpers:
            claim = Claim(4, *CLAIMS[4], join="or")
            claim.comparisons = [Comparison(pair_runs(label("bn"), cells[("bn", batch)], label(n),
                                                      cells[(n, batch)]), "<") for n in helpers]
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
        f"per patient; two-sided Wilcoxon signed-rank test, Holm-corrected over the comparisons of a claim "
        f"(alpha {ALPHA}); 95% percentile bootstrap interval of the mean difference ({RESAMPLES} resamples, "
        f"seed {BOOTSTRAP_SEED}); no test below {MIN_UNITS} paired patients. \"A < B\" is reproduced when A is "
        f"significantly worse, not reproduced when the interval excludes A being worse by more than {MARGIN} "
        f"Dice; \"A >= B\" is reproduced when the interval excludes A being worse by more than {MARGIN}, not "
        f"reproduced when A is significantly worse; anything else is inconclusive, and so is a comparison of "
        f"layers that do not segment (mean Dice below {FLOOR} on both sides; claim 1: in a large-batch arm).", "",
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
