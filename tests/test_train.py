"""End to end: train.py as a subprocess on real files, checking what a user gets."""

import csv
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_train
from seg.checkpoint import load_checkpoint
from seg.unet import UNet

REQUIRED = {"status", "dice", "dice_2d", "best_val_dice", "norm", "lr", "batch_size", "seed", "wall_time_s",
            "images_per_s"}


def smoke(data_dir, *overrides):
    """The smoke experiment on a 6-patient phantom in the shared data folder."""
    return ["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
            "trainer.progress=false", *overrides]


def test_smoke_run_on_the_phantom(data_dir, tmp_path):
    result = run_train(*smoke(data_dir, "norm=iln", "lr=0.5", f"hydra.run.dir={tmp_path}"))
    assert "Device: cpu" in result.stdout and "test Dice, 3D per volume" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED <= set(metrics)
    assert metrics["status"] == "ok" and (metrics["norm"], metrics["lr"], metrics["batch_size"]) == ("iln", 0.5, 2)
    assert 0 <= metrics["dice"] <= 1 and 0 <= metrics["dice_2d"] <= 1 and metrics["images_per_s"] > 0
    assert set(metrics["mixing_weights"]["down.0.first.conv_norm.norm"]) == {"sigmoid_rho"}

    events = EventAccumulator(str(tmp_path)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/dice", "val/dice_2d", "perf/images_per_s", "test/dice"} <= scalars
    assert "norm/down.0.first.conv_norm.norm/sigmoid_rho" in scalars
    assert "val/input_truth_prediction" in events.Tags()["images"]
    assert len(events.Scalars("train/loss")) == metrics["steps"]
    assert len(events.Scalars("perf/images_per_s")) == metrics["epochs"]  # throughput every epoch
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams view

    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "checkpoints" / name)
        model = UNet(num_classes=2, depth=2, norm="iln")
        model.load_state_dict(state["model"])
        assert state["config"]["norm"]["name"] == "iln" and state["progress"]["step"] == metrics["steps"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_phantom_is_generated_once(data_dir, tmp_path):
    run_train(*smoke(data_dir, f"hydra.run.dir={tmp_path / 'a'}"))
    again = run_train(*smoke(data_dir, f"hydra.run.dir={tmp_path / 'b'}"))
    assert "Generating the built-in phantom" not in again.stdout
    assert (data_dir / "phantom-n6-seed0" / "phantom.json").is_file()


def test_same_seed_same_result(data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_train(*smoke(data_dir, "seed=3", f"hydra.run.dir={tmp_path / name}"))
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["dice"] == runs[1]["dice"]
    assert [h["train_loss"] for h in runs[0]["history"]] == [h["train_loss"] for h in runs[1]["history"]]


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


def test_divergence_ends_cleanly_with_status(data_dir, tmp_path):
    result = run_train(*smoke(data_dir, "norm=none", "lr=1e12", "model.init=kaiming",
                              f"hydra.run.dir={tmp_path}"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert result.returncode == 0 and "Run diverged" in result.stdout
    assert metrics["status"] == "diverged" and metrics["dice"] is None and metrics["diverged_step"] >= 1
    assert not math.isfinite(float(metrics["diverged_loss"]))


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


@pytest.mark.parametrize("loss", ["dice_ce"])
def test_dice_ce_loss(acdc_root, tmp_path, loss):
    run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", f"loss={loss}", "trainer.progress=false",
              f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
