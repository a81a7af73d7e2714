"""The study's pages (scripts/study_iln.py, scripts/study_claims.py): their presets, the pages written end to end at
a tiny size, and the README's figures, which must be the pages' own (docs/results/study_*.json).

The README quotes the study between ``<!-- study:begin -->`` and ``<!-- study:end -->``; in that block every bold
figure is one of:

- ``<NORM> on <TASK>: **0.812 ± 0.010**`` (or ``**0.812**``): that layer's test Dice at its rate chosen on
  validation, mean ± std over the seeds, from docs/results/study_iln.json ("dice" rows; norm and task in any case);
- ``claim <N>: **<verdict>**`` or ``claim <N> (<context>): **<verdict>**``: the verdict of claim N in
  docs/results/study_claims.json (without a context, every context of claim N must have that verdict);
- ``**<finished>/<total> runs** of study_iln`` or ``of study_claims``: the page's finished and total runs.

Any other bold text with a digit in the block fails (a figure nobody checks), and a page whose JSON exists must
be quoted there at least once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, multirun_config
from seg.training.estimate import sweep_jobs

RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"<!-- study:begin -->(.*?)<!-- study:end -->", re.S)
DICE = re.compile(r"\b([A-Za-z]+) on (RV|LV|rv|lv|MYO|myo|all|ALL): \*\*(\d\.\d+)(?: ± (\d\.\d+))?\*\*")
CLAIM = re.compile(r"\bclaim (\d+)(?: \(([^)]*)\))?: \*\*([a-z ]+)\*\*")
RUNS = re.compile(r"\*\*(\d+)/(\d+) runs\*\* of (study_iln|study_claims)")
BOLD = re.compile(r"\*\*([^*]+)\*\*")
PAPER_GRID = {1.5, 1.0, 0.5, 0.1, 0.05}


def quoted_errors(readme: str, pages: dict[str, dict | None]) -> list[str]:
    """What is wrong with the README's study block against the pages' JSON ({"study_iln": figures or None, ...})."""
    found = BLOCK.search(readme)
    if found is None:
        return [f"README has no <!-- study:begin --> block, but {name}.json exists"
                for name, page in pages.items() if page is not None]
    block, errors, quoted = found[1], [], set()

    def page(name: str) -> dict | None:
        if pages.get(name) is None:
            errors.append(f"the README quotes {name}, but docs/results/{name}.json does not exist")
            return None
        quoted.add(name)
        return pages[name]

    checked = []
    for match in DICE.finditer(block):
        checked.append(match.span())
        norm, task, mean, std = match[1].lower(), match[2].lower(), float(match[3]), match[4]
        figures = page("study_iln")
        if figures is None:
            continue
        row = next((r for r in figures["dice"] if r["norm"] == norm and r["task"] == task), None)
        if row is None or row["mean"] is None or abs(row["mean"] - mean) > 5e-4 or (
                std is not None and (row["std"] is None or abs(row["std"] - float(std)) > 5e-4)):
            errors.append(f"README: {match[0]!r}, but study_iln.json has {row}")
    for match in CLAIM.finditer(block):
        checked.append(match.span())
        figures = page("study_claims")
        if figures is None:
            continue
        claims = [c for c in figures["claims"] if c["claim"] == int(match[1])
                  and (match[2] is None or c["context"] == match[2])]
        if not claims or any(c["verdict"] != match[3] for c in claims):
            errors.append(f"README: {match[0]!r}, but study_claims.json has {claims}")
    for match in RUNS.finditer(block):
        checked.append(match.span())
        figures = page(match[3])
        if figures is not None and (figures["runs"]["finished"], figures["runs"]["total"]) != (int(match[1]),
                                                                                             int(match[2])):
            errors.append(f"README: {match[0]!r}, but {match[3]}.json has {figures['runs']}")
    for match in BOLD.finditer(block):
        inside = any(start <= match.start() and match.end() <= end for start, end in checked)
        if re.search(r"\d", match[1]) and not inside:
            errors.append(f"README: the figure {match[0]!r} is not in a form the test checks")
    errors += [f"docs/results/{name}.json exists, but the README's study block quotes none of it"
               for name, figures in pages.items() if figures is not None and name not in quoted]
    return errors


def page_figures(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["figures"] if path.is_file() else None


def test_the_readme_quotes_the_pages_figures():
    pages = {name: page_figures(name) for name in ("study_iln", "study_claims")}
    assert quoted_errors((ROOT / "README.md").read_text(), pages) == []


ILN = {"dice": [{"norm": "iln", "task": "lv", "mean": 0.812, "std": 0.01, "n": 3, "of": 3},
                {"norm": "bn", "task": "lv", "mean": 0.79, "std": None, "n": 1, "of": 3}],
       "runs": {"finished": 107, "total": 108}}
CLAIMS = {"claims": [{"claim": 3, "context": "", "verdict": "inconclusive"},
                     {"claim": 1, "context": "batch 1", "verdict": "reproduced"}], "runs": {"finished": 36, "total": 36}}


@pytest.mark.parametrize("block, wrong", [
    ("ILN on LV: **0.812 ± 0.010**, BN on LV: **0.790**; claim 3: **inconclusive**; **107/108 runs** of study_iln",
     []),
    ("ILN on LV: **0.813 ± 0.010**", ["0.813"]),  # a mean the page does not have
    ("ILN on LV: **0.812 ± 0.020**", ["0.020"]),  # a std the page does not have
    ("GN on LV: **0.812**", ["GN on LV"]),  # a layer the page does not have
    ("claim 3: **reproduced**", ["claim 3"]),
    ("claim 1 (batch 1): **reproduced**", []),
    ("**108/108 runs** of study_iln", ["108/108"]),
    ("ILN reaches **0.812** on LV", ["not in a form"]),  # a figure in no checked form
])
def test_a_quoted_figure_must_be_the_pages(block, wrong):
    readme = f"# seg\n\n<!-- study:begin -->\n{block}\n<!-- study:end -->\n"
    errors = quoted_errors(readme, {"study_iln": ILN, "study_claims": CLAIMS})
    errors = [e for e in errors if "quotes none of it" not in e]
    assert len(errors) == len(wrong) and all(w in e for w, e in zip(wrong, errors)), errors


def test_a_page_that_exists_must_be_quoted_and_a_quoted_page_must_exist():
    assert quoted_errors("# seg\n", {"study_iln": ILN, "study_claims": None}) == [
        "README has no <!-- study:begin --> block, but study_iln.json exists"]
    readme = "<!-- study:begin -->\nclaim 3: **inconclusive**\n<!-- study:end -->"
    assert quoted_errors(readme, {"study_iln": ILN, "study_claims": CLAIMS}) == [
        "docs/results/study_iln.json exists, but the README's study block quotes none of it"]
    assert "does not exist" in quoted_errors(readme, {"study_iln": None, "study_claims": None})[0]


def test_the_iln_cpu_preset_is_the_papers_comparison():
    jobs = sweep_jobs(multirun_config("experiment=study_iln_cpu"))
    values = {}
    for job in jobs:
        for override in job:
            key, value = override.split("=", 1)
            values.setdefault(key, set()).add(value)
    assert values["norm"] == {"bn", "in", "ln", "gn", "bin", "iln"} and values["data.task"] == {"rv", "lv"}
    assert len(values["lr"]) >= 3 and {float(v) for v in values["lr"]} <= PAPER_GRID and len(values["seed"]) >= 3
    assert len(jobs) == 6 * 2 * len(values["lr"]) * len(values["seed"])


# The pages at a tiny size: what each script writes, and where.
TINY = ["data.phantom.num_patients=8", "data.image_size=32", "data.spacing=12.0", "data.max_slices_per_volume=2",
        "model.depth=2", "trainer.epochs=1", "schedule.milestones=[1]", "seed=0", "hydra.callbacks.estimate.enabled=false"]


def run_page(script: str, out: Path, data_dir: Path, overrides: list[str]) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(out), "--data-dir",
                             str(data_dir), "--", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out.read_text()


def assert_stamped_page(text: str, script: str, command: str) -> None:
    head = text.split("## ", 1)[0]
    assert "**Scope**: the built-in **synthetic phantom** (8 patients, 32x32 px at 12.0 mm" in head
    assert "trained on **cpu**" in head and f"The sweep: `{command}" in head and "Sweep wall time **" in head
    assert "The same page at full size: `python train.py -m experiment=" in head and "hydra/launcher=slurm" in head
    assert f"- command: `python scripts/{script}" in head and "- commit: `" in head and "- machine: " in head
    assert "## Runs per arm" in text


@pytest.mark.slow
def test_the_iln_page_is_written_end_to_end_at_a_tiny_size(data_dir, tmp_path):
    out = tmp_path / "study_iln.md"
    text = run_page("study_iln.py", out, data_dir, [*TINY, "norm=bn,iln", "lr=0.5,0.1", "data.task=rv"])
    assert_stamped_page(text, "study_iln.py", "python train.py -m experiment=study_iln_cpu hydra/launcher=stacked")
    figures = json.loads(out.with_suffix(".json").read_text())["figures"]
    assert figures["runs"]["total"] == 4 and {(r["norm"], r["task"]) for r in figures["dice"]} == {("bn", "rv"),
                                                                                                   ("iln", "rv")}
    for row in figures["dice"]:  # the headline row of the page carries the JSON's figure
        if row["mean"] is not None:
            assert f"| {row['norm']} | {row['mean']:.3f}" in text
    assert "| bn | rv | " in text and "## The study's table (paper_table.md)" in text
    assert "## Paired comparison (comparison.md)" in text
    pytest.importorskip("matplotlib")
    plots = sorted(p.name for p in (tmp_path / "study_iln").glob("*.png"))
    assert "dice_vs_lr.png" in plots and "learning_curves.png" in plots and "mixing_weights.png" in plots
    for name in plots:
        assert f"](study_iln/{name})" in text


@pytest.mark.slow
def test_the_claims_page_is_written_end_to_end_at_a_tiny_size(data_dir, tmp_path):
    pytest.importorskip("scipy")
    out = tmp_path / "study_claims.md"
    text = run_page("study_claims.py", out, data_dir, TINY)
    assert_stamped_page(text, "study_claims.py", "python train.py -m experiment=claims hydra/launcher=stacked")
    figures = json.loads(out.with_suffix(".json").read_text())["figures"]
    assert figures["runs"]["total"] == 12 and {c["claim"] for c in figures["claims"]} >= {1, 2, 3, 4}
    for claim in figures["claims"]:
        assert f"- claim {claim['claim']}" in text and f"**{claim['verdict']}**" in text
    assert "## What the phantom can and cannot show" in text and "| b1_iln | " in text
