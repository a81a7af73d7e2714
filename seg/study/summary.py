"""Tables and plots of a whole sweep, from every run's metrics.json.

Written automatically at the end of a multirun (``MultirunSummary``, a Hydra callback configured
in configs/train.yaml), or by ``seg-summarize <sweep folder>`` (seg/tools/summarize.py); both call
``write_summary(sweep_dir)``, which writes into the sweep folder:

- ``summary.md`` / ``summary.csv``: one row per run (norm, lr, batch size, seed, status, Dice...);
- ``paper_table.md`` / ``paper_table.csv``: the study's table, laid out like the ILN paper's --
  rows norms, columns batch sizes when the sweep varies them, each cell the test Dice mean ± std
  over the runs that differ only in fold and seed. One table per value of anything else the sweep
  varied (task, test vendor, ...). When the sweep varies the learning rate, the rate is chosen per
  norm, fold and seed (and everything else) by **validation** Dice (``select_by_validation``) and
  the table reports the test Dice of that choice; the table with one column per learning rate
  follows, labelled "for inspection, not for selection" (picking each norm's best column there
  and quoting its test Dice would choose on the test set). ``selection.csv`` lists each choice;
- ``comparison.md`` / ``comparison.csv`` / ``comparison.png``: the norms compared pairwise on
  per-volume test Dice of the runs they share (fold and seed), with Wilcoxon tests (Holm),
  bootstrap intervals and average ranks (seg/study/stats.py);
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

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from .claims import evaluate_claims, write_claims
from ..config.identity import defines_run  # which command-line keys say what a run computed (one list, seg/config/identity.py)
from .stats import (ALPHA, BOOTSTRAP_SEED, CONFIDENCE, MIN_UNITS, RESAMPLES, bootstrap_ci, friedman_p,
                    nemenyi_cd, pair_runs, patient_means, ranks, replicate_key, set_holm)

COLUMNS = ["run", "norm", "lr", "batch_size", "seed", "status", "dice", "dice_2d", "best_val_dice",
           "images_per_s", "wall_time_s", "task", "fold", "error"]

# The study's order of rows (the paper's, then the other layers); unknown names follow alphabetically.
NORM_ORDER = ("bn", "in", "ln", "gn", "bin", "iln", "sn", "bkn", "kn", "wn", "pn", "lcn", "none")
REPLICATES = ("fold", "seed")  # runs that differ only in these are pooled into one cell
# statuses a cell names; any other run without a value (running, unreadable, an undefined Dice) is "incomplete"
NAMED_STATUSES = ("diverged", "failed", "no validation Dice")
ARM_KEYS = ("claim",)  # a config group that bundles settings every run records itself: never a factor
# configuration keys with a name of their own in the tables
KNOWN_KEYS = {"norm": "norm", "norm.name": "norm", "lr": "lr", "trainer.batch_size": "batch_size",
              "seed": "seed", "data.fold": "fold", "data.task": "task", "data": "data", "data.name": "data",
              "data.train_vendors": "train_vendors", "data.test_vendors": "test_vendors",
              "data.train_centres": "train_centres", "data.test_centres": "test_centres"}


# ---------------------------------------------------------------------------- reading runs


def read_runs(sweep_dir: Path) -> list[dict]:
    """metrics.json of every run folder directly below ``sweep_dir``, with its folder name as ``run``."""
    runs = []
    for path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            metrics = {"status": f"unreadable metrics.json ({err})"}
        run = {"run": path.parent.name, **metrics}
        run.setdefault("fold", (metrics.get("split") or {}).get("fold"))
        run["setting"] = run_setting(path.parent, metrics)
        runs.append(run)
    return sorted(runs, key=lambda r: (str(r.get("norm")), -(r.get("lr") or 0), r.get("seed") or 0, r["run"]))


def run_setting(run_dir: Path, metrics: dict) -> dict:
    """What a run computed, as {key: value}: norm, lr, batch_size, seed, fold, task, data, vendors,
    and any other key given on its command line (from ``.hydra/overrides.yaml``)."""
    config = read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    data, split = config.get("data") or {}, metrics.get("split") or {}
    from_config = {"norm": (config.get("norm") or {}).get("name"), "lr": config.get("lr"),
                   "batch_size": (config.get("trainer") or {}).get("batch_size"), "seed": config.get("seed"),
                   "fold": data.get("fold"), "task": data.get("task"), "data": data.get("name")}
    setting = {key: metrics.get(key, from_config[key]) for key in ("norm", "lr", "batch_size", "seed", "task", "data")}
    setting["fold"] = split.get("fold", from_config["fold"])
    for key in ("train_vendors", "test_vendors", "train_centres", "test_centres"):
        value = split.get(key) if split.get("mode") in ("vendor", "centre") else data.get(key)
        if value:
            setting[key] = value
    for override in read_yaml(run_dir / ".hydra" / "overrides.yaml") or []:
        key, _, value = str(override).lstrip("+~").partition("=")
        name = KNOWN_KEYS.get(key, key)
        if not defines_run(key) or setting.get(name) is not None:
            continue  # where the run ran, or already known from metrics.json / the config
        setting[name] = parse_value(value)
    return setting


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def parse_value(text: str):
    """A command-line value as YAML reads it ("0.1" -> 0.1, "[A]" -> ["A"]); the text if it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def show(value) -> str:
    """A setting's value as text: lists joined with '+' (vendors A+B), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "+".join(show(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"  # 0.05, 1.5, and a searched rate 0.2437... as 0.244
    return str(value)


# ---------------------------------------------------------------------------- the per-run table


def cell(run: dict, key: str) -> str:
    """A per-run table cell: Dice to 4 places; no Dice for a run that did not finish, but its status."""
    value = run.get(key)
    if value is None:
        if run.get("status") == "ok" or key not in ("dice", "dice_2d", "best_val_dice"):
            return "—"
        return run.get("status", "?")
    if isinstance(value, float):
        return f"{value:.4f}" if key.startswith(("dice", "best")) else f"{value:.3g}"
    return str(value)


def write_run_table(sweep_dir: Path, runs: list[dict]) -> Path:
    """summary.md and summary.csv: one row per run; returns the Markdown path."""
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    lines = [f"# Sweep {sweep_dir}", "", "Dice: test, 3D per volume (primary); dice_2d: per slice. "
             "The study's table (mean ± std over folds and seeds): paper_table.md.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(run, key) for key in COLUMNS) + " |" for run in runs]
    markdown = sweep_dir / "summary.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


# ---------------------------------------------------------------------------- the study's table


@dataclass
class Cell:
    """The runs of one setting (all folds and seeds) and what the table shows for them."""

    runs: list[dict] = field(default_factory=list)
    metric: str = "dice"

    @property
    def values(self) -> list[float]:
        """The metric of each run that finished with a defined value."""
        return [r[self.metric] for r in self.runs if r.get("status") == "ok" and is_number(r.get(self.metric))]

    def count(self, status: str) -> int:
        return sum(r.get("status") == status for r in self.runs)

    @property
    def incomplete(self) -> int:
        """Runs with no value for another reason: still running, unreadable, or an undefined Dice."""
        named = sum(self.count(status) for status in NAMED_STATUSES)
        return len(self.runs) - len(self.values) - named

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def complete(self) -> bool:
        """Every run finished with a value: the cell may be called the best of its column."""
        return bool(self.runs) and len(self.values) == len(self.runs)

    def text(self, best: bool = False) -> str:
        """'0.812 ± 0.013', '0.812 ± 0.013 (1/4 diverged)', 'diverged (4/4)'; bold when ``best``."""
        n = len(self.runs)
        lost = [(name, k) for name, k in [*((status, self.count(status)) for status in NAMED_STATUSES),
                                          ("incomplete", self.incomplete)] if k]
        if not self.values:
            return ", ".join(f"{name} ({k}/{n})" for name, k in lost) or "—"
        number = f"{self.mean:.3f}" + (f" ± {self.std:.3f}" if len(self.values) > 1 else "")
        if best:
            number = f"**{number}**"
        return number + (" (" + ", ".join(f"{k}/{n} {name}" for name, k in lost) + ")" if lost else "")


@dataclass
class StudyTable:
    """One table of the study: the runs sharing the values ``where`` of the factors it does not show."""

    where: dict  # {factor: value} that this table holds fixed
    column: str  # "lr" or "batch_size"
    cells: dict  # {(norm, column value): Cell}

    @property
    def norms(self) -> list:
        return sorted({norm for norm, _ in self.cells}, key=norm_sort_key)

    @property
    def columns(self) -> list:
        return sorted({value for _, value in self.cells}, key=column_sort_key(self.column))

    def best(self) -> set[tuple]:
        """(norm, column value) of the best complete cell of each column."""
        marked = set()
        for value in self.columns:
            complete = [(c.mean, norm) for (norm, v), c in self.cells.items() if v == value and c.complete]
            if complete:
                marked.add((max(complete)[1], value))
        return marked

    def best_settings(self) -> dict:
        """{norm: column value} of each norm's best cell by mean *validation* Dice of its finished runs (the
        test Dice where no run has one): what the learning curves and mixing weights show."""
        chosen, scores = {}, {}
        for (norm, value), c in self.cells.items():
            if not c.values:
                continue
            validation = [r["best_val_dice"] for r in c.runs if r.get("status") == "ok"
                          and is_number(r.get("best_val_dice"))]
            score = (1, statistics.fmean(validation)) if validation else (0, c.mean)
            if norm not in chosen or score > scores[norm]:
                chosen[norm], scores[norm] = value, score
        return chosen

    def title(self) -> str:
        return ", ".join(f"{key}={show(value)}" for key, value in self.where.items()) or "all runs"


def norm_sort_key(norm) -> tuple:
    name = str(norm)
    return (NORM_ORDER.index(name), "") if name in NORM_ORDER else (len(NORM_ORDER), name)


def column_sort_key(column: str):
    """Learning rates from the largest (the paper's order), batch sizes from the smallest."""
    sign = -1 if column == "lr" else 1
    return lambda value: (0, sign * value, "") if is_number(value) else (1, 0, show(value))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hashable(value):
    return tuple(hashable(v) for v in value) if isinstance(value, list) else value


def complete_settings(runs: list[dict]) -> tuple[list[dict], dict, list[str]]:
    """The runs with the settings constant over the sweep filled in where a run that failed at start did not
    record them; those constant settings; and the factors (keys that take more than one value).

    A run that recorded its split (it got past loading the data) and lacks a key really lacked it: that
    counts as a value of its own ("-"), so runs without a held-out vendor beside runs with one make
    ``test_vendors`` a factor rather than a constant wrongly given to all.
    """
    keys = sorted({key for run in runs for key in run["setting"]} - set(REPLICATES) - set(ARM_KEYS))
    known = {}
    for key in keys:
        values = {hashable(run["setting"][key]) for run in runs if run["setting"].get(key) is not None}
        if any(run.get("split") and run["setting"].get(key) is None for run in runs):
            values.add(None)
        known[key] = values
    factors = [key for key in keys if len(known[key]) > 1]
    constant = {key: next(iter(known[key])) for key in keys if len(known[key]) == 1 and None not in known[key]}
    completed = [{**run, "setting": {**constant, **{k: v for k, v in run["setting"].items() if v is not None}}}
                 for run in runs]
    return completed, constant, factors


def study_tables(runs: list[dict], metric: str = "dice") -> tuple[list[StudyTable], dict]:
    """The runs pooled over folds and seeds into tables; also the settings constant over the sweep."""
    runs, constant, factors = complete_settings(runs)
    column = "batch_size" if "batch_size" in factors and "lr" not in factors else "lr"
    split_by = [key for key in factors if key not in ("norm", column)]
    tables: dict[tuple, StudyTable] = {}
    for run in runs:
        setting = run["setting"]
        where = {key: setting.get(key) for key in split_by}
        table = tables.setdefault(tuple(hashable(v) for v in where.values()), StudyTable(where, column, {}))
        cell_key = (setting.get("norm"), setting.get(column))
        table.cells.setdefault(cell_key, Cell(metric=metric)).runs.append(run)
    ordered = sorted(tables.values(), key=lambda t: [column_sort_key(k)(v) for k, v in t.where.items()])
    return ordered, constant


def replicate_note(runs: list[dict]) -> str:
    """E.g. 'folds 0, 1 × seeds 0, 1, 2' -- what the mean ± std is taken over."""
    parts = []
    for key in REPLICATES:
        values = sorted({run["setting"].get(key) for run in runs} - {None})
        if values:
            parts.append(f"{key}{'s' if len(values) > 1 else ''} {', '.join(map(str, values))}")
    return " × ".join(parts) or "single runs"


def select_by_validation(runs: list[dict]) -> list[dict]:
    """One entry per setting but the learning rate (each norm, fold, seed, task, batch size...): the run whose
    rate gave the highest validation Dice (``best_val_dice``, the epoch whose weights were tested), with
    ``chosen_lr`` and ``candidates`` (how many rates were tried) added. Ties go to the larger rate.

    With a single rate there is nothing to choose: its run is taken even without a validation Dice. Where
    no run of several rates has a validation Dice, the entry is a stand-in without Dice whose status says
    why: "diverged" or "failed" (every rate), or "no validation Dice" (e.g. data.val_fraction=0).
    """
    runs, _, _ = complete_settings(runs)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(sorted((k, hashable(v)) for k, v in run["setting"].items() if k not in ("lr", *ARM_KEYS)))
        groups.setdefault(key, []).append(run)
    selected = []
    for members in groups.values():
        rates = {hashable(r["setting"].get("lr")) for r in members}
        scored = [r for r in members if r.get("status") == "ok" and is_number(r.get("best_val_dice"))]
        finished = [r for r in members if r.get("status") == "ok"]
        if scored:
            chosen = max(scored, key=lambda r: (r["best_val_dice"], r["setting"].get("lr") or 0))
        elif len(rates) == 1 and finished:
            chosen = finished[0]
        else:
            statuses = {r.get("status") for r in members}
            status = ("no validation Dice" if "ok" in statuses else "diverged" if "diverged" in statuses
                      else "failed" if "failed" in statuses else "/".join(sorted(map(str, statuses))))
            setting = {k: v for k, v in members[0]["setting"].items() if k not in ("lr", *ARM_KEYS)}
            selected.append({"run": "—", "status": status, "setting": {**setting, "lr": None},
                             "chosen_lr": None, "candidates": len(rates)})
            continue
        selected.append({**chosen, "chosen_lr": chosen["setting"].get("lr"), "candidates": len(rates)})
    return selected


def chosen_rates(cell: Cell) -> str:
    """'lr 0.1×4, 0.5×2': how often each learning rate was chosen among a cell's selected entries."""
    counts: dict = {}
    for run in cell.runs:
        if run.get("chosen_lr") is not None:
            counts[run["chosen_lr"]] = counts.get(run["chosen_lr"], 0) + 1
    ordered = sorted(counts.items(), key=lambda item: -item[0] if is_number(item[0]) else 0)
    return "lr " + ", ".join(f"{show(lr)}×{n}" for lr, n in ordered) if counts else ""


def table_lines(runs: list[dict], metric: str, label: str, csv_rows: list[dict], selected: bool = False) -> list[str]:
    """The Markdown of the study's tables of ``runs`` (one per value of the other factors); appends CSV rows."""
    tables, _ = study_tables(runs, metric)
    lines = []
    for table in tables:
        best = table.best()
        sizes = sorted({len(c.runs) for c in table.cells.values()})
        heads = ["test Dice" if table.column == "lr" and selected else f"{table.column}={show(v)}"
                 for v in table.columns]
        lines += [f"### {table.title()}", "", f"Runs per cell: {', '.join(map(str, sizes))}", "",
                  "| norm | " + " | ".join(heads) + " |", "|---|" + "---|" * len(table.columns)]
        for norm in table.norms:
            texts = []
            for v in table.columns:
                c = table.cells.get((norm, v))
                text = c.text((norm, v) in best) if c else ""
                if c and selected and chosen_rates(c):
                    text += f" ({chosen_rates(c)})"
                texts.append(text)
            lines.append(f"| {show(norm)} | " + " | ".join(texts) + " |")
            plain = [text.replace("**", "") + (" (best)" if (norm, v) in best else "")
                     for v, text in zip(table.columns, texts)]
            csv_rows.append({"table": label, **{k: show(v) for k, v in table.where.items()}, "norm": show(norm),
                             **{head: text for head, text in zip(heads, plain)}})
        lines.append("")
    return lines


def write_study_table(sweep_dir: Path, runs: list[dict], metric: str = "dice") -> Path:
    """paper_table.md and paper_table.csv (and selection.csv when the sweep varies the learning rate);
    returns the Markdown path."""
    _, constant, factors = complete_settings(runs)
    what = {"dice": "test Dice, 3D per volume", "dice_2d": "test Dice, 2D per slice"}.get(metric, metric)
    lines = [f"# Study table: {sweep_dir}", "",
             f"{what} (`{metric}`), mean ± std over {replicate_note(runs)}. **Bold**: the best of its column "
             f"among settings whose runs all finished. A run that diverged or failed has no Dice and is not "
             f"counted as zero: \"diverged (2/4)\" means 2 of the cell's 4 runs diverged; \"0.812 ± 0.013 "
             f"(1/4 diverged)\" is the mean over the 3 that finished.", ""]
    if constant:
        lines += ["Fixed in this sweep: " + ", ".join(f"{k}={show(v)}" for k, v in constant.items()), ""]
    csv_rows: list[dict] = []
    if "lr" in factors:
        selected = select_by_validation(runs)
        write_selection(sweep_dir, selected, metric)
        others = [k for k in factors if k not in ("lr", "norm")]
        lines += ["## Test Dice at the learning rate chosen on validation", "",
                  "For each norm, fold and seed" + (f" (and {', '.join(others)})" if others else "") +
                  " the learning rate with the highest validation Dice (the best epoch's, whose weights were "
                  "tested) is chosen; a cell is the mean ± std of the test Dice of those choices, and \"lr 0.1×4, "
                  "0.5×2\" says how often each rate was chosen (ties: the larger rate; every choice in "
                  "selection.csv). A setting where no rate finished shows how its runs ended.", ""]
        lines += table_lines([{**r, "setting": {**r["setting"], "lr": None}} for r in selected], metric,
                             "lr chosen on validation", csv_rows, selected=True)
        lines += ["## Test Dice per learning rate — for inspection, not for selection", "",
                  "Choosing each norm's best column here and quoting its test Dice would choose on the test "
                  "set (an optimistic figure); the table above chooses on validation.", ""]
        lines += table_lines(runs, metric, "per learning rate (inspection, not selection)", csv_rows)
    else:
        lines += ["## Test Dice", ""]
        lines += table_lines(runs, metric, "all runs", csv_rows)
    markdown = sweep_dir / "paper_table.md"
    markdown.write_text("\n".join(lines))
    fieldnames = list(dict.fromkeys(key for row in csv_rows for key in row))
    with open(sweep_dir / "paper_table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(csv_rows)
    return markdown


def write_selection(sweep_dir: Path, selected: list[dict], metric: str) -> Path:
    """selection.csv: every choice of a learning rate on validation, with the test Dice it reports."""
    keys = sorted({k for entry in selected for k in entry["setting"]} - {"lr", *ARM_KEYS},
                  key=lambda k: (k != "norm", k))
    path = sweep_dir / "selection.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "rates_tried", "chosen_lr", "best_val_dice", f"test_{metric}", "status", "run"])
        for entry in sorted(selected, key=lambda e: [show(e["setting"].get(k)) for k in keys]):
            writer.writerow([show(entry["setting"].get(k)) for k in keys] + [
                entry["candidates"], show(entry["chosen_lr"]), cell(entry, "best_val_dice"), cell(entry, metric),
                entry.get("status"), entry.get("run")])
    return path


# ---------------------------------------------------------------------------- paired comparison


@dataclass
class LayerResult:
    """A norm's test Dice per patient (mean of its volumes and runs) over the selected runs of one group."""

    norm: str
    runs: list[dict]
    patients: dict  # {patient: mean Dice}
    missing: int  # finished runs without per-volume Dice

    @property
    def mean(self) -> float:
        return statistics.fmean(self.patients.values()) if self.patients else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return bootstrap_ci(list(self.patients.values()))


@dataclass
class Comparison:
    """The norms of one group (one value of every factor but norm and learning rate), compared pairwise."""

    where: dict
    layers: list[LayerResult]
    pairs: list  # [Paired], Holm-adjusted over the group
    blocks: dict  # {(fold, seed): {norm: test Dice or None}}

    def title(self) -> str:
        return ", ".join(f"{key}={show(value)}" for key, value in self.where.items()) or "all runs"


@dataclass
class RankFamily:
    """Average ranks over the blocks (task x fold x seed) of the groups that compare the same norms."""

    layers: list
    blocks: list  # [{norm: Dice or None}]
    titles: list  # the groups pooled

    @property
    def average(self) -> dict:
        all_ranks = [ranks(block) for block in self.blocks]
        return {layer: statistics.fmean(r[layer] for r in all_ranks) for layer in self.layers}

    @property
    def drawable(self) -> bool:
        """A critical-difference diagram fits: at least 3 layers and 3 blocks."""
        return len(self.layers) >= 3 and len(self.blocks) >= 3


def comparisons(runs: list[dict], metric: str = "dice") -> tuple[list[Comparison], list[RankFamily]]:
    """The selected runs (rate chosen on validation) grouped by every factor but norm and learning rate;
    each group's layers, pairs and rank blocks; and the rank families over the groups."""
    _, _, factors = complete_settings(runs)
    selected = select_by_validation(runs)
    keys = [k for k in factors if k not in ("norm", "lr")]
    groups: dict[tuple, list[dict]] = {}
    for entry in selected:
        groups.setdefault(tuple(hashable(entry["setting"].get(k)) for k in keys), []).append(entry)
    result = []
    for values, members in sorted(groups.items(), key=lambda item: [column_sort_key(k)(v)
                                                                      for k, v in zip(keys, item[0])]):
        by_norm: dict = {}
        for entry in members:
            by_norm.setdefault(entry["setting"].get("norm"), []).append(entry)
        norms = sorted(by_norm, key=norm_sort_key)
        layers = [LayerResult(n, by_norm[n], *patient_means(by_norm[n])) for n in norms]
        pairs = [pair_runs(show(a), by_norm[a], show(b), by_norm[b])
                 for i, a in enumerate(norms) for b in norms[i + 1:]]
        set_holm(pairs)
        blocks: dict = {}
        for entry in members:
            value = entry.get(metric) if entry.get("status") == "ok" and is_number(entry.get(metric)) else None
            blocks.setdefault(replicate_key(entry), {})[entry["setting"].get("norm")] = value
        complete = {key: block for key, block in blocks.items() if set(block) == set(norms)}
        result.append(Comparison(dict(zip(keys, values)), layers, pairs, complete))
    families: dict[tuple, RankFamily] = {}
    for comparison in result:
        names = tuple(layer.norm for layer in comparison.layers)
        if len(names) >= 2 and comparison.blocks:
            family = families.setdefault(names, RankFamily(list(names), [], []))
            family.blocks.extend(comparison.blocks.values())
            family.titles.append(comparison.title())
    return result, list(families.values())


def pair_result(pair) -> str:
    """What a pair's test says, in words."""
    if pair.too_few or pair.identical:
        return pair.p_text()
    if pair.significant():
        return f"{pair.a} > {pair.b}" if pair.mean > 0 else f"{pair.a} < {pair.b}"
    return "no significant difference"


def fmt(value: float, signed: bool = False) -> str:
    return "—" if value is None or not math.isfinite(value) else (f"{value:+.3f}" if signed else f"{value:.3f}")


def write_comparison(sweep_dir: Path, runs: list[dict], metric: str = "dice", plots: bool = True) -> Path | None:
    """comparison.md, comparison.csv and (with matplotlib) comparison.png; None when scipy is missing."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        print("summary: scipy is not installed, comparison.md skipped (pip install -e '.[study]')")
        return None
    groups, families = comparisons(runs, metric)
    groups = [group for group in groups if len(group.layers) >= 2]
    if not groups:
        return None  # one norm per setting: nothing to compare
    lines = [f"# Paired comparison: {sweep_dir}", "",
             f"Each norm at the learning rate chosen on validation (per fold and seed; paper_table.md). Per-volume "
             f"test Dice (metrics.json `per_volume`) of runs sharing fold and seed are paired by case; the unit is "
             f"the patient (its volumes and replicate runs averaged). Layer means and mean differences with "
             f"{CONFIDENCE:.0%} percentile bootstrap intervals ({RESAMPLES} resamples of the patients, seed "
             f"{BOOTSTRAP_SEED}); two-sided Wilcoxon signed-rank tests, Holm-corrected over the pairs of each "
             f"table, significant below {ALPHA}; no test below {MIN_UNITS} paired patients.", ""]
    csv_rows = []
    for group in groups:
        lines += [f"## {group.title()}", "", "| norm | runs | patients | mean test Dice | 95% CI |",
                  "|---|---|---|---|---|"]
        for layer in group.layers:
            low, high = layer.ci
            finished = sum(r.get("status") == "ok" for r in layer.runs)
            lines.append(f"| {show(layer.norm)} | {finished}/{len(layer.runs)} | {len(layer.patients)} | "
                         f"{fmt(layer.mean)} | [{fmt(low)}, {fmt(high)}] |")
            csv_rows.append({"kind": "layer", "group": group.title(), "a": show(layer.norm), "n": len(layer.patients),
                             "mean": layer.mean, "ci_low": low, "ci_high": high})
        missing = sum(layer.missing for layer in group.layers)
        if missing:
            lines += ["", f"{missing} finished run(s) have no per-volume Dice in metrics.json (written before it "
                          f"existed) and are left out of the patients' means and the pairs."]
        if group.pairs:
            lines += ["", "| A | B | patients | mean A − B | 95% CI | p | result |", "|---|---|---|---|---|---|---|"]
        for pair in group.pairs:
            low, high = pair.ci
            p = "—" if pair.p is None else f"{pair.p:.2g} (Holm {pair.p_holm:.2g})"
            lines.append(f"| {pair.a} | {pair.b} | {pair.n} | {fmt(pair.mean, True)} | [{fmt(low, True)}, "
                         f"{fmt(high, True)}] | {p} | {pair_result(pair)} |")
            csv_rows.append({"kind": "pair", "group": group.title(), "a": pair.a, "b": pair.b, "n": pair.n,
                             "mean": pair.mean, "ci_low": low, "ci_high": high, "p": pair.p, "p_holm": pair.p_holm,
                             "result": pair_result(pair)})
        lines.append("")
    if families:
        lines += ["## Average ranks", "",
                  "Per block (a task or other setting, a fold and a seed) the norms are ranked by test Dice of the run "
                  "chosen on validation (1 = best; a run that diverged or failed ranks last); the blocks of one "
                  "setting share patients, so Friedman's test and the Nemenyi critical difference (CD) describe "
                  "these runs rather than independent data sets.", ""]
    for family in families:
        average = family.average
        p = friedman_p(family.blocks, family.layers)
        cd = nemenyi_cd(len(family.layers), len(family.blocks)) if len(family.layers) >= 2 else math.nan
        names = ", ".join(map(show, family.layers))
        lines += [f"### {names} — {len(family.blocks)} blocks ({'; '.join(family.titles)})",
                  "", "| norm | average rank |", "|---|---|"]
        lines += [f"| {show(n)} | {average[n]:.2f} |" for n in sorted(family.layers, key=lambda n: average[n])]
        test = ("Friedman: no test (fewer than 3 norms or 2 blocks, or all norms tie in every block)" if p is None
                else f"Friedman p = {p:.2g}")
        drawn = ("critical-difference diagram in comparison.png" if family.drawable
                 else "no critical-difference diagram (it needs at least 3 norms and 3 blocks)")
        lines += ["", f"{test}; Nemenyi CD (alpha {ALPHA}) = {fmt(cd)}; {drawn}.", ""]
        for n in family.layers:
            csv_rows.append({"kind": "rank", "group": "; ".join(family.titles), "a": show(n), "n": len(family.blocks),
                             "mean": average[n], "p": p, "result": f"CD {cd:.3f}"})
    markdown = sweep_dir / "comparison.md"
    markdown.write_text("\n".join(lines))
    fieldnames = ["kind", "group", "a", "b", "n", "mean", "ci_low", "ci_high", "p", "p_holm", "result"]
    with open(sweep_dir / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(csv_rows)
    if plots:
        plot_comparison(sweep_dir, groups, families)
    return markdown


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


# ---------------------------------------------------------------------------- plots


def write_plots(sweep_dir: Path, runs: list[dict], metric: str = "dice") -> list[Path]:
    """The study's PNGs; none (with a one-line notice) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # the object API: no global pyplot state, no display needed
    except ImportError:
        print("summary: matplotlib is not installed, plots skipped (pip install -e '.[study]')")
        return []
    tables, _ = study_tables(runs, metric)
    written = [plot_dice(Figure, sweep_dir, tables, metric), plot_learning_curves(Figure, sweep_dir, tables),
               plot_mixing_weights(Figure, sweep_dir, tables)]
    return [path for path in written if path is not None]


def norm_color(norm):
    """The same colour for a norm in every figure (its place in the study's order)."""
    from matplotlib import colormaps

    index = norm_sort_key(norm)[0]
    return colormaps["tab10"](index) if index < 10 else colormaps["tab20"]((2 * index + 1) % 20)


def subplot_grid(Figure, rows: int, columns: int, width: float = 4.5, height: float = 3.4):
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def plot_dice(Figure, sweep_dir: Path, tables: list[StudyTable], metric: str) -> Path:
    """Dice (mean ± std) against the table's column (learning rate or batch size), one line per norm.

    A setting whose runs all diverged or failed is an × on the bottom edge, not a point at zero.
    """
    column = tables[0].column
    figure, axes = subplot_grid(Figure, 1, len(tables))
    for ax, table in zip(axes[0], tables):
        for norm in table.norms:
            cells = [(v, table.cells[(norm, v)]) for v in table.columns if (norm, v) in table.cells and is_number(v)]
            done = [(v, c) for v, c in cells if c.values]
            color = norm_color(norm)
            ax.errorbar([v for v, _ in done], [c.mean for _, c in done],
                        yerr=[0 if math.isnan(c.std) else c.std for _, c in done],
                        marker="o", capsize=3, color=color, label=show(norm))
            lost = [v for v, c in cells if not c.values]
            if lost:  # x in data units, y in axes units: on the bottom edge whatever the Dice range
                ax.plot(lost, [0.02] * len(lost), "x", color=color, markersize=9,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log", base=2 if column == "batch_size" else 10)
        ax.set_xlabel("batch size" if column == "batch_size" else "learning rate")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(table.title(), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="norm (× all runs\ndiverged/failed)", fontsize=8, title_fontsize=8)
    path = sweep_dir / f"dice_vs_{column}.png"
    figure.savefig(path, dpi=120)
    return path


def history_curve(cell: Cell, key: str) -> tuple[list, list, list]:
    """(epochs, mean, std) of one history entry over the finished runs of a cell."""
    by_epoch: dict[int, list[float]] = {}
    for run in cell.runs:
        if run.get("status") == "ok":
            for entry in run.get("history") or []:
                if is_number(entry.get(key)):
                    by_epoch.setdefault(entry["epoch"], []).append(entry[key])
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs],
            [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])


def plot_learning_curves(Figure, sweep_dir: Path, tables: list[StudyTable]) -> Path:
    """Training loss and validation Dice per epoch; each norm at its best column value, mean ± std."""
    figure, axes = subplot_grid(Figure, 2, len(tables))
    for index, table in enumerate(tables):
        for norm, value in sorted(table.best_settings().items(), key=lambda item: norm_sort_key(item[0])):
            label = f"{show(norm)} ({table.column}={show(value)})"
            for ax, key in zip(axes[:, index], ("train_loss", "val_dice")):
                epochs, mean, std = history_curve(table.cells[(norm, value)], key)
                if epochs:
                    ax.plot(epochs, mean, marker="o", color=norm_color(norm), label=label)
                    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=norm_color(norm), alpha=0.2)
        axes[0, index].set_title(table.title(), fontsize=10)
        for ax, name in zip(axes[:, index], ("training loss (epoch mean)", "validation Dice")):
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    path = sweep_dir / "learning_curves.png"
    figure.savefig(path, dpi=120)
    return path


