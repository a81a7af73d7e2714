"""The papers' claims (claims.md, seg/study/claims.py): the verdict logic on synthetic run folders whose answer is
known, the experiment=claims preset, and the preset run end to end at a tiny size."""

import json

import pytest

from conftest import run_train
from seg.study.summary import write_summary
from sweeps import run_metrics, write_run
from test_study import composed

pytest.importorskip("scipy")


def arm(sweep, name, norm, *, batch=1, offset=0.0, seeds=(0, 1, 2), val=0.8, lr=0.1, vendors=None, patients=8):
    """One arm of the claims preset: ``norm`` at ``batch`` on 2 folds x ``seeds``, its per-volume Dice the
    shared base + ``offset`` (folds f and seeds s test their own ``patients`` patients)."""
    for seed in seeds:
        for fold in (0, 1):
            ids = [100 * seed + fold * patients + i for i in range(patients)]
            if vendors and fold:  # a held-out vendor has no folds: one run per seed
                continue
            metrics = run_metrics(norm, patients=ids, offset=offset, batch=batch, fold=None if vendors else fold,
                                  seed=seed, val=val, lr=lr, test_vendors=vendors)
            write_run(sweep, f"{name}_f{fold}_s{seed}", metrics, overrides=[f"+claim={name}", f"seed={seed}"])


