"""scripts/gpu_check.py, the GPU path's one command, in its CPU mode (what CI runs, so that it cannot rot
while no GPU is at hand): every step runs and gets a verdict, the report states every target; a step past its
limit is stopped and says so; the wheelhouse's package list is pyproject.toml's, torch and what only torch
needs left out."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import gpu_check  # scripts/gpu_check.py (scripts/ is on pytest's pythonpath)
import gpu_steps
import gpu_wheels
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.py"
TARGETS = 5  # 1.5x GroupNorm, 60% of copy bandwidth, 3x MONAI, 60 s wall, Dice 0.85


def check(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_cpu_quick_mode_runs_every_step_and_reports_each_verdict_and_target(tmp_path):
    result = check("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stamp"]["commit"] and "CPU cores" in report["stamp"]["machine"]
    steps = report["figures"]["steps"]
    assert [s["name"] for s in steps] == [s.name for s in gpu_check.STEPS if not s.extra]  # the 8-minute set
    verdicts = {s["name"]: s["verdict"] for s in steps}
    assert verdicts.pop("install") == "skipped" and "--wheels" in steps[0]["reason"]  # no wheelhouse given
    assert set(verdicts.values()) == {"pass"}, {s["name"]: s["reason"] for s in steps}
    assert all(s["limit_s"] > 0 and 0 < s["seconds"] <= s["limit_s"] + 5 for s in steps[1:])
    by_name = {s["name"]: s["figures"] for s in steps}
    layers = {row[0] for row in by_name["correctness"]["layers"]}
    from seg.norms import names
    assert layers == set(names())  # every registered layer, both memory formats
    assert {row[1] for row in by_name["correctness"]["layers"]} == {"contiguous", "channels_last"}
    assert by_name["train_default"]["device"] == "cpu" and 0 <= by_name["train_default"]["dice"] <= 1
    assert by_name["launcher"]["jobs"] == 2
    # --quick's jobs (64 px, depth 2) are not the study's: no estimate of the full grid is made from them
    assert by_name["study"]["grid_runs"] == 360 and by_name["study"]["extrapolated_s"] is None
    copy = by_name["layer_bandwidth"]["copy_bytes_per_s"]
    assert copy > 0 and all("copy_fraction" in f for f in by_name["layer_bandwidth"]["layer_alone"].values())
    goals = report["figures"]["targets"]
    assert len(goals) == TARGETS and all(g["status"].startswith("not measured") for g in goals)  # CPU, not CUDA

    page = (tmp_path / "report.md").read_text()
    assert page.startswith("# GPU check") and "- command: `python scripts/gpu_check.py --device cpu --quick" in page
    for step in (s for s in gpu_check.STEPS if not s.extra):
        assert f"| {step.name} | {step.title} |" in page and f"## {step.name}: " in page
    for goal in goals:
        assert f"| {goal['target']} | {goal['status']} |" in page
    assert "**No estimate of the full grid**" in page and "**Extrapolation" not in page


def test_the_stacked_step_is_outside_the_eight_minute_set_and_calls_the_stacked_benchmark():
    """``--steps stacked`` only: its limit does not count against the 8 minutes, and it runs
    scripts/bench_stacked.py (whose --smoke run a slow test of test_stacked.py checks)."""
    stacked = next(s for s in gpu_check.STEPS if s.name == "stacked")
    assert stacked.extra and all(not s.extra for s in gpu_check.STEPS if s.name != "stacked")
    assert sum(s.limit_s for s in gpu_check.STEPS if not s.extra) <= gpu_check.BUDGET_S
    assert gpu_steps.STEP_FUNCTIONS["stacked"] is gpu_steps.step_stacked
    assert "bench_stacked.py" in inspect.getsource(gpu_steps.step_stacked)


@pytest.mark.slow
def test_a_step_past_its_limit_is_stopped_and_reported_as_timed_out(tmp_path):
    result = check("--device", "cpu", "--quick", "--steps", "layer_bandwidth", "--limit-scale", "0.005",
                   "--out", str(tmp_path), timeout=120)
    assert result.returncode == 1
    steps = json.loads((tmp_path / "report.json").read_text())["figures"]["steps"]
    assert [(s["name"], s["verdict"], s["limit_s"]) for s in steps] == [("layer_bandwidth", "timed out", 1)]
    assert "| layer_bandwidth |" in (tmp_path / "report.md").read_text()


def test_bad_command_lines_are_refused_in_one_line(tmp_path):
    import torch

    cases = [(["--device", "cpu"], "--out"), (["--wheels", str(tmp_path / "none"), "--out", str(tmp_path)], "--wheels"),
             (["--limit-scale", "0", "--out", str(tmp_path)], "--limit-scale")]
    if not torch.cuda.is_available():  # the default device, where there is none
        cases.append((["--out", str(tmp_path)], "--device cuda"))
    for args, key in cases:
        result = check(*args, timeout=120)
        assert result.returncode == 1 and result.stderr.strip().startswith(key), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_wheelhouse_holds_pyprojects_requirements_without_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = gpu_wheels.project_requirements()
    assert "torch" not in {gpu_wheels.requirement_name(r) for r in requirements}
    expected = [r for r in project["dependencies"] + project["optional-dependencies"]["launchers"]
                if not r.startswith("torch")]
    assert requirements == expected and any(r.startswith("hydra-joblib-launcher") for r in requirements)


def test_the_wheelhouse_leaves_out_what_only_torch_needs():
    """A resolution report in pip's format (``pip install --dry-run --report``): monai needs torch and numpy, torch
    needs sympy and typing-extensions, nibabel needs typing-extensions too; hydra-core's extra brings its own."""
    def item(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"install": [
        item("monai", "1.4.0", "torch>=1.9", "numpy>=1.24", 'nibabel; extra == "nibabel"'),
        item("torch", "2.11.0", "sympy>=1.13", "typing-extensions>=4", "nvidia-cublas; platform_system == 'Linux'"),
        item("sympy", "1.13.3", "mpmath"), item("mpmath", "1.3.0"), item("nvidia-cublas", "13.0"),
        item("numpy", "2.1.0"), item("typing_extensions", "4.12.0"),
        item("nibabel", "5.3.0", "numpy>=1.22", "typing-extensions>=4.6; python_version < '3.13'"),
        item("Hydra-Core", "1.3.2", "omegaconf<2.4,>=2.2", 'fancy; extra == "fancy"'),
        item("omegaconf", "2.3.0"), item("fancy", "1.0")]}
    wanted = gpu_wheels.closure_without_torch(report, ["monai>=1.4", "nibabel>=5", "hydra-core[fancy]>=1.3"])
    assert wanted == {"monai": "1.4.0", "numpy": "2.1.0", "nibabel": "5.3.0", "typing-extensions": "4.12.0",
                      "hydra-core": "1.3.2", "omegaconf": "2.3.0", "fancy": "1.0"}