def short_layer_name(name: str) -> str:
    """'down.0.first.conv_norm.norm' -> 'down.0.first': the block, without the module path inside it."""
    for suffix in (".conv_norm.norm", ".norm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def plot_mixing_weights(Figure, sweep_dir: Path, tables: list[StudyTable]) -> Path | None:
    """The learned mixing weights of each layer (BIN's rho, ILN's sigmoid(rho), SN's softmaxed weights),
    mean ± std over the finished runs of each norm's best setting; None if no run has any."""
    panels = []  # (table, norm, {weight key: {layer: [values]}})
    for table in tables:
        for norm, value in sorted(table.best_settings().items(), key=lambda item: norm_sort_key(item[0])):
            weights: dict[str, dict[str, list[float]]] = {}
            for run in table.cells[(norm, value)].runs:
                if run.get("status") == "ok":
                    for layer, values in (run.get("mixing_weights") or {}).items():
                        for key, number in values.items():
                            weights.setdefault(key, {}).setdefault(layer, []).append(number)
            if weights:
                panels.append((table, f"{show(norm)} ({table.column}={show(value)})", weights))
    if not panels:
        print("summary: no run has learned mixing weights (bin, iln, sn); mixing_weights.png not written")
        return None
    figure, axes = subplot_grid(Figure, len(panels), 1, width=10, height=3.2)
    for ax, (table, label, weights) in zip(axes[:, 0], panels):
        layers = list(dict.fromkeys(layer for per_layer in weights.values() for layer in per_layer))
        for key, per_layer in weights.items():
            points = [(i, per_layer[layer]) for i, layer in enumerate(layers) if layer in per_layer]
            mean = [statistics.fmean(v) for _, v in points]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar([i for i, _ in points], mean, yerr=std, marker="o", capsize=3, label=key)
        ax.set_xticks(range(len(layers)), [short_layer_name(layer) for layer in layers], rotation=60,
                      ha="right", fontsize=7)
        ax.set_ylim(-0.03, 1.03)  # every mixing weight is a gate or a softmax share in [0, 1]
        ax.set_ylabel("weight")
        ax.set_title(f"{label}, {table.title()}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2)
    path = sweep_dir / "mixing_weights.png"
    figure.savefig(path, dpi=120)
    return path


def plot_comparison(sweep_dir: Path, groups: list[Comparison], families: list[RankFamily]) -> Path | None:
    """comparison.png: each group's norms, mean test Dice per patient with its 95% interval; and a
    critical-difference diagram for each rank family where one fits. None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    drawn = [family for family in families if family.drawable]
    panels = len(groups) + len(drawn)
    if not panels:
        return None
    figure, axes = subplot_grid(Figure, panels, 1, width=7, height=2.8)
    for ax, group in zip(axes[:, 0], groups):
        for index, layer in enumerate(group.layers):
            low, high = layer.ci
            if math.isfinite(layer.mean):
                ax.errorbar([layer.mean], [index], xerr=[[layer.mean - low], [high - layer.mean]], fmt="o",
                            capsize=4, color=norm_color(layer.norm))
        ax.set_yticks(range(len(group.layers)), [show(layer.norm) for layer in group.layers])
        ax.invert_yaxis()
        ax.set_xlabel("test Dice per patient: mean and 95% bootstrap CI")
        ax.set_title(group.title(), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    for ax, family in zip(axes[len(groups):, 0], drawn):
        plot_critical_difference(ax, family)
    path = sweep_dir / "comparison.png"
    figure.savefig(path, dpi=120)
    return path


def plot_critical_difference(ax, family: RankFamily) -> None:
    """Demsar's diagram: the norms on the average-rank axis (1 = best, left), the Nemenyi CD as a bar, and a
    thick line under each maximal set of norms whose ranks lie within one CD of each other."""
    average = family.average
    k, cd = len(family.layers), nemenyi_cd(len(family.layers), len(family.blocks))
    ordered = sorted(family.layers, key=lambda n: average[n])
    ax.set_xlim(0.8, k + 0.2)
    ax.set_ylim(-len(ordered) - 1, 2)
    ax.axhline(0, color="black", linewidth=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.15], color="black", linewidth=1)
    ax.plot([1, 1 + cd], [1.2, 1.2], color="black", linewidth=2)
    ax.text(1 + cd / 2, 1.35, f"CD = {cd:.2f}", ha="center", fontsize=8)
    for row, norm in enumerate(ordered, start=1):
        x = average[norm]
        ax.plot([x, x], [0, -row], color=norm_color(norm), linewidth=1)
        ax.text(x + 0.05, -row, f"{show(norm)} ({x:.2f})", va="center", fontsize=8)
    cliques: list[tuple[int, int]] = []
    for start in range(len(ordered)):
        end = max(i for i in range(len(ordered)) if average[ordered[i]] - average[ordered[start]] < cd)
        if end > start and not any(s <= start and end <= e for s, e in cliques):
            cliques.append((start, end))
    for level, (first, last) in enumerate(cliques, start=1):
        ax.plot([average[ordered[first]], average[ordered[last]]], [-0.3 * level] * 2, color="black", linewidth=3)
    ax.set_yticks([])
    ax.set_xlabel("average rank (1 = best)")
    ax.set_title(f"critical difference, {len(family.blocks)} blocks: {'; '.join(family.titles)}", fontsize=9)


# ---------------------------------------------------------------------------- everything


def write_summary(sweep_dir: str | Path, metric: str = "dice", plots: bool = True) -> Path | None:
    """Write the per-run table, the study's table, the paired comparison, the claims (where the sweep holds
    their runs) and the plots; returns the per-run table's path."""
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        return None
    markdown = write_run_table(sweep_dir, runs)
    write_study_table(sweep_dir, runs, metric)
    write_comparison(sweep_dir, runs, metric, plots)
    write_claims_file(sweep_dir, runs)
    if plots:
        write_plots(sweep_dir, runs, metric)
    return markdown


class MultirunSummary(Callback):
    """Hydra callback: write the sweep's tables and plots when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"Sweep summary: {path}")
            print((path.parent / "paper_table.md").read_text())