def claims(sweep) -> dict:
    """{claim number: the verdict line of the table}, after writing the summary."""
    write_summary(sweep, plots=False)
    text = (sweep / "claims.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return {int(row[0][2:]): row[4].strip(" |*") for row in rows}, text


def test_bn_degrading_while_gn_does_not_is_reproduced(tmp_path):
    sweep = tmp_path / "sweep"
    arm(sweep, "b1_bn", "bn", offset=-0.06)
    arm(sweep, "b8_bn", "bn", batch=8)
    arm(sweep, "b1_gn", "gn", offset=lambda p, f: 0.004 if p % 2 else -0.004)  # GN: no loss, a little noise
    arm(sweep, "b8_gn", "gn", batch=8)
    verdicts, text = claims(sweep)
    assert verdicts[1] == "reproduced"
    assert "BN (batch 1) < BN (batch 8): mean -0.060 [95% CI -0.060, -0.060], 48 (seed, patient) units" in text
    assert "GN (batch 1) >= GN (batch 8): mean +0.000" in text and text.count("-> **reproduced**") == 2
    assert "BN (batch 1): 3/3 seeds finished (runs: 6 ok), mean test Dice 0.684" in text
    assert "for reference, not in the verdict: BN change 8 -> 1 - GN change 8 -> 1: mean -0.060" in text
    assert "Scope: data=phantom (the built-in synthetic phantom" in text and "papers' own data sets" in text


def test_no_difference_in_the_batch_effect_is_not_reproduced_and_noise_is_inconclusive(tmp_path):
    same = tmp_path / "same"
    for name, norm, batch in (("b1_bn", "bn", 1), ("b8_bn", "bn", 8), ("b1_gn", "gn", 1), ("b8_gn", "gn", 8)):
        arm(same, name, norm, batch=batch, offset=-0.03 if batch == 1 else 0.0)  # both lose the same
    assert claims(same)[0][1] == "not reproduced"

    noisy = tmp_path / "noisy"
    arm(noisy, "b1_bn", "bn", offset=lambda p, f: 0.2 if p % 2 else -0.2)  # +-0.2 around the same mean
    arm(noisy, "b8_bn", "bn", batch=8)
    arm(noisy, "b1_gn", "gn")
    arm(noisy, "b8_gn", "gn", batch=8)
    assert claims(noisy)[0][1] == "inconclusive"

    few = tmp_path / "few"
    for name, norm, batch in (("b1_bn", "bn", 1), ("b8_bn", "bn", 8), ("b1_gn", "gn", 1), ("b8_gn", "gn", 8)):
        arm(few, name, norm, batch=batch, offset=-0.06 if name == "b1_bn" else 0.0, seeds=(0,), patients=2)
    verdicts, text = claims(few)
    assert verdicts[1] == "insufficient" and "BN (batch 1) finished on 1 seed(s), a verdict needs 3" in text


def test_layers_that_segment_nothing_give_no_verdict(tmp_path):
    """Models at Dice 0 (too little training): ILN "equals" BN and BIN on every volume, which says nothing
    about the layers; and a change measured from batch-8 arms that learned nothing is no change."""
    zero = lambda p, f: -0.55 - 0.025 * (p % 16) - (0.013 if f == "ES" else 0.0)  # noqa: E731  (base -> 0)
    for name, norm in (("b1_bn", "bn"), ("b1_bin", "bin"), ("b1_iln", "iln")):
        arm(tmp_path / "nothing", name, norm, offset=zero)
    verdicts, text = claims(tmp_path / "nothing")
    assert verdicts[3] == "insufficient" and "no arm of this context segments: the best mean test Dice is 0.000" in text

    for name, norm, batch, offset in (("b1_bn", "bn", 1, -0.2), ("b1_gn", "gn", 1, 0.0), ("b8_bn", "bn", 8, zero),
                                      ("b8_gn", "gn", 8, zero)):
        arm(tmp_path / "references", name, norm, batch=batch, offset=offset)
    verdicts, text = claims(tmp_path / "references")
    assert verdicts[1] == "insufficient"
    assert "BN (batch 8) does not segment (mean test Dice 0.000 < floor 0.372, 0.5 x the best arm's 0.744)" in text


def test_gn_significantly_worse_than_bn_contradicts_the_ral_claim(tmp_path):
    sweep = tmp_path / "sweep"
    arm(sweep, "b1_bn", "bn")
    arm(sweep, "b1_in", "in", offset=0.02)
    arm(sweep, "b1_gn", "gn", offset=-0.05)
    verdicts, text = claims(sweep)
    assert verdicts[2] == "not reproduced"
    assert "IN >= BN: mean +0.020" in text and "-> **reproduced**" in text
    assert "GN >= BN: mean -0.050" in text and "-> **not reproduced**" in text
    assert verdicts[1] == "not tested" and "needs BN and GN runs at a batch size <= 2 and at one >= 4" in text


def test_the_best_single_layer_is_chosen_on_validation(tmp_path):
    """LN tests best but validates worst: ILN is compared with BN (the best on validation), and ILN >= BN
    holds; had the best been chosen on test Dice, ILN >= LN would have failed."""
    sweep = tmp_path / "sweep"
    arm(sweep, "b1_bn", "bn", val=0.9)
    arm(sweep, "b1_ln", "ln", val=0.6, offset=0.1)
    arm(sweep, "b1_bin", "bin", offset=-0.005)
    arm(sweep, "b1_iln", "iln")
    verdicts, text = claims(sweep)
    assert "best single layer on validation: BN (mean validation Dice 0.900; BN 0.900, LN 0.600)" in text
    assert "ILN >= BN: mean +0.000" in text and "ILN >= BIN: mean +0.005" in text
    assert verdicts[3] == "reproduced"


def test_a_conditional_layer_beating_bn_on_the_held_out_vendor(tmp_path):
    sweep = tmp_path / "sweep"
    arm(sweep, "b1_bn", "bn")
    arm(sweep, "b1_in", "in")
    for name, norm, offset in (("shift_bn", "bn", 0.0), ("shift_in", "in", 0.0), ("shift_cin", "cin", 0.04)):
        arm(sweep, name, norm, offset=offset, vendors=["C"], seeds=(0, 1, 2))
    verdicts, text = claims(sweep)
    assert verdicts[4] == "reproduced"  # one of IN, CIN beats BN: CIN by 0.04 on every volume
    assert "test_vendors=C" in text and "BN < CIN: mean -0.040" in text and "BN < IN: mean +0.000" in text
    # the held-in runs (no held-out vendor) are tables of their own, not runs "fixed" at test vendor C
    table = (sweep / "paper_table.md").read_text()
    fixed = next(line for line in table.splitlines() if line.startswith("Fixed in this sweep"))
    assert "vendors" not in fixed and "test_vendors=C" in table and "test_vendors=-" in table


def test_claim_4_is_tested_per_augmentation_and_says_which(tmp_path):
    """experiment=domain_shift's augmentation factor: claim 4 in each preset's context, its note saying which,
    so a layer's gain without augmentation is told apart from its gain on top of it."""
    sweep = tmp_path / "sweep"
    for vendor in ("C", "D"):  # two held-out vendors, as the preset's leave-one-out
        for preset, cin_gain in (("none", 0.04), ("nnunet", 0.0)):
            for norm, offset in (("bn", 0.0), ("cin", cin_gain)):
                for seed in (0, 1, 2):
                    metrics = run_metrics(norm, patients=[100 * seed + i for i in range(8)], offset=offset, batch=1,
                                          fold=None, seed=seed, val=0.8, lr=0.1, test_vendors=[vendor])
                    write_run(sweep, f"{vendor}_{norm}_{preset}_s{seed}", metrics,
                              overrides=[f"norm={norm}", f"seed={seed}", f"data.test_vendors=[{vendor}]",
                                         f"data.augment.preset={preset}"])
    write_summary(sweep, plots=False)
    text = (sweep / "claims.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 4 ")]
    assert len(rows) == 4
    assert any("data.augment.preset=none" in r and "reproduced" in r and "not reproduced" not in r for r in rows)
    assert any("data.augment.preset=nnunet" in r and "not reproduced" in r for r in rows)
    assert "augmentation: none (data.augment.preset=none): the layer's effect alone" in text
    assert "augmentation: data.augment.preset=nnunet: the layer's effect on top of intensity augmentation" in text