def test_each_target_is_judged_on_its_steps_figures():
    """The GPU branch of the verdicts, on figures of the shape the steps write (no GPU needed to judge them)."""
    def passed(figures):
        return {"verdict": "pass", "figures": figures}

    alone = {"bin": {"ratio": 1.2, "copy_fraction": 0.7}, "iln": {"ratio": 1.4, "copy_fraction": 0.65},
             "sn": {"ratio": 1.6, "copy_fraction": 0.61}, "gn": {"ratio": 1.0, "copy_fraction": 0.9}}
    results = {"layer_bandwidth": passed({"layer_alone": alone, "copy_bytes_per_s": 4.3e12}),
               "throughput_compiled": passed({"devices": {"cuda": {"bn": {"ratio": 3.4}, "cin": {"ratio": None}}}}),
               "train_default": passed({"wall_s": 71.0, "dice": 0.88, "fresh_data": True})}
    status = {g["target"]: g["status"] for g in gpu_check.targets(results, "cuda")}
    assert list(status.values()) == ["not met", "met", "met", "not met", "met"], status  # sn is 1.6x GroupNorm
    evidence = {g["target"]: g["evidence"] for g in gpu_check.targets(results, "cuda")}
    assert "sn 1.60x" in evidence["fused bin/iln/sn forward+backward on CUDA <= 1.5x torch's GroupNorm"]

    results["train_default"] = {"verdict": "timed out", "figures": {}}
    status = [g["status"] for g in gpu_check.targets(results, "cuda")]
    assert status[3].startswith("not measured") and status[4].startswith("not measured")
    assert all(g["status"].startswith("not measured") for g in gpu_check.targets(results, "cpu"))
