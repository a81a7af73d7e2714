"""The benchmarks' harness: every result page carries the command, the commit and the machine above its
figures, and every benchmark writes its page through it (none by hand)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

import harness  # scripts/harness.py (scripts/ is on pytest's pythonpath, as it is on a benchmark's)
from conftest import ROOT

BENCHMARKS = ROOT / "scripts"
PAGES = {"bench.py": "bench", "bench_default_run.py": "bench_default_run", "bench_norms.py": "bench_norms",
         "bench_prepare.py": "bench_prepare", "bench_resume.py": "soak_resume",
         "bench_train_step.py": "bench_train_step", "bench_augment.py": "bench_augment",
         "bad_inputs_report.py": "bad_inputs", "gpu_check.py": "gpu_check", "profile_step.py": "profile_step"}


def test_a_result_page_has_its_stamp_above_its_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "bench_x.py"), "--steps", "3"])
    table = harness.markdown_table(["layer", "ms"], [["bn", "1.5"], ["a|b", "2"]])
    page = harness.write_result("bench_x", "A title", table, "What was measured.", out=tmp_path / "bench_x.md")
    lines = page.read_text().splitlines()
    assert lines[0] == "# A title" and lines[2] == "What was measured."
    stamp = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if line.startswith("- ")}
    assert stamp["- command"] == "`python scripts/bench_x.py --steps 3`"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert stamp["- commit"].strip("`").split()[0] == head and stamp["- commit"].strip("`") in (head, f"{head} (dirty)")
    assert "CPU cores" in stamp["- machine"] and "RAM" in stamp["- machine"]
    assert ("no GPU" in stamp["- machine"]) != harness.torch.cuda.is_available()
    assert stamp["- torch"] == harness.torch.__version__ and len(stamp["- date"]) == 10
    assert "(1 / 5 / 15 minutes) on" in stamp["- load average"]
    assert stamp["- load average"].startswith(harness.LOAD_AT_START + " at the start; ")
    assert lines.index("| layer | ms |") > max(i for i, line in enumerate(lines) if line.startswith("- "))
    assert "| a\\|b | 2 |" in lines  # a cell's | does not break the table
    assert harness.write_result.__defaults__[-1] is None and harness.RESULTS == ROOT / "docs" / "results"


def test_every_benchmark_writes_its_page_through_the_harness():
    """Each benchmark calls harness.write_result once, with its page's name; none writes a page (or a stamp)
    itself."""
    pages = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        if path.name in ("harness.py", "bad_inputs.py", "gpu_steps.py", "gpu_wheels.py", "study_page.py",  # modules
                         "results_all.py"):  # the programs import; the sitting that runs the others
            continue
        calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", getattr(node.func, "attr", None)) == "write_result"]
        assert len(calls) == 1 and isinstance(calls[0].args[0], ast.Constant), f"{path.name}: one write_result"
        pages[path.name] = calls[0].args[0].value
        source = path.read_text()
        assert "write_text(" not in source and "def stamp" not in source, f"{path.name} writes a page itself"
    assert PAGES.items() <= pages.items()
    assert len(set(pages.values())) == len(pages)  # a page each


def test_the_sitting_runs_each_page_with_the_command_its_stamp_names():
    """scripts/results_all.py lists every page of docs/results, each with the command that page's stamp
    names (the sitting and a page run alone are the same run) and a script that writes that page."""
    import results_all

    written = {}
    for script in {command[0] for command in results_all.PAGES.values()}:
        call = next(node for node in ast.walk(ast.parse((ROOT / script).read_text())) if isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) == "write_result")
        written[script] = call.args[0].value
    assert all(written[command[0]] == name for name, command in results_all.PAGES.items())
    pages = {path.stem for path in (ROOT / "docs" / "results").glob("*.md")}
    assert pages <= set(results_all.PAGES), sorted(pages - set(results_all.PAGES))
    for name in sorted(pages):
        stamped = next(line for line in (ROOT / "docs" / "results" / f"{name}.md").read_text().splitlines()
                       if line.startswith("- command: "))
        assert stamped == f"- command: `python {' '.join(results_all.PAGES[name])}`", name


def test_the_sitting_refuses_a_busy_machine(monkeypatch, capsys):
    import results_all

    monkeypatch.setattr(results_all.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    monkeypatch.setattr(results_all.subprocess, "call", lambda *a, **k: pytest.fail("ran a page on a busy machine"))
    assert results_all.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the load average is 3.50") and "--anyway" in err


@pytest.mark.slow
def test_the_train_step_benchmark_writes_a_stamped_page(tmp_path):
    """bench_train_step.py end to end at a tiny size (the trainer's step on our U-Net and MONAI's BasicUNet)."""
    out = tmp_path / "bench_train_step.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--size", "32", "--batch-size",
                             "2", "--rounds", "1", "--steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    page = out.read_text()
    assert page.startswith("# Train step") and "- command: `python scripts/bench_train_step.py --size 32" in page
    assert "seg.training.step.train_step" in page and "| MONAI BasicUNet (as shipped) |" in page


@pytest.mark.slow
def test_the_augmentation_benchmark_writes_a_stamped_page(tmp_path):
    """bench_augment.py end to end at a tiny size: every option timed against the training step (no figures
    are checked: the smoke size says nothing about speed)."""
    out = tmp_path / "bench_augment.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_augment.py"), "--size", "32", "--batch-size",
                             "2", "--rounds", "1", "--steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    page = out.read_text()
    assert page.startswith("# Augmentation: cost per batch") and "seg.training.augment.augment_batch" in page
    for row in ("| training step (U-Net, norm=bn) |", "| preset nnunet (+ rotation) |", "| elastic alone, p = 1 |",
                "| bias_field alone, p = 1 |", "| rician alone, p = 1 |"):
        assert row in page


@pytest.mark.slow
def test_the_step_profile_writes_a_stamped_page_with_its_shares_and_flop_rate(tmp_path):
    """profile_step.py end to end at a tiny size: the default run's step by phase and kind, and its FLOP/s."""
    out = tmp_path / "profile_step.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), "--size", "32", "--steps", "1",
                             "--warmup", "1", "--rounds", "1", "--matmul-size", "128", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    page = out.read_text()
    assert page.startswith("# One training step") and "- command: `python scripts/profile_step.py --size 32" in page
    assert "norm=bn, batch 1, 32x32, channels_last=True" in page  # the default run's settings
    for row in ("| augmentation |", "| forward: normalization |", "| backward: convolution |", "| optimizer |"):
        assert row in page
    assert "Largest cost: **" in page and "GFLOP/s**, against a matmul peak of" in page
    normalization = next(line for line in page.splitlines() if line.startswith("| **all normalization** |"))
    assert float(normalization.split("|")[3]) > 0  # the bn layers' time is found and assigned


