"""End to end: train.py as a subprocess on real files, checking what a user gets."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_train
from seg.runtime.checkpoint import load_checkpoint
from seg.model.unet import UNet

REQUIRED = {"status", "dice", "dice_2d", "best_val_dice", "norm", "lr", "batch_size", "seed", "wall_time_s",
            "images_per_s"}


def smoke(data_dir, *overrides):
    """The smoke experiment on a 6-patient phantom in the shared data folder."""
    return ["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
            "trainer.progress=false", *overrides]


@pytest.mark.slow
def test_smoke_run_on_the_phantom(data_dir, tmp_path):
    result = run_train(*smoke(data_dir, "norm=iln", "lr=0.5", f"hydra.run.dir={tmp_path}"))
    assert "Device: cpu" in result.stdout and "test Dice, 3D per volume" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED <= set(metrics)
    assert metrics["status"] == "ok" and (metrics["norm"], metrics["lr"], metrics["batch_size"]) == ("iln", 0.5, 2)
    assert 0 <= metrics["dice"] <= 1 and 0 <= metrics["dice_2d"] <= 1 and metrics["images_per_s"] > 0
    # 16 channels in 16 groups: rho cannot act there (docs/layers.md), so it is named, not logged as a choice
    assert metrics["mixing_weights_inert"]["down.0.first.conv_norm.norm"] == "rho has no effect (channels = groups)"
    assert "down.0.first.conv_norm.norm" not in metrics["mixing_weights"]
    assert set(metrics["mixing_weights"]["down.1.first.conv_norm.norm"]) == {"sigmoid_rho"}
    assert "the mixing weights of 5 layers cannot act" in result.stdout

    events = EventAccumulator(str(tmp_path)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/dice", "val/dice_2d", "perf/images_per_s", "test/dice"} <= scalars
    assert "norm/down.1.first.conv_norm.norm/sigmoid_rho" in scalars
    assert "norm/down.0.first.conv_norm.norm/sigmoid_rho" not in scalars
    assert "val/input_truth_prediction" in events.Tags()["images"]
    assert len(events.Scalars("train/loss")) == metrics["steps"]
    assert len(events.Scalars("perf/images_per_s")) == metrics["epochs"]  # throughput every epoch
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams view

    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "checkpoints" / name)
        model = UNet(num_classes=2, depth=2, norm="iln")
        model.load_state_dict(state["model"])
        assert state["config"]["norm"]["name"] == "iln"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["run_state"]["step"] == metrics["steps"]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["best_epoch"] == metrics["best_epoch"]
    assert not list(tmp_path.rglob("*tmp*"))


@pytest.mark.slow
def test_phantom_is_generated_once(data_dir, tmp_path):
    run_train(*smoke(data_dir, f"hydra.run.dir={tmp_path / 'a'}"))
    again = run_train(*smoke(data_dir, f"hydra.run.dir={tmp_path / 'b'}"))
    assert "Generating the built-in phantom" not in again.stdout
    assert (data_dir / "phantom-n6-seed0" / "phantom.json").is_file()


@pytest.mark.slow
def test_same_seed_same_result(data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_train(*smoke(data_dir, "seed=3", f"hydra.run.dir={tmp_path / name}"))
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["dice"] == runs[1]["dice"]
    assert [h["train_loss"] for h in runs[0]["history"]] == [h["train_loss"] for h in runs[1]["history"]]


@pytest.mark.slow
def test_multirun_writes_one_summary_table(data_dir, tmp_path):
    run_train("-m", *smoke(data_dir, "norm=bn,gn", "lr=0.1", f"hydra.sweep.dir={tmp_path}"))
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2 and "norm=bn" in runs[0] and "norm=gn" in runs[1] and all("lr=0.1" in r for r in runs)
    table = (tmp_path / "summary.md").read_text()
    assert "| run | norm | lr |" in table
    assert f"| {runs[0]} | bn | 0.1 | 2 | 0 | ok |" in table and f"| {runs[1]} | gn | 0.1 | 2 | 0 | ok |" in table
    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:7] == ["run", "norm", "lr", "batch_size", "seed", "status", "dice"] and len(rows) == 3
    assert {row[1] for row in rows[1:]} == {"bn", "gn"} and {row[5] for row in rows[1:]} == {"ok"}


@pytest.mark.slow
def test_divergence_ends_cleanly_with_status(data_dir, tmp_path):
    result = run_train(*smoke(data_dir, "norm=none", "lr=1e12", "model.init=kaiming",
                              f"hydra.run.dir={tmp_path}"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert result.returncode == 0 and "Run diverged" in result.stdout
    assert metrics["status"] == "diverged" and metrics["dice"] is None and metrics["diverged_step"] >= 1
    assert not math.isfinite(float(metrics["diverged_loss"]))


@pytest.mark.slow
def test_acdc_tree_and_bad_root(acdc_root, tmp_path):
    run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "data.task=multi",
              "trainer.progress=false", f"hydra.run.dir={tmp_path / 'ok'}")
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert {"dice_rv", "dice_myo", "dice_lv"} <= set(metrics)

    (tmp_path / "empty").mkdir()
    bad = run_train("experiment=smoke", "data=acdc", f"data.root={tmp_path / 'empty'}",
                    f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode == 1 and "no patient folders found" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["status"] == "failed"



# ---------------------------------------------------------------------------- learning rate and loss


def lr_per_epoch(run_dir):
    """The learning rate TensorBoard logged at the last step of each epoch, and metrics.json's per epoch."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = {event.step: event.value for event in EventAccumulator(str(run_dir)).Reload().Scalars("train/lr")}
    return [logged[h["step"]] for h in metrics["history"]], [h.get("lr") for h in metrics["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,overrides,factors", [
    ("step", ["schedule=step", "schedule.milestones=[2]"], [1.0, 1.0, 0.2]),  # divided by 5 after epoch 2
    ("constant", ["schedule=constant"], [1.0, 1.0, 1.0]),
    ("poly", ["schedule=poly"], [1.0, (2 / 3) ** 0.9, (1 / 3) ** 0.9]),  # nnU-Net's (1 - (e-1)/E) ** 0.9
])
def test_the_schedule_sets_the_logged_learning_rate(data_dir, tmp_path, schedule, overrides, factors):
    run_train(*smoke(data_dir, "lr=0.1", "trainer.epochs=3", *overrides, f"hydra.run.dir={tmp_path}"))
    logged, recorded = lr_per_epoch(tmp_path)
    expected = [0.1 * factor for factor in factors]
    assert logged == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32
    assert recorded == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["schedule"] == schedule


@pytest.mark.slow
def test_optim_lr_cannot_train_at_another_rate_than_the_one_recorded(data_dir, tmp_path):
    result = run_train(*smoke(data_dir, "optim.lr=0.3", f"hydra.run.dir={tmp_path}"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: optim.lr=0.3 differs from lr=0.1" in result.stderr and "lr=0.3" in result.stderr
    run_train(*smoke(data_dir, "lr=0.3", f"hydra.run.dir={tmp_path / 'ok'}"))  # the way to say it
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    logged, _ = lr_per_epoch(tmp_path / "ok")
    assert metrics["lr"] == 0.3 and logged[0] == pytest.approx(0.3)  # recorded = trained


@pytest.mark.slow
def test_dice_ce_is_cross_entropy_plus_a_dice_term(data_dir, tmp_path):
    """The first step sees the same weights and batch with either loss: DiceCE's loss exceeds the
    cross-entropy by MONAI's Dice loss, a number in (0, 1); a fallback to cross-entropy would give 0."""
    first = {}
    for loss in ("ce", "dice_ce"):
        run_train(*smoke(data_dir, f"loss={loss}", "trainer.deterministic=true", f"hydra.run.dir={tmp_path / loss}"))
        first[loss] = EventAccumulator(str(tmp_path / loss)).Reload().Scalars("train/loss")[0].value
        assert json.loads((tmp_path / loss / "metrics.json").read_text())["loss"] == loss
    assert 0.05 < first["dice_ce"] - first["ce"] < 1.0, first


# ---------------------------------------------------------------------------- sweeps


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_sweep_interrupted_and_resumed_continues_each_job_in_its_folder(data_dir, tmp_path, sig):
    """The README's way: the same command with trainer.resume=true; each job continues in its own folder
    (trainer.resume does not rename it), and the study table counts each cell once."""
    sweep = ["-m", *smoke(data_dir, "norm=bn,gn", "trainer.epochs=3", "trainer.checkpoint_every_n_steps=2",
                          f"hydra.sweep.dir={tmp_path}")]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *sweep], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("0_*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    assert process.returncode == (75 if sig == signal.SIGTERM else -signal.SIGKILL), out + err
    assert not list(tmp_path.glob("1_*/metrics.json"))  # the second job had not run

    resumed = run_train(*sweep, "trainer.resume=true")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and jobs[0].name.startswith("0_") and jobs[1].name.startswith("1_"), jobs
    assert "trainer.resume" not in jobs[0].name
    assert "Resuming" in resumed.stdout
    statuses = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert [(m["norm"], m["status"]) for m in statuses] == [("bn", "ok"), ("gn", "ok")]
    assert statuses[0]["resumed_from"] is not None and statuses[1]["resumed_from"] is None
    table = (tmp_path / "paper_table.md").read_text()
    assert "Runs per cell: 1\n" in table  # each cell counted once
    assert (tmp_path / "summary.md").read_text().count("| ok |") == 2


FAULT = '''# An unexpected error in one job of a sweep: the optimizer step fails when the rate is 0.05.
import torch.optim

_step = torch.optim.SGD.step


def step(self, *args, **kwargs):
    if self.param_groups[0]["lr"] == 0.05:
        raise RuntimeError("injected fault in the optimizer step")
    return _step(self, *args, **kwargs)


torch.optim.SGD.step = step
'''


@pytest.mark.slow
def test_failed_jobs_do_not_end_a_sweep_and_its_exit_code_counts_them(data_dir, tmp_path):
    """lr=-1: a configuration error; lr=0.05: an unexpected error (a fault injected into the optimizer through
    sitecustomize); lr=0.1 runs. Every job runs; each failure is recorded with its message."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT)
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m",
                             *smoke(data_dir, "norm=bn", "lr=-1,0.05,0.1", f"hydra.sweep.dir={sweep_dir}")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0",
                                 "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 2, result.stdout + result.stderr  # two jobs failed
    assert "Traceback" not in result.stderr
    runs = {json.loads(p.read_text())["lr"]: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    assert sorted(runs) == [-1.0, 0.05, 0.1]
    assert runs[-1.0]["status"] == "failed" and "lr=-1.0 is out of range" in runs[-1.0]["error"]
    assert runs[0.05]["status"] == "failed" and "RuntimeError: injected fault" in runs[0.05]["error"]
    assert runs[0.1]["status"] == "ok"
    summary = (sweep_dir / "summary.md").read_text()
    assert "lr=-1.0 is out of range" in summary and "injected fault in the optimizer step" in summary
    assert "2 job(s) of the sweep failed" in result.stderr
