"""Paired statistics of a sweep (comparison.md/.csv/.png) on synthetic run folders whose answer is known,
and the statistical building blocks (seg/study/stats.py) against textbook values."""

import csv
import math

import pytest

from seg.study.stats import MIN_UNITS, holm, nemenyi_cd, ranks, t_interval, wilcoxon_p
from seg.study.summary import write_summary
from sweeps import run_metrics, two_fold_sweep, write_run

pytest.importorskip("scipy")


def pair_rows(sweep):
    with open(sweep / "comparison.csv", newline="") as handle:
        return {(r["a"], r["b"]): r for r in csv.DictReader(handle) if r["kind"] == "pair"}


# ---------------------------------------------------------------------------- known answers


def test_a_layer_better_on_every_volume_is_significantly_better(tmp_path):
    """iln = bn + 0.05 on every volume of 12 patients (2 folds x 6): p = 2 / 2**12 (exact), interval [0.05, 0.05]."""
    sweep = two_fold_sweep(tmp_path / "sweep", {"bn": 0.0, "iln": 0.05})
    write_summary(sweep, plots=False)
    row = pair_rows(sweep)[("bn", "iln")]
    assert int(row["n"]) == 12  # (seed, patient) units, not the 24 volumes: a patient's ED and ES are not independent
    assert float(row["mean"]) == pytest.approx(-0.05) and float(row["ci_low"]) == pytest.approx(-0.05)
    assert float(row["p"]) == pytest.approx(2 / 2**12) and row["result"] == "bn < iln"
    text = (sweep / "comparison.md").read_text()
    assert ("| bn | iln | 12 (of 12) | -0.050 | [-0.050, -0.050] | 0: -0.050 | 0.00049 (Holm 0.00049) | bn < iln |"
            in text)
    assert "95% t-intervals" in text and "(seed, patient)" in text


def test_identical_layers_are_not_different(tmp_path):
    sweep = two_fold_sweep(tmp_path / "sweep", {"bn": 0.0, "gn": 0.0})
    write_summary(sweep, plots=False)
    row = pair_rows(sweep)[("bn", "gn")]
    assert float(row["p"]) == 1.0 and row["result"] == "identical on all 12 (seed, patient) units (p = 1)"


def test_too_few_patients_give_no_p_value(tmp_path):
    sweep = tmp_path / "sweep"
    for norm, offset in (("bn", 0.0), ("iln", 0.05)):  # one run each, 3 test patients
        write_run(sweep, norm, run_metrics(norm, patients=[1, 2, 3], offset=offset))
    write_summary(sweep, plots=False)
    row = pair_rows(sweep)[("bn", "iln")]
    assert row["p"] == "" and row["result"].startswith("too few non-zero paired differences for a test (n = 3")
    assert "| bn | iln | 3 (of 3) | -0.050 | [-0.050, -0.050] | 0: -0.050 | — | too few non-zero paired" in \
        (sweep / "comparison.md").read_text()


def test_no_interval_from_one_patient(tmp_path):
    """One shared patient: a mean difference, but no interval (it was printed as [0.150, 0.150])."""
    sweep = tmp_path / "sweep"
    for norm, offset in (("bn", 0.0), ("iln", 0.15)):
        write_run(sweep, norm, run_metrics(norm, patients=[1], offset=offset))
    write_summary(sweep, plots=False)
    assert "| bn | iln | 1 (of 1) | -0.150 | [—, —] |" in (sweep / "comparison.md").read_text()


def test_only_runs_sharing_fold_and_seed_are_paired(tmp_path):
    """bn on seed 0 and iln on seed 1 saw different splits: nothing to pair, whatever their patient ids."""
    sweep = tmp_path / "sweep"
    patients = list(range(8))
    write_run(sweep, "bn", run_metrics("bn", patients=patients, seed=0))
    write_run(sweep, "iln", run_metrics("iln", patients=patients, seed=1, offset=0.05))
    write_summary(sweep, plots=False)
    assert int(pair_rows(sweep)[("bn", "iln")]["n"]) == 0


