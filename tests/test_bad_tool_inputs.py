"""Bad inputs of the tools beside train.py, where they need no process of their own: an ensemble of a sweep's
jobs named as typed (folder names hold commas) or by a glob, the summary row of a run whose metrics.json cannot
be read, and the GPU check's estimate of the full grid from jobs that are not the study's. The cases that need a
trained checkpoint and a process (NaN weights, a diverged run, tta on a model trained without flips, an output
that is a folder, max_runs) are rows of the shared bad-input table (scripts/bad_inputs.py)."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

import gpu_steps  # scripts/gpu_steps.py (scripts/ is on pytest's pythonpath)
from seg.config.options import OptionError
from seg.inference.predict import parse_checkpoints
from seg.study.runs import read_runs, write_run_table
from sweeps import run_metrics, write_run

JOBS = ("0_lr=0.1,norm=bn", "1_data.max_slices_per_volume=null,lr=0.1", "2_data.train_vendors=[A,B],lr=0.1")


@pytest.fixture
def sweep(tmp_path):
    """A sweep folder as Hydra names its jobs (overrides joined by commas, a list in brackets), a best.pt each."""
    for job in JOBS:
        (tmp_path / job / "checkpoints").mkdir(parents=True)
        (tmp_path / job / "checkpoints" / "best.pt").write_bytes(b"")
    return tmp_path


def test_an_ensemble_of_sweep_jobs_is_read_as_typed(sweep):
    paths = [str(sweep / job / "checkpoints" / "best.pt") for job in JOBS]
    assert parse_checkpoints("[" + ",".join(paths) + "]") == paths
    assert parse_checkpoints("[" + ",".join(f"'{p}'" for p in paths) + "]") == paths  # Hydra's quoting
    assert parse_checkpoints(paths[0]) == paths[:1]
    assert parse_checkpoints(f"[{paths[0]}, {paths[1]}]") == paths[:2]
    with pytest.raises(OptionError, match="names .* twice"):
        parse_checkpoints(f"[{paths[0]},{paths[0]}]")


def test_an_ensemble_of_sweep_jobs_is_read_from_a_glob(sweep):
    assert parse_checkpoints(f"{sweep}/*/checkpoints/best.pt") == sorted(
        str(sweep / job / "checkpoints" / "best.pt") for job in JOBS)
    assert parse_checkpoints(f"[{sweep}/0_*/checkpoints/best.pt,{sweep}/1_*/checkpoints/best.pt]") == [
        str(sweep / job / "checkpoints" / "best.pt") for job in JOBS[:2]]
    with pytest.raises(OptionError, match="the pattern matches no file"):
        parse_checkpoints(f"{sweep}/*/checkpoints/last.pt")


def test_the_summary_row_of_an_unreadable_run_shows_its_setting_and_its_error_once(tmp_path):
    write_run(tmp_path, "0_lr=0.1,norm=bn", run_metrics("bn", patients=[1, 2], lr=0.1))
    broken = write_run(tmp_path, "1_lr=0.5,norm=iln", {}, overrides=["lr=0.5", "norm=iln"])
    (broken / ".hydra" / "config.yaml").write_text("norm:\n  name: iln\nlr: 0.5\ntrainer:\n  batch_size: 1\nseed: 0\n")
    (broken / "metrics.json").write_text('{"status": "ok", "dice": 0.8')  # cut short
    runs = read_runs(tmp_path)
    table = write_run_table(tmp_path, runs).read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1_lr=0.5,norm=iln |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["iln", "0.5", "1"]  # norm, lr, batch_size: from the run's .hydra/ record
    assert cells[5] == "unreadable"
    assert row.count("metrics.json cannot be read") == 1 and "Expecting" in cells[-1]


def test_the_quick_study_step_makes_no_estimate_of_the_full_grid(tmp_path, monkeypatch):
    """--quick's jobs run at 64 px and depth 2: their time says nothing of the study's 256 px, depth-5 jobs."""
    monkeypatch.setattr(gpu_steps, "python_command", lambda *a, **k: subprocess.CompletedProcess([], 0))
    monkeypatch.setattr(gpu_steps, "metrics_of", lambda folder: [{"device": "cpu"}])
    partial = gpu_steps.Partial(tmp_path / "study.json")
    gpu_steps.step_study(argparse.Namespace(work=tmp_path, quick=True, device="cpu"), partial)
    figures = json.loads((tmp_path / "study.json").read_text())["figures"]
    assert figures["extrapolated_s"] is None and figures["grid_runs"] == 360
    text = "".join(partial.result["details"])
    assert "No estimate of the full grid" in text and " h (" not in text
