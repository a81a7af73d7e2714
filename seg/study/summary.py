"""Tables and plots of a whole sweep, from every run's metrics.json.

Written automatically at the end of a multirun (``MultirunSummary``, a Hydra callback configured
in configs/train.yaml), or by ``seg-summarize <sweep folder>`` (seg/tools/summarize.py); both call
``write_summary(sweep_dir)``, which writes into the sweep folder:

- ``summary.md`` / ``summary.csv``: one row per run (norm, lr, batch size, seed, status, Dice...);
- ``paper_table.md`` / ``paper_table.csv``: the study's table, laid out like the ILN paper's --
  rows norms, columns batch sizes when the sweep varies them, each cell the test Dice mean ± std
  over the runs that differ only in fold and seed, and an HD95 column (mm) where the runs have one.
  One table per value of anything else the sweep varied (task, test vendor, ...). When the sweep varies the learning rate, the rate is chosen per
  norm, fold and seed (and everything else) by **validation** Dice (``select_by_validation``) and
  the table reports the test Dice of that choice; the table with one column per learning rate
  follows, labelled "for inspection, not for selection" (picking each norm's best column there
  and quoting its test Dice would choose on the test set). ``selection.csv`` lists each choice;
- ``comparison.md`` / ``comparison.csv`` / ``comparison.png``: the norms compared pairwise on
  per-volume test Dice of the runs they share (fold and seed), with Wilcoxon tests (Holm),
  bootstrap intervals and average ranks (seg/study/stats.py);
- ``comparison_cardiac.md`` / ``.csv``: the same pairing and ranks on the error of the ejection fraction and
  on HD95 (lower is better), from the runs' per-volume figures (seg/study/cardiac.py);
- ``claims.md``: the normalization papers' claims tested on the sweep's runs, where it holds the runs a
  claim needs (seg/study/claims.py; ``experiment=claims`` holds all of them);
- ``dice_vs_lr.png`` (or ``dice_vs_batch_size.png``), ``learning_curves.png`` and
  ``mixing_weights.png`` when matplotlib is installed (the ``study`` extra).

How runs are pooled and shown (``Cell``):

- A run's setting is read from its metrics.json, completed by its ``.hydra/`` record (a run that
  failed at start wrote little else). Fold and seed are replicates; every other key that takes
  more than one value in the sweep is a factor (a run that recorded its split but not the key,
  e.g. no test vendor beside runs that hold one out, counts as the value "-"). ``ARM_KEYS`` only
  name a bundle of settings the runs record anyway (``+claim=...`` of ``experiment=claims``) and
  are never factors.
- A run that diverged or failed has no Dice: it is never counted as a zero. A cell whose runs all
  diverged reads ``diverged (4/4)``; a cell where some did reads ``0.812 ± 0.013 (1/4 diverged)``,
  the mean and sample standard deviation (n - 1) being over the runs that finished.
- The best cell of each column is in bold: the highest mean among the cells whose runs *all*
  finished (a setting that diverges on some seeds is not called the best).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from .cardiac import write_cardiac_comparison
from .claims import evaluate_claims, write_claims
from .comparison import write_comparison
from .plots import write_plots
from .runs import MISSING, read_sweep, read_yaml, write_run_table
from .tables import complete_settings, incomplete_choices, select_by_validation, write_study_table

EXIT_INCOMPLETE = 3  # seg-summarize: the tables were written, but a headline rests on an incomplete choice

def data_scope(sweep_dir: Path, runs: list[dict]) -> str:
    """'data=phantom (the built-in synthetic phantom; 32 patients, 64 px)': what the runs were trained on."""
    names = sorted({str(r["setting"].get("data")) for r in runs if r["setting"].get("data")})
    config = next((read_yaml(sweep_dir / r["run"] / ".hydra" / "config.yaml") for r in runs
                   if (sweep_dir / r["run"] / ".hydra" / "config.yaml").is_file()), None) or {}
    data = config.get("data") or {}
    details = []
    if (data.get("phantom") or {}).get("num_patients"):
        details.append(f"{data['phantom']['num_patients']} patients")
    if data.get("image_size"):
        details.append(f"{data['image_size']} px")
    kind = "the built-in synthetic phantom, " if names == ["phantom"] else ""
    return f"data={'+'.join(names) or '?'} ({kind}{', '.join(details) or 'sizes not recorded'})."


def write_claims_file(sweep_dir: Path, runs: list[dict]) -> Path | None:
    """claims.md when the sweep holds the runs of at least one claim; None otherwise (or without scipy)."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        return None
    completed, _, factors = complete_settings(runs)
    claims = evaluate_claims(select_by_validation(runs), factors)
    if all(claim.verdict == "not tested" for claim in claims):
        return None
    return write_claims(sweep_dir / "claims.md", claims, data_scope(sweep_dir, completed))




# ---------------------------------------------------------------------------- everything


@dataclass
class Summary:
    """What ``summarize`` wrote: the per-run table's path; the choices of a learning rate made without all
    their candidates (seg/study/tables.py ``incomplete_choices``); the notes about the runs (duplicates, missing
    jobs)."""

    path: Path
    incomplete: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summarize(sweep_dir: str | Path, metric: str = "dice", plots: bool = True) -> Summary | None:
    """Write the per-run table, the study's table, the paired comparison, the claims (where the sweep holds
    their runs) and the plots; None when the folder holds no run."""
    sweep_dir = Path(sweep_dir)
    sweep = read_sweep(sweep_dir)
    runs = [run for run in sweep.runs if run.get("status") != MISSING]
    if not runs:
        return None
    notes = sweep.notes()
    markdown = write_run_table(sweep_dir, sweep.runs, notes)
    write_study_table(sweep_dir, sweep.runs, metric, notes)
    write_comparison(sweep_dir, sweep.runs, metric, plots)
    write_cardiac_comparison(sweep_dir, runs)
    write_claims_file(sweep_dir, sweep.runs)
    if plots:
        write_plots(sweep_dir, runs, metric)
    return Summary(markdown, incomplete_choices(select_by_validation(sweep.runs)), notes)


def write_summary(sweep_dir: str | Path, metric: str = "dice", plots: bool = True) -> Path | None:
    """``summarize``; returns the per-run table's path."""
    summary = summarize(sweep_dir, metric, plots)
    return None if summary is None else summary.path


class MultirunSummary(Callback):
    """Hydra callback: write the sweep's tables and plots when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        summary = summarize(Path(config.hydra.sweep.dir))
        if summary is not None:
            print(f"Sweep summary: {summary.path}")
            print((summary.path.parent / "paper_table.md").read_text())
            for line in summary.incomplete:
                print(f"warning: a headline rests on an incomplete choice: {line}", file=sys.stderr)