def test_holm_over_the_pairs_and_average_ranks(tmp_path):
    """bn < gn = iln - 0.03 on every volume, 2 folds x 3 seeds: three pairs in one Holm family; in every
    block iln ranks 1, gn 2, bn 3; with 3 norms and 6 blocks the critical-difference diagram is drawn."""
    sweep = two_fold_sweep(tmp_path / "sweep", {"bn": 0.0, "gn": 0.02, "iln": 0.05}, seeds=(0, 1, 2))
    write_summary(sweep)
    rows = pair_rows(sweep)
    # 36 patients (2 folds x 3 seeds x 6), every difference of one sign and size: the same p for each pair
    p = float(rows[("bn", "gn")]["p"])
    assert p < 1e-6
    for pair in (("bn", "gn"), ("bn", "iln"), ("gn", "iln")):
        assert int(rows[pair]["n"]) == 36 and float(rows[pair]["p"]) == pytest.approx(p)
        assert float(rows[pair]["p_holm"]) == pytest.approx(3 * p)  # Holm: 3p, 2p, p -> running maximum 3p
    text = (sweep / "comparison.md").read_text()
    assert "| iln | 1.00 |\n| gn | 2.00 |\n| bn | 3.00 |" in text
    assert f"Nemenyi CD (alpha 0.05) = {nemenyi_cd(3, 6):.3f}; critical-difference diagram in comparison.png" in text
    assert (sweep / "comparison.png").stat().st_size > 5000


def test_the_comparison_uses_the_rate_chosen_on_validation(tmp_path):
    """gn at lr 0.5 validates best but tests worst: the comparison takes it, not gn's best test rate."""
    sweep = tmp_path / "sweep"
    for fold in (0, 1):
        patients = [fold * 6 + i for i in range(6)]
        write_run(sweep, f"bn_f{fold}", run_metrics("bn", patients=patients, fold=fold, val=0.8))
        write_run(sweep, f"gn_0.5_f{fold}", run_metrics("gn", patients=patients, fold=fold, lr=0.5, val=0.9,
                                                        offset=-0.04))
        write_run(sweep, f"gn_0.1_f{fold}", run_metrics("gn", patients=patients, fold=fold, lr=0.1, val=0.7,
                                                        offset=+0.04))
    write_summary(sweep, plots=False)
    row = pair_rows(sweep)[("bn", "gn")]
    assert float(row["mean"]) == pytest.approx(0.04) and row["result"] == "bn > gn"


def test_runs_without_per_volume_dice_are_named(tmp_path):
    sweep = two_fold_sweep(tmp_path / "sweep", {"bn": 0.0, "iln": 0.05})
    old = run_metrics("gn", patients=[0, 1], fold=0)
    del old["per_volume"]
    write_run(sweep, "gn_old", old)
    write_summary(sweep, plots=False)
    assert "1 finished run(s) have no per-volume Dice" in (sweep / "comparison.md").read_text()


# ---------------------------------------------------------------------------- building blocks


def test_holm_adjustment():
    # textbook example: p = 0.01, 0.04, 0.03, 0.005 -> 0.03, 0.06, 0.06, 0.02
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])


def test_wilcoxon_needs_six_pairs():
    assert wilcoxon_p([0.1] * (MIN_UNITS - 1)) is None
    assert wilcoxon_p([0.1] * MIN_UNITS) == pytest.approx(2 / 2**MIN_UNITS)  # < 0.05: the smallest n that can be
    assert wilcoxon_p([0.0] * 10) == 1.0
    assert wilcoxon_p([0.0] * 4 + [0.1] * (MIN_UNITS - 1)) is None  # the test drops zeros: 5 differences left


def test_t_interval_covers_the_mean_and_needs_two_values():
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8]
    low, high = t_interval(values)
    assert (low, high) == t_interval(values) and low < sum(values) / len(values) < high
    # scipy's t-interval of the mean
    from scipy import stats
    expected = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected)
    assert all(math.isnan(v) for v in t_interval([])) and all(math.isnan(v) for v in t_interval([0.15]))


def test_ranks_share_ties_and_put_failed_runs_last():
    assert ranks({"a": 0.9, "b": 0.8, "c": 0.8, "d": None, "e": None}) == {"a": 1, "b": 2.5, "c": 2.5, "d": 4.5,
                                                                            "e": 4.5}


def test_nemenyi_critical_difference_matches_demsar():
    # Demsar (JMLR 2006), table 5(a): q_0.05 = 2.343 (k=3), 2.850 (k=6); CD = q sqrt(k(k+1)/(6N))
    assert nemenyi_cd(3, 10) == pytest.approx(2.343 * math.sqrt(12 / 60), abs=1e-3)
    assert nemenyi_cd(6, 12) == pytest.approx(2.850 * math.sqrt(42 / 72), abs=1e-3)
