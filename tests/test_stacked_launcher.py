"""The stacked launcher (``hydra/launcher=stacked``): a sweep trained as stacks writes the sweep folder that
Hydra's joblib launcher writes with the ordinary trainer.

Both launchers run the same small grid (experiment=smoke at 32 px: norm bn and iln, 2 learning rates,
2 seeds) as real ``train.py -m`` subprocesses. Every run folder must hold the same files (TensorBoard
event files compared by count, their names carry the time and pid), every metrics.json the same keys,
status and settings, the same TensorBoard tags at the same steps, and the same numbers within float
tolerance: a stacked step is the single run's step in another order of float32 sums (grouped
convolutions), so the first step's loss agrees to ``FIRST_LOSS_RTOL`` (the same initial weights, data
order, augmentation and learning rate), the epoch's mean loss to ``LOSS_RTOL`` after the runs have
drifted apart as they would on two machines, and the Dice -- a count of pixels on two tiny test volumes,
which a drift of 1e-3 in the weights moves by a few hundredths -- to ``DICE_TOL``. seg-summarize then
writes the same tables (the same text, numbers within ``DICE_TOL``).
Also: a run that diverges in a stack is ``diverged`` while the others finish; a job whose norm cannot
be stacked runs alone through the trainer; resuming a stacked sweep retrains no finished run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_train

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")  # the launchers extra

FIRST_LOSS_RTOL = 1e-5  # the loss of each run's first step (TensorBoard's train/loss at step 1)
LOSS_RTOL = 1e-2  # each epoch's mean training loss, after 9 steps
DICE_TOL = 0.05  # test and validation Dice (in [0, 1]) of a stacked run against the same run alone
# distances (mm) and volumes (ml) come from the same masks as the Dice, whose few moved pixels move them too:
# within this share of their value
SURFACE_RTOL = 0.1
GRID = ["experiment=smoke", "data.image_size=32", "data.phantom.num_patients=6", "trainer.progress=false",
        "trainer.batch_size=6", "norm=bn,iln", "lr=0.05,0.01", "seed=0,1"]
# differ by nature: times, the folder, and whether the data cache existed when the run started
TIMING = {"wall_time_s", "train_time_s", "images_per_s", "output_dir", "resumed_from", "data_cache"}
NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def sweep(data_dir: Path, sweep_dir: Path, launcher: str, *overrides: str, check: bool = True):
    return run_train("-m", f"hydra/launcher={launcher}", *overrides, f"paths.data_dir={data_dir}",
                     f"hydra.sweep.dir={sweep_dir}", check=check)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def files_of(run_dir: Path) -> list[str]:
    """The files of a run folder, relative; TensorBoard event files as one name per file."""
    names = [str(p.relative_to(run_dir)) for p in sorted(run_dir.rglob("*")) if p.is_file()]
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", name) for name in names)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's scalars of a run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


def assert_same_checkpoints(actual: Path, expected: Path, label: str) -> None:
    """last.pt and best.pt hold what the trainer's hold (what trainer.resume and seg-predict read): the same
    entries, the weights' names, shapes and types, the optimizer's and schedule's state, the generator's state
    (the same draws taken) and where the run stands."""
    for name in ("last.pt", "best.pt"):
        got, want = (torch.load(folder / name, weights_only=True) for folder in (actual, expected))
        assert got.keys() == want.keys(), f"{label} {name}"
        shapes = [{k: (v.shape, v.dtype) for k, v in state["model"].items()} for state in (got, want)]
        assert shapes[0] == shapes[1], f"{label} {name}"
        for key, tensor in want["model"].items():  # BN's counters; the weights drift as the Dice does
            if not tensor.is_floating_point():
                assert torch.equal(got["model"][key], tensor), f"{label} {name} {key}"
        assert got["config"] == want["config"] and got["domains"] == want["domains"]
        if name == "last.pt":
            assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
            assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
            assert got["scheduler"] == want["scheduler"]
            assert torch.equal(got["generator"], want["generator"])  # the same draws were taken
            run_state = {k: v for k, v in got["run_state"].items() if not k.startswith("train_time")}
            expected_state = {k: v for k, v in want["run_state"].items() if not k.startswith("train_time")}
            assert run_state.keys() == expected_state.keys()
            assert (run_state["epoch"], run_state["batch"], run_state["step"], run_state["best_epoch"]) == (
                expected_state["epoch"], expected_state["batch"], expected_state["step"], expected_state["best_epoch"])


def assert_close_text(actual: str, expected: str, tol: float, label: str) -> None:
    """The same text, except numbers that may differ by ``tol``."""
    assert NUMBER.sub("#", actual) == NUMBER.sub("#", expected), label
    for a, e in zip(NUMBER.findall(actual), NUMBER.findall(expected)):
        bound = tol if abs(float(e)) <= 1 else SURFACE_RTOL * abs(float(e))  # a Dice, or a distance in mm
        assert float(a) == pytest.approx(float(e), abs=bound), f"{label}: {a} vs {e}"


@pytest.fixture(scope="module")
def grid(data_dir, tmp_path_factory):
    """The grid swept once by each launcher (joblib: the ordinary trainer in 2 worker processes)."""
    root = tmp_path_factory.mktemp("grid")
    joblib = sweep(data_dir, root / "joblib", "joblib", "hydra.launcher.n_jobs=2", *GRID)
    stacked = sweep(data_dir, root / "stacked", "stacked", *GRID)
    return root / "joblib", root / "stacked", joblib, stacked


@pytest.mark.slow
def test_a_stacked_sweep_writes_the_folders_and_metrics_of_the_joblib_sweep(grid):
    joblib_dir, stacked_dir, _, result = grid
    assert "8 jobs, 8 in 2 stack(s)" in result.stdout  # bn and iln: one stack each
    runs = sorted(p.name for p in joblib_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 8
    assert sorted(p.name for p in stacked_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == runs
    for name in runs:
        alone, stacked = joblib_dir / name, stacked_dir / name
        assert files_of(stacked) == files_of(alone), name
        expected, actual = metrics_of(alone), metrics_of(stacked)
        assert actual.keys() == expected.keys(), name
        assert actual["status"] == expected["status"] == "ok", name
        for key, value in expected.items():
            if key in TIMING or key in ("history", "per_volume", "per_patient", "mixing_weights"):
                continue
            if isinstance(value, float) and key.startswith(("hd", "assd")):
                assert actual[key] == pytest.approx(value, rel=SURFACE_RTOL), f"{name} {key}"
            elif isinstance(value, float):
                tol = DICE_TOL if "dice" in key else 1e-6
                assert actual[key] == pytest.approx(value, abs=tol), f"{name} {key}"
            else:
                assert actual[key] == value, f"{name} {key}"
        assert len(actual["history"]) == len(expected["history"])
        for got, want in zip(actual["history"], expected["history"]):
            assert got.keys() == want.keys()
            assert (got["epoch"], got["step"], got["lr"]) == (want["epoch"], want["step"], want["lr"])
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=LOSS_RTOL), name
            assert got["val_dice"] == pytest.approx(want["val_dice"], abs=DICE_TOL), name
        assert [v["case"] for v in actual["per_volume"]] == [v["case"] for v in expected["per_volume"]]
        assert actual["mixing_weights"].keys() == expected["mixing_weights"].keys()
        assert_same_checkpoints(stacked / "checkpoints", alone / "checkpoints", name)
        logged, reference = scalars(stacked), scalars(alone)
        assert {tag: [s for s, _ in v] for tag, v in logged.items()} == {tag: [s for s, _ in v]
                                                                       for tag, v in reference.items()}, name
        assert logged["train/loss"][0][1] == pytest.approx(reference["train/loss"][0][1], rel=FIRST_LOSS_RTOL)
        assert [v for _, v in logged["train/lr"]] == [v for _, v in reference["train/lr"]]


@pytest.mark.slow
def test_seg_summarize_gives_the_same_tables_for_both_sweeps(grid):
    joblib_dir, stacked_dir, _, _ = grid
    for folder in (joblib_dir, stacked_dir):
        result = subprocess.run([sys.executable, "-m", "seg.tools.summarize", str(folder), "--no-plots"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    written = {p.name for p in joblib_dir.iterdir() if p.is_file()}
    assert {p.name for p in stacked_dir.iterdir() if p.is_file()} == written
    assert {"summary.md", "paper_table.md", "paper_table.csv", "selection.csv"} <= written
    for name in ("paper_table.md", "paper_table.csv", "selection.csv"):
        texts = [(folder / name).read_text().replace(str(folder), "<sweep>") for folder in (stacked_dir, joblib_dir)]
        assert_close_text(*texts, DICE_TOL, name)


@pytest.mark.slow
def test_resuming_a_stacked_sweep_retrains_no_finished_run(grid, data_dir):
    """``trainer.resume=true`` on the finished sweep: each run continues from its last.pt, which holds every
    epoch: the run is tested again (the same Dice), not trained (last.pt untouched)."""
    _, stacked_dir, _, _ = grid
    lasts = {p: p.read_bytes() for p in stacked_dir.glob("*/checkpoints/last.pt")}
    before = {p.parent.name: metrics_of(p.parent) for p in stacked_dir.glob("*/metrics.json")}
    assert len(lasts) == len(before) == 8
    sweep(data_dir, stacked_dir, "stacked", *GRID, "trainer.resume=true")
    for path, content in lasts.items():
        assert path.read_bytes() == content, path
    for name, metrics in before.items():
        again = metrics_of(stacked_dir / name)
        assert again["status"] == "ok" and again["steps"] == metrics["steps"]
        assert again["resumed_from"] == str(stacked_dir / name / "checkpoints" / "last.pt")
        assert again["dice"] == pytest.approx(metrics["dice"], abs=1e-6)


@pytest.mark.slow
def test_a_diverging_run_of_a_stack_is_diverged_and_a_norm_that_cannot_stack_runs_alone(data_dir, tmp_path):
    """lr=1e6 without normalization diverges in its stack while the stack's other run finishes ok; norm=kn (no
    can_stack) runs alone through the ordinary trainer and still gets its folder, as every run of the sweep."""
    result = sweep(data_dir, tmp_path, "stacked", "experiment=smoke", "data.image_size=32",
                   "data.phantom.num_patients=6", "trainer.progress=false", "trainer.batch_size=6", "norm=none,kn",
                   "lr=0.02,1e6", "model.init=kaiming", "optim.weight_decay=0")
    assert "4 jobs, 2 in 1 stack(s)" in result.stdout
    assert "alone (the trainer): #2" in result.stdout and "norm=kn cannot be stacked" in result.stdout
    runs = {(m["norm"], m["lr"]): m for m in (metrics_of(p.parent) for p in tmp_path.glob("*/metrics.json"))}
    assert set(runs) == {("none", 0.02), ("none", 1e6), ("kn", 0.02), ("kn", 1e6)}
    assert runs[("none", 0.02)]["status"] == "ok" and runs[("none", 0.02)]["dice"] is not None
    assert runs[("none", 1e6)]["status"] == "diverged" and runs[("none", 1e6)]["dice"] is None
    assert runs[("none", 1e6)]["diverged_step"] >= 1 and "Run diverged" in result.stdout
    assert runs[("kn", 0.02)]["status"] == "ok"
    finished = Path(runs[("none", 0.02)]["output_dir"])
    assert (finished / "checkpoints" / "best.pt").is_file() and (finished / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_sigterm_saves_every_run_of_the_stack_and_resuming_ends_as_if_uninterrupted(data_dir, tmp_path):
    """SIGTERM in the middle of a stack's epoch: every run saved after the step in progress (last.pt, status
    interrupted), exit code 75; the sweep resumed with trainer.resume=true ends each run bit for bit as the
    same sweep uninterrupted."""
    grid = ["experiment=smoke", "data.image_size=32", "data.phantom.num_patients=6", "trainer.progress=false",
            "trainer.batch_size=6", "norm=gn", "lr=0.05,0.02", "trainer.epochs=2", "trainer.checkpoint_every_n_steps=1",
            "trainer.deterministic=true", f"paths.data_dir={data_dir}"]
    sweep(data_dir, tmp_path / "reference", "stacked", *grid)
    stopped_dir = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=stacked", *grid,
                                f"hydra.sweep.dir={stopped_dir}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    deadline = time.monotonic() + 300
    while not list(stopped_dir.glob("*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, out + err
    runs = sorted(p for p in stopped_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2
    for run in runs:
        metrics = metrics_of(run)
        assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGTERM", run.name
        assert metrics["steps"] < 6 and (run / "checkpoints" / "last.pt").is_file()
    assert err.count("Interrupted by SIGTERM") == 2 and "Traceback" not in err

    sweep(data_dir, stopped_dir, "stacked", *grid, "trainer.resume=true")
    for run in runs:
        metrics = metrics_of(run)
        assert metrics["status"] == "ok" and metrics["steps"] == 6
        final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        expected = torch.load(tmp_path / "reference" / run.name / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(final[k], expected[k]) for k in expected), run.name


def test_a_bad_max_runs_is_refused_in_one_line(tmp_path):
    result = run_train("-m", "hydra/launcher=stacked", "hydra.launcher.max_runs=0", "experiment=smoke", "lr=0.1,0.05",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: hydra.launcher.max_runs=0 is out of range: it must be an integer of at "
                                     "least 1")
    assert not list(tmp_path.glob("sweep/*/metrics.json"))


@pytest.mark.slow
def test_a_job_that_fails_in_a_stack_is_failed_and_the_others_finish(data_dir, tmp_path):
    """A member whose set-up fails (a missing model.init_from) is recorded ``failed`` with its one line, as train.py
    records a failed sweep job; its stack trains the others; the sweep's exit code counts the failed jobs. With
    max_runs=3 the 4 jobs make two stacks of 2."""
    missing = "no-such-checkpoint.pt"  # relative (a path with / would nest the job's folder name)
    assert not (ROOT / missing).exists()
    result = sweep(data_dir, tmp_path / "sweep", "stacked", "experiment=smoke", "data.image_size=32",
                   "data.phantom.num_patients=6", "trainer.progress=false", "trainer.batch_size=6", "norm=gn",
                   f"model.init_from=null,{missing}", "lr=0.05,0.02", "hydra.launcher.max_runs=3", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "4 jobs, 4 in 2 stack(s) of at most 3" in result.stdout  # 2 + 2, not 3 + 1 alone
    runs = [metrics_of(p.parent) for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert sorted(m["status"] for m in runs) == ["failed", "failed", "ok", "ok"]
    for metrics in runs:
        if metrics["status"] == "failed":
            assert metrics["error"] == f"model.init_from={missing}: no such checkpoint file"
    assert result.stderr.count(f"model.init_from={missing}: no such checkpoint file") >= 2
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stacked_runs_stay_within_the_rounding_band(data_dir, tmp_path):
    """Stacked against plain runs, held against the band that rounding alone makes, measured here on the same grid
    (scripts/bench_launcher_band.py --smoke: batch 1, rates 0.5 and 0.1, bn and iln, 32 px): plain with another
    thread count and plain with contiguous tensors. Stacked may differ from plain by at most twice that band plus
    0.01 (two tiny test volumes: a few pixels move the Dice by about that); every run finishes under each
    launcher with the same status, and the runs learn (otherwise every Dice is 0 and nothing is compared)."""
    import bench_launcher_band as band

    found = band.run_arms(band.SMOKE, data_dir, tmp_path, threads=1, quiet=True)
    result = band.compare(found)
    assert all(len(runs) == 4 for runs, _, _ in found.values()), {a: len(r) for a, (r, _, _) in found.items()}
    assert not any(result["missing"].values()), result["missing"]
    assert max(r["plain"] for r in result["runs"]) > 0.05, result["runs"]  # something was learned to compare
    assert result["max"]["stacked"] <= 2 * result["band"] + 0.01, (result["max"], result["runs"])
