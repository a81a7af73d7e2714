"""Verdicts that cannot be made to lie: a real small sweep is trained once, and copies of it are edited as a
reviewer would (seeds diverged, one seed only, every layer at Dice 0.06, GN degrading, a candidate rate
truncated, interrupted or deleted); each must give the honest verdict or note. Also: the interval's coverage
and the non-inferiority error rate at the sizes of the claims preset (a simulation), duplicates never pooled,
and a sweep resumed with a changed grid."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_train
from seg.study.claims import MARGIN
from seg.study.stats import t_interval
from seg.study.summary import EXIT_INCOMPLETE, write_summary
from sweeps import run_metrics, write_run

pytest.importorskip("scipy")

ARMS = ("b1_bn", "b1_gn", "b8_bn", "b8_gn", "b1_bin", "b1_iln")
# the claims preset at a tiny size: 16 phantom patients (4 test patients per seed), 32 px, one epoch, 2 rates
TINY = ["experiment=claims", f"+claim={','.join(ARMS)}", "lr=0.1,0.05", "seed=0", "data.phantom.num_patients=16",
        "data.image_size=32", "data.spacing=12.0", "data.max_slices_per_volume=2", "model.depth=2",
        "trainer.epochs=1", "schedule.milestones=[1]", "trainer.progress=false"]


@pytest.fixture(scope="module")
def real_sweep(data_dir, tmp_path_factory):
    """The tiny claims sweep, trained once: 6 arms x 2 learning rates, seed 0."""
    sweep = tmp_path_factory.mktemp("real") / "sweep"
    run_train(*TINY, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}")
    assert len(list(sweep.glob("*/metrics.json"))) == 12
    return sweep


def arm_of(folder) -> str:
    return next(o.partition("=")[2] for o in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
                if o.startswith("+claim="))


def craft(real, target, dice, seeds=(0, 1, 2), status=None):
    """A copy of the real sweep with seed 0's runs replicated to ``seeds`` (each a folder of its own, recorded as
    that seed) and their per-volume Dice rewritten: ``dice(arm, seed, row)``; ``status(arm, seed)`` may end a run
    otherwise (e.g. "diverged"). The lr 0.1 run of every arm validates best (0.9 against 0.5)."""
    shutil.copytree(real, target)
    plan = yaml.safe_load((target / "multirun.yaml").read_text())
    task = plan["hydra"]["overrides"]["task"]
    plan["hydra"]["overrides"]["task"] = [f"seed={','.join(map(str, seeds))}" if o == "seed=0" else o for o in task]
    (target / "multirun.yaml").write_text(yaml.safe_dump(plan))
    for folder in sorted(p for p in target.iterdir() if (p / "metrics.json").is_file()):
        original = json.loads((folder / "metrics.json").read_text())
        for seed in seeds:
            copy = folder if seed == 0 else target / f"{folder.name.replace('seed=0', f'seed={seed}')}"
            if seed:
                shutil.copytree(folder, copy)
                overrides = yaml.safe_load((copy / ".hydra" / "overrides.yaml").read_text())
                overrides = [f"seed={seed}" if o == "seed=0" else o for o in overrides]
                (copy / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
                config = yaml.safe_load((copy / ".hydra" / "config.yaml").read_text())
                config["seed"] = seed
                (copy / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
            metrics = json.loads(json.dumps(original))
            metrics["seed"], metrics["split"]["seed"] = seed, seed
            name = arm_of(folder)
            for row in metrics["per_volume"]:
                row["dice"] = dice(name, seed, row)
            metrics["dice"] = sum(row["dice"] for row in metrics["per_volume"]) / len(metrics["per_volume"])
            metrics["best_val_dice"] = 0.9 if metrics["lr"] == 0.1 else 0.5
            ended = status(name, seed) if status else None
            if ended:
                metrics.update(status=ended, dice=None, dice_2d=None, best_val_dice=None)
            (copy / "metrics.json").write_text(json.dumps(metrics))
    return target


def patient_noise(row) -> float:
    """A small spread between patients and frames (real Dice are never all equal)."""
    number = int("".join(c for c in row["patient"] if c.isdigit()) or 0)
    return 0.01 * (number % 5) + (0.005 if row["case"].endswith("ES") else 0.0)


def verdicts(sweep) -> tuple[dict, str]:
    write_summary(sweep, plots=False)
    text = (sweep / "claims.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return {int(row[0][2:]): row[4].strip(" |*") for row in rows}, text


def good(arm, seed, row, shift=None):
    """Every arm at about 0.80; BN loses 0.2 at batch 1; ``shift``: {arm: offset}."""
    base = 0.8 + patient_noise(row) + 0.002 * seed
    return base + (shift or {}).get(arm, -0.2 if arm == "b1_bn" else 0.0)


# ---------------------------------------------------------------------------- crafted sweeps


@pytest.mark.slow
def test_the_honest_sweep_reproduces_claims_1_and_3(real_sweep, tmp_path):
    """The reference: with every arm finished on 3 seeds and segmenting, the verdicts are earned."""
    found, text = verdicts(craft(real_sweep, tmp_path / "s", good))
    assert found[1] == "reproduced" and found[3] == "reproduced", text
    assert "ILN: 3/3 seeds finished (runs: 3 ok)" in text and "per seed: 0 " in text


@pytest.mark.slow
def test_iln_diverged_on_two_of_three_seeds_is_not_reproduced(real_sweep, tmp_path):
    """It read "reproduced" (n = 8, p = 0.0078) and never mentioned the divergence."""
    sweep = craft(real_sweep, tmp_path / "s", good, status=lambda arm, seed: "diverged" if arm == "b1_iln" and seed
                  else None)
    found, text = verdicts(sweep)
    assert found[3] == "not reproduced"
    assert "ILN >= BIN" in text and "(ILN diverged on seed(s) 1, 2 where BIN finished)" in text
    assert "ILN: 1/3 seeds finished (runs: 1 ok, 2 diverged)" in text


@pytest.mark.slow
def test_iln_diverged_everywhere_against_a_working_bin_is_not_reproduced(real_sweep, tmp_path):
    """It read "inconclusive ... neither side segments", which is false: BIN segments at 0.78."""
    sweep = craft(real_sweep, tmp_path / "s", lambda arm, seed, row: 0.78 + patient_noise(row),
                  status=lambda arm, seed: "diverged" if arm == "b1_iln" else None)
    found, text = verdicts(sweep)
    assert found[3] == "not reproduced" and "ILN diverged on seed(s) 0, 1, 2 where BIN finished" in text
    assert "neither side segments" not in text


@pytest.mark.slow
def test_one_seed_gives_no_verdict(real_sweep, tmp_path):
    """Seed 0 alone read "reproduced" and seed 1 alone "not reproduced": one seed is no verdict."""
    found, text = verdicts(craft(real_sweep, tmp_path / "s", good, seeds=(0,)))
    assert found[1] == "insufficient" and found[3] == "insufficient"
    assert "ILN finished on 1 seed(s), a verdict needs 3" in text


@pytest.mark.slow
def test_every_layer_at_dice_0_06_gives_no_verdict(real_sweep, tmp_path):
    """A floor of 0.05 let layers at 0.06 "segment": claims 2 and 3 read reproduced."""
    found, text = verdicts(craft(real_sweep, tmp_path / "s", lambda arm, seed, row: 0.06 + patient_noise(row) / 10))
    assert found[1] == "insufficient" and found[3] == "insufficient"
    assert "no arm of this context segments: the best mean test Dice is 0.06" in text


@pytest.mark.slow
def test_gn_degrading_contradicts_claim_1(real_sweep, tmp_path):
    """GN losing 0.197 from batch 8 to batch 1 gave claim 1 "reproduced": only the difference of differences was
    tested. Both halves now are."""
    found, text = verdicts(craft(real_sweep, tmp_path / "s", lambda a, s, r: good(a, s, r, {"b1_bn": -0.25,
                                                                                           "b1_gn": -0.197})))
    assert found[1] == "not reproduced"
    assert "BN (batch 1) < BN (batch 8)" in text and "GN (batch 1) >= GN (batch 8): mean -0.197" in text


def summarize_process(sweep) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "seg.tools.summarize", str(sweep), "--no-plots"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "interrupted", "deleted"])
def test_a_headline_on_an_incomplete_choice_is_named_and_exits_3(real_sweep, tmp_path, damage):
    """The rate that validates best (lr 0.1) of BN at batch 1, seed 1, has no result: the headline row names it,
    and seg-summarize exits EXIT_INCOMPLETE with one line saying which choice."""
    sweep = craft(real_sweep, tmp_path / "s", good)
    folder = next(p for p in sweep.iterdir() if "claim=b1_bn" in p.name and "lr=0.1" in p.name and "seed=1" in p.name)
    expected = {"truncated": "lr 0.1 unreadable metrics.json", "interrupted": "lr 0.1 interrupted",
                "deleted": "lr 0.1 missing"}[damage]
    if damage == "truncated":
        text = (folder / "metrics.json").read_text()
        (folder / "metrics.json").write_text(text[: len(text) // 2])
    elif damage == "interrupted":
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics.update(status="interrupted", dice=None, best_val_dice=None)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    else:
        shutil.rmtree(folder)
    result = summarize_process(sweep)
    assert result.returncode == EXIT_INCOMPLETE == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning: incomplete choice")]
    assert len(lines) == 1 and "norm=bn" in lines[0] and "seed=1" in lines[0] and expected in lines[0]
    headline = (sweep / "paper_table.md").read_text().split("## Test Dice per learning rate")[0]
    assert f"choice incomplete in 1/3: {expected}" in headline

    intact = craft(real_sweep, tmp_path / "intact", good)
    assert summarize_process(intact).returncode == 0


# ---------------------------------------------------------------------------- intervals, simulated


def test_interval_coverage_and_non_inferiority_error_at_the_presets_sizes():
    """The percentile bootstrap covered 0.879 at n = 8 and "A >= B" at a true difference of -MARGIN came out 6%;
    the t-interval the verdicts use must cover >= 0.94 and err <= 3% (20 000 simulated studies)."""
    rng = np.random.default_rng(0)
    for n in (6, 8, 12):
        true, spread = -MARGIN, 0.03
        samples = rng.normal(true, spread, size=(20_000, n))
        low, high = t_interval(samples)
        coverage = np.mean((low <= true) & (true <= high))
        wrongly_non_inferior = np.mean(low > -MARGIN)  # "A >= B reproduced" while A is worse by the margin
        if n == 8:
            assert coverage >= 0.94
        assert coverage >= 0.93 and wrongly_non_inferior <= 0.03, (n, coverage, wrongly_non_inferior)


# ---------------------------------------------------------------------------- duplicates and resumed sweeps


def test_two_folders_of_one_configuration_are_not_pooled(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "0_norm=bn", run_metrics("bn", patients=[1, 2, 3], val=0.8), overrides=["norm=bn"])
    write_run(sweep, "3_norm=bn", run_metrics("bn", patients=[1, 2, 3], val=0.8), overrides=["norm=bn"])
    write_run(sweep, "1_norm=gn", run_metrics("gn", patients=[1, 2, 3], val=0.8), overrides=["norm=gn"])
    write_summary(sweep, plots=False)
    table = (sweep / "paper_table.md").read_text()
    assert "Runs per cell: 1" in table and "± 0.000" not in table
    assert "Duplicate runs of one configuration, not pooled: used " in table and "left out " in table
    assert "Duplicate runs" in (sweep / "summary.md").read_text()


TINY_RUN = ["experiment=smoke", "data.phantom.num_patients=6", "data.image_size=32", "data.spacing=12.0",
            "data.max_slices_per_volume=2", "model.depth=2", "trainer.epochs=1", "trainer.progress=false"]


@pytest.mark.slow
def test_a_sweep_resumed_with_a_changed_grid_trains_only_what_is_new(data_dir, tmp_path):
    """norm=bn,gn, then resumed as norm=gn,in: GN is job 0 now (it was job 1). Found by position, it trained
    again in a folder 0_norm=gn and the summary pooled the two GN runs as replicates."""
    sweep = tmp_path / "sweep"
    run_train("-m", *TINY_RUN, "norm=bn,gn", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}")
    gn = next(sweep.glob("1_*norm=gn*"))
    before = json.loads((gn / "metrics.json").read_text())
    run_train("-m", *TINY_RUN, "norm=gn,in", "trainer.resume=true", f"paths.data_dir={data_dir}",
              f"hydra.sweep.dir={sweep}")
    folders = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [name.split("_")[0] + " " + name.partition("norm=")[2].split(",")[0] for name in folders] == ["0 bn", "1 gn", "1 in"], \
        folders  # GN kept its folder (job 1 of the first launch); IN, job 1 now, trained in a new one
    after = json.loads((gn / "metrics.json").read_text())
    assert after["steps"] == before["steps"] and after["history"] == before["history"]  # not trained again
    table = (sweep / "paper_table.md").read_text()
    assert "Runs per cell: 1" in table and "Duplicate" not in table