# ---------------------------------------------------------------------------- the preset


@pytest.mark.slow
def test_claims_preset_holds_every_arm_with_three_seeds():
    cfg = composed("experiment=claims")
    params = cfg.hydra.sweeper.params
    arms = params["+claim"].split(",")
    assert len(params["seed"].split(",")) >= 3 and cfg.data.image_size in (64, 128)
    norms = {composed("experiment=claims", f"+claim={a}").norm.name for a in arms}
    assert {"bn", "in", "ln", "gn", "bin", "iln", "cin", "adain"} <= norms
    b8 = composed("experiment=claims", "+claim=b8_gn")
    assert (b8.trainer.batch_size, b8.trainer.epochs, b8.norm.name) == (8, 6, "gn")
    shift = composed("experiment=claims", "+claim=shift_cin")
    assert list(shift.data.test_vendors) == ["C"] and shift.trainer.batch_size == 1


# What the claims preset is shrunk to in the end-to-end test: 8 patients (2 per vendor: the held-out vendor
# needs patients of its own, and the other vendors a training and a validation patient), one seed, 32 px.
TINY_CLAIMS = ["data.phantom.num_patients=8", "data.image_size=32", "data.spacing=12.0",
               "data.max_slices_per_volume=2", "model.depth=2", "trainer.epochs=1", "schedule.milestones=[1]",
               "trainer.progress=false", "seed=0"]


@pytest.mark.slow
def test_claims_preset_runs_end_to_end_at_tiny_size(data_dir, tmp_path):
    run_train("experiment=claims", f"paths.data_dir={data_dir}", *TINY_CLAIMS, f"hydra.sweep.dir={tmp_path}")
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")]
    assert len(runs) == 12 and all(r["status"] == "ok" and r["per_volume"] for r in runs)
    assert {r["split"]["mode"] for r in runs} == {"random", "vendor"}
    text = (tmp_path / "claims.md").read_text()
    for number in (1, 2, 3, 4):
        assert f"| {number} | " in text
    assert "data=phantom (the built-in synthetic phantom, 8 patients, 32 px)" in text
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "paper_table.md").is_file()
