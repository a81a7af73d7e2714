"""The study's table (paper_table.md): runs pooled into cells by setting, each layer's learning rate chosen
on validation, and the table of every rate for inspection."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .hd95_column import has_hd95, hd95_text
from .runs import ARM_KEYS, NAMED_STATUSES, NORM_ORDER, REPLICATES, cell, show

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

    A choice among candidates of which one has no result -- its folder missing from the sweep's plan, its
    metrics.json unreadable (truncated), its run interrupted, failed or still running -- may not be the one the
    full sweep makes: ``incomplete`` lists those candidates ('lr 0.5 interrupted'), and the tables name them.
    A diverged candidate is a result (that rate does not train), not a gap.
    """
    runs, _, _ = complete_settings(runs)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(sorted((k, hashable(v)) for k, v in run["setting"].items() if k not in ("lr", *ARM_KEYS)))
        groups.setdefault(key, []).append(run)
    selected = []
    for members in groups.values():
        rates = {hashable(r["setting"].get("lr")) for r in members}
        gaps = [f"lr {show(r['setting'].get('lr'))} {short_status(r.get('status'))}" for r in
                sorted(members, key=lambda r: str(r["setting"].get("lr"))) if r.get("status") not in COMPLETE]
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
                             "chosen_lr": None, "candidates": len(rates), "incomplete": gaps})
            continue
        selected.append({**chosen, "chosen_lr": chosen["setting"].get("lr"), "candidates": len(rates),
                         "incomplete": gaps})
    return selected


COMPLETE = ("ok", "diverged")  # a candidate with a result: finished, or a rate that does not train


def short_status(status) -> str:
    """A run's status as a choice's note names it: 'unreadable' -> 'unreadable metrics.json'."""
    return "unreadable metrics.json" if status == "unreadable" else str(status).split(" (")[0]


def incomplete_choices(selected: list[dict]) -> list[str]:
    """One line per choice made without all its candidates: 'norm=bn, seed=1, fold=0: lr 0.5 interrupted'."""
    lines = []
    keys = sorted({k for entry in selected for k in entry["setting"]})
    named = [k for k in keys if k in ("norm", *REPLICATES) or len({show(e["setting"].get(k)) for e in selected}) > 1]
    for entry in selected:
        if entry.get("incomplete"):
            where = ", ".join(f"{k}={show(entry['setting'].get(k))}" for k in named
                              if k not in ("lr", *ARM_KEYS) and entry["setting"].get(k) is not None)
            lines.append(f"{where}: {'; '.join(entry['incomplete'])}")
    return lines


def incomplete_note(cell: Cell) -> str:
    """'choice incomplete in 1/6: lr 0.5 interrupted': a cell's choices made without all their candidates."""
    gaps = [entry for entry in cell.runs if entry.get("incomplete")]
    if not gaps:
        return ""
    named = sorted({gap for entry in gaps for gap in entry["incomplete"]})
    return f"choice incomplete in {len(gaps)}/{len(cell.runs)}: {', '.join(named)}"


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
        distances = has_hd95(table.cells.values())
        if distances:
            heads += [f"HD95 (mm){'' if len(table.columns) == 1 else f' {table.column}={show(v)}'}"
                      for v in table.columns]
        lines += [f"### {table.title()}", "", f"Runs per cell: {', '.join(map(str, sizes))}", "",
                  "| norm | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for norm in table.norms:
            texts = []
            for v in table.columns:
                c = table.cells.get((norm, v))
                text = c.text((norm, v) in best) if c else ""
                if c and selected and chosen_rates(c):
                    text += f" ({chosen_rates(c)})"
                if c and selected and incomplete_note(c):
                    text += f" (**{incomplete_note(c)}**)"
                texts.append(text)
            plain = [text.replace("**", "") + (" (best)" if (norm, v) in best else "")
                     for v, text in zip(table.columns, texts)]
            if distances:  # the HD95 column(s): seg/study/hd95_column.py
                texts += [hd95_text(table.cells.get((norm, v))) for v in table.columns]
                plain += texts[len(table.columns):]
            lines.append(f"| {show(norm)} | " + " | ".join(texts) + " |")
            csv_rows.append({"table": label, **{k: show(v) for k, v in table.where.items()}, "norm": show(norm),
                             **{head: text for head, text in zip(heads, plain)}})
        lines.append("")
    return lines


def write_study_table(sweep_dir: Path, runs: list[dict], metric: str = "dice", notes: list[str] = ()) -> Path:
    """paper_table.md and paper_table.csv (and selection.csv when the sweep varies the learning rate);
    ``notes``: lines about the runs behind the tables (duplicates left out, planned jobs missing); returns the
    Markdown path."""
    _, constant, factors = complete_settings(runs)
    what = {"dice": "test Dice, 3D per volume", "dice_2d": "test Dice, 2D per slice"}.get(metric, metric)
    lines = [f"# Study table: {sweep_dir}", "",
             f"{what} (`{metric}`), mean ± std over {replicate_note(runs)}. **Bold**: the best of its column "
             f"among settings whose runs all finished. A run that diverged or failed has no Dice and is not "
             f"counted as zero: \"diverged (2/4)\" means 2 of the cell's 4 runs diverged; \"0.812 ± 0.013 "
             f"(1/4 diverged)\" is the mean over the 3 that finished.", ""]
    if constant:
        lines += ["Fixed in this sweep: " + ", ".join(f"{k}={show(v)}" for k, v in constant.items()), ""]
    lines += [*(f"**Note:** {note}" for note in notes), *([""] if notes else [])]
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
                  "selection.csv). A setting where no rate finished shows how its runs ended. A choice made while "
                  "a candidate rate has no result (its job missing from the sweep's plan, its metrics.json "
                  "unreadable, its run interrupted, failed or running) is marked **choice incomplete**, naming the "
                  "candidate: the full sweep may choose otherwise.", ""]
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
        writer.writerow([*keys, "rates_tried", "chosen_lr", "best_val_dice", f"test_{metric}", "status", "run",
                         "incomplete"])
        for entry in sorted(selected, key=lambda e: [show(e["setting"].get(k)) for k in keys]):
            writer.writerow([show(entry["setting"].get(k)) for k in keys] + [
                entry["candidates"], show(entry["chosen_lr"]), cell(entry, "best_val_dice"), cell(entry, metric),
                entry.get("status"), entry.get("run"), "; ".join(entry.get("incomplete") or [])])
    return path