@pytest.mark.slow
def test_the_norm_benchmark_runs_in_its_smallest_mode_and_sets_spade_and_sean_against_their_convs(tmp_path):
    out = tmp_path / "bench_norms.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_norms.py"), "--shape", "2", "16", "16", "16",
                             "--rounds", "1", "--repeats", "1", "--pair-repeats", "1", "--layers", "frn", "spade",
                             "sean", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    page = out.read_text()
    assert "| 128-wide conv pair (spade's modulation convs alone) |" in page
    table = page.split("## Conditional layers against their modulation convolutions")[1]
    assert "| spade |" in table and "| sean |" in table and "ratio to spade" in table
    assert "| conv 3x3 + frn |" in page


def test_the_json_of_a_benchmark_carries_the_commit_it_started_at(tmp_path, monkeypatch):
    """A benchmark that runs for an hour writes its JSON under the commit it imported, as its page does, not the
    commit made while it ran."""
    monkeypatch.setattr(harness, "STARTED_AT", "0123abc")
    stamped = json.loads(harness.write_json(tmp_path / "x.json", {"a": 1}).read_text())
    assert stamped["stamp"]["commit"] == "0123abc" and stamped["figures"] == {"a": 1}
    assert stamped["stamp"]["load"].startswith(harness.LOAD_AT_START + " at the start; ")
