"""The estimate before a sweep (seg/training/estimate.py): the number of runs as Hydra's sweeper expands the grid,
and the wall-time estimate printed by ``python train.py -m`` before its first job, with any launcher."""

from __future__ import annotations

import re

import pytest

from conftest import compose_train, multirun_config, run_train
from seg.training.estimate import Measured, SweepEstimate, duration, launcher_of, stack_size, sweep_jobs

TINY = ["experiment=smoke", "data.image_size=32", "data.phantom.num_patients=6", "trainer.progress=false"]
ESTIMATE = re.compile(r"Sweep: (\d+) runs \(launcher (\w+)\): estimated wall time about ([\d.]+) (s|min|h) on this "
                      r"machine\.\n  An estimate, measured in \d+ s on the first job \((.*?)\): (\d+) (training|stacked) "
                      r"steps")


@pytest.mark.parametrize("overrides, runs", [
    (["experiment=iln_paper"], 360),  # the preset's grid: 2 tasks x 6 norms x 5 rates x 2 folds x 3 seeds
    (["experiment=iln_paper", "norm=iln", "lr=0.5,0.1"], 2 * 1 * 2 * 2 * 3),  # the command line replaces a row
    (["experiment=claims"], 36),
    (["norm=bn,in,ln", "lr=1.0,0.5", "seed=0,1"], 12),
    (["norm=bn"], 1),
])
def test_the_runs_are_counted_as_the_sweeper_expands_the_grid(overrides, runs):
    jobs = sweep_jobs(multirun_config(*overrides))
    assert len(jobs) == runs and len({tuple(job) for job in jobs}) == runs


def test_the_first_job_is_the_first_the_sweeper_launches():
    jobs = sweep_jobs(multirun_config("experiment=iln_paper"))
    assert "data.task=rv" in jobs[0] and "norm=bn" in jobs[0] and "lr=1.5" in jobs[0] and "seed=0" in jobs[0]


def test_another_sweeper_gets_no_count():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    config = multirun_config("hparams_search=lr_optuna")
    assert sweep_jobs(config) is None
    assert "no estimate" in SweepEstimate().estimate(config, "train")


def test_the_launcher_is_named_with_its_parallelism_and_stack_size():
    assert launcher_of(compose_train(hydra=True)) == ("basic", 1, 1)
    assert launcher_of(compose_train("hydra/launcher=stacked", "hydra.launcher.max_runs=6", hydra=True)) == \
        ("stacked", 1, 6)


def test_a_run_costs_its_steps_its_validations_and_its_test():
    measured = Measured(step_s=0.05, val_s=2.0, test_s=3.0, steps=400, epochs=4, how="", data_s=0.0)
    assert measured.run_s == pytest.approx(400 * 0.05 + 4 * 2.0 + 3.0)
    assert (duration(0.42), duration(30), duration(600), duration(3 * 3600)) == ("0.4 s", "30 s", "10 min", "3.0 h")


def test_a_disabled_estimate_prints_nothing(capsys):
    SweepEstimate(enabled=False).on_multirun_start(multirun_config("norm=bn,gn"))
    assert capsys.readouterr().out == ""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "stacked"])
def test_a_sweep_prints_its_runs_and_estimate_before_its_first_job(data_dir, tmp_path, launcher):
    chosen = [] if launcher == "basic" else ["hydra/launcher=stacked"]
    result = run_train("-m", *TINY, *chosen, "norm=bn", "lr=0.1,0.05", "seed=0,1", f"paths.data_dir={data_dir}",
                       f"hydra.sweep.dir={tmp_path}")
    found = ESTIMATE.search(result.stdout)
    assert found, result.stdout
    assert found[1] == "4" and found[2] == launcher and float(found[3]) > 0
    assert "norm=bn lr=0.1 seed=0" in found[5]
    assert found[7] == ("stacked" if launcher == "stacked" else "training")
    assert "It assumes every run costs what the first does" in result.stdout
    assert result.stdout.index("Sweep: 4 runs") < result.stdout.index("Done in")  # before the first job


@pytest.mark.slow
def test_the_estimate_can_be_turned_off_and_a_bad_value_is_left_to_the_jobs(data_dir, tmp_path):
    off = run_train("-m", *TINY, "norm=bn", "lr=0.1,0.05", "hydra.callbacks.estimate.enabled=false",
                    f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'off'}")
    assert "Sweep:" not in off.stdout and "Done in" in off.stdout
    bad = run_train("-m", *TINY, "norm=bn", "lr=-1,0.05", f"paths.data_dir={data_dir}",
                    f"hydra.sweep.dir={tmp_path / 'bad'}", check=False)
    assert "Sweep: 2 runs (launcher basic); no estimate of its wall time (the first job could not be measured: " \
        in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


@pytest.mark.parametrize("overrides, max_runs, size", [
    (["experiment=iln_paper"], 8, 60 // 8 + 1),  # a norm's 60 jobs in 8 stacks: 7 or 8 runs, the first of 8
    (["experiment=iln_paper"], 16, 15),  # 60 in 4 stacks of 15
    (["norm=bn,iln", "lr=0.5,0.1", "data.task=rv,lv"], 8, 4),  # one stack per norm
    (["norm=bn", "trainer.batch_size=1,2", "seed=0,1,2"], 8, 3),  # batch sizes never share a stack
    (["norm=bn", "model.depth=3,4", "lr=0.1,0.05"], 8, 2),
])
def test_the_stack_timed_is_as_large_as_the_first_jobs_stack(overrides, max_runs, size):
    assert stack_size(sweep_jobs(multirun_config(*overrides)), max_runs) == size


def test_a_config_group_choice_is_counted_as_shared():
    """experiment=claims: each +claim arm sets its norm and batch size; the first arm's stack is counted from its
    own 3 seeds (the launcher also stacks shift_bn with it: the estimate can only be longer)."""
    jobs = sweep_jobs(multirun_config("experiment=claims"))
    assert stack_size(jobs, 8, frozenset({"norm", "model", "claim"})) == 3
    assert stack_size(jobs, 8, frozenset()) == 8  # blind to the group: all 36 jobs would look alike
