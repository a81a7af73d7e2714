"""A sweep's runs read back: each run's setting and results from its metrics.json and .hydra/ record, held
against the sweep's plan (its multirun.yaml), and the per-run table (summary.md, summary.csv).

- **The plan.** A grid sweep's multirun.yaml holds its sweeper's parameters and the command line; the jobs
  they expand to (as Hydra's basic sweeper expands them) are the plan. A planned job without a run folder
  is a stand-in run with status ``missing``, so a table or a choice of learning rate that needs it says so
  instead of choosing among the rest. A search (Optuna) has no grid: no plan.
- **Duplicates.** Two folders of one configuration (the same setting, fold and seed; e.g. a sweep
  resumed before job folders were found by their overrides) are never pooled as replicates: the one that
  finished (else the newer) is used, and ``Sweep.duplicates`` says which was left out.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from ..config.identity import defines_run

COLUMNS = ["run", "norm", "lr", "batch_size", "seed", "status", "dice", "dice_2d", "best_val_dice",
           "images_per_s", "wall_time_s", "task", "fold", "error"]

# The study's order of rows (the paper's, then the other layers); unknown names follow alphabetically.
NORM_ORDER = ("bn", "in", "ln", "gn", "bin", "iln", "sn", "bkn", "kn", "wn", "pn", "lcn", "none")
REPLICATES = ("fold", "seed")  # runs that differ only in these are pooled into one cell
# statuses a cell names; any other run without a value (running, unreadable, an undefined Dice) is "incomplete"
NAMED_STATUSES = ("diverged", "failed", "interrupted", "missing", "no validation Dice")
ARM_KEYS = ("claim",)  # a config group that bundles settings every run records itself: never a factor
# configuration keys with a name of their own in the tables
KNOWN_KEYS = {"norm": "norm", "norm.name": "norm", "lr": "lr", "trainer.batch_size": "batch_size",
              "seed": "seed", "data.fold": "fold", "data.task": "task", "data": "data", "data.name": "data",
              "data.train_vendors": "train_vendors", "data.test_vendors": "test_vendors",
              "data.train_centres": "train_centres", "data.test_centres": "test_centres"}




# ---------------------------------------------------------------------------- reading runs


@dataclass
class Sweep:
    """A sweep folder read back: its runs (planned but missing jobs as stand-ins), the duplicates left out
    ([(used, [left out])]) and whether a plan was found."""

    runs: list[dict]
    duplicates: list[tuple[str, list[str]]] = field(default_factory=list)
    planned: bool = False

    def notes(self) -> list[str]:
        """What a reader must know about the runs behind the tables, one line each."""
        lines = [f"Duplicate runs of one configuration, not pooled: used {used}, left out {', '.join(left)}."
                 for used, left in self.duplicates]
        missing = [run["run"] for run in self.runs if run.get("status") == MISSING]
        if missing:
            lines.append(f"{len(missing)} planned job(s) of the sweep (multirun.yaml) have no run folder: "
                         + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        return lines


MISSING = "missing"  # the status of a planned job that has no run folder


def read_runs(sweep_dir: Path) -> list[dict]:
    """The runs of ``read_sweep``."""
    return read_sweep(sweep_dir).runs


def read_sweep(sweep_dir: Path) -> Sweep:
    """metrics.json of every run folder directly below ``sweep_dir`` (its folder name as ``run``), one run per
    configuration, and a stand-in for each planned job that has no folder."""
    runs = []
    for path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:  # its setting still comes from .hydra/, its error said once
            metrics = {"status": "unreadable", "error": f"metrics.json cannot be read ({err})"}
        run = {"run": path.parent.name, **metrics}
        run.setdefault("fold", (metrics.get("split") or {}).get("fold"))
        run["setting"] = run_setting(path.parent, metrics)
        for key in ("norm", "lr", "batch_size", "seed", "task", "fold"):  # an unreadable run's row: from .hydra/
            if metrics.get("status") == "unreadable" and run.get(key) is None:
                run[key] = run["setting"].get(key)
        run["job"] = job_identity(read_yaml(path.parent / ".hydra" / "overrides.yaml") or [])
        run["written"] = path.stat().st_mtime
        runs.append(run)
    runs, duplicates = drop_duplicates(runs)
    plan = read_plan(Path(sweep_dir))
    if plan is not None:
        runs += missing_jobs(plan, runs)
    order = sorted(runs, key=lambda r: (str(r["setting"].get("norm")), -(r["setting"].get("lr") or 0),
                                        r["setting"].get("seed") or 0, r["run"]))
    return Sweep(order, duplicates, plan is not None)


def job_identity(overrides: list) -> frozenset:
    """A job's command-line overrides that define its run (seg/config/identity.py), as a set of 'key=value'."""
    return frozenset(str(o).lstrip("+") for o in overrides if defines_run(str(o).partition("=")[0]))


def drop_duplicates(runs: list[dict]) -> tuple[list[dict], list[tuple[str, list[str]]]]:
    """One run per configuration (setting, fold, seed and the job's overrides): the finished one, else the newest."""
    groups: dict = {}
    for run in runs:
        key = tuple(sorted((k, str(v)) for k, v in run["setting"].items()))
        groups.setdefault(key, []).append(run)
    kept, duplicates = [], []
    for members in groups.values():
        members.sort(key=lambda r: (r.get("status") == "ok", r.get("written", 0)), reverse=True)
        kept.append(members[0])
        if len(members) > 1:
            duplicates.append((members[0]["run"], [r["run"] for r in members[1:]]))
    return kept, duplicates


def read_plan(sweep_dir: Path) -> list[frozenset] | None:
    """The identities of the jobs a grid sweep planned (multirun.yaml: the sweeper's params and the command
    line, expanded as Hydra's basic sweeper does); None without a multirun.yaml or for another sweeper."""
    config = read_yaml(sweep_dir / "multirun.yaml")
    hydra = (config or {}).get("hydra") if isinstance(config, dict) else None
    if not isinstance(hydra, dict):
        return None
    sweeper = hydra.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
    except Exception:  # noqa: BLE001 -- a plan that cannot be read is no plan (the tables say nothing of it)
        return None
    return [job_identity(job) for job in jobs]


def missing_jobs(plan: list[frozenset], runs: list[dict]) -> list[dict]:
    """A stand-in (status ``missing``) for each planned job no run folder holds; its setting from its overrides,
    completed from a run of the same arm (``ARM_KEYS``, e.g. +claim=b1_bn) where it names one."""
    done = {run["job"] for run in runs}
    stand_ins = []
    for job in plan:
        if job in done:
            continue
        setting: dict = {}
        for override in sorted(job):
            key, _, value = override.partition("=")
            setting[KNOWN_KEYS.get(key, key)] = parse_value(value)
        sibling = next((r for r in runs if any(setting.get(k) is not None and r["setting"].get(k) == setting[k]
                                               for k in ARM_KEYS)), None)
        if sibling is not None:
            setting = {**{k: v for k, v in sibling["setting"].items() if k not in REPLICATES}, **setting}
        for key in REPLICATES:  # a replicate the sweep does not vary (e.g. fold 0 throughout)
            values = {str(r["setting"].get(key)) for r in runs}
            if key not in setting and len(values) == 1 and runs:
                setting[key] = runs[0]["setting"].get(key)
        name = ",".join(sorted(job)) or "defaults"
        stand_ins.append({"run": f"({name})", "status": MISSING, "setting": setting, "job": job})
    return stand_ins


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


def write_run_table(sweep_dir: Path, runs: list[dict], notes: list[str] = ()) -> Path:
    """summary.md and summary.csv: one row per run (a planned job without a folder as ``missing``), after
    ``notes`` about the runs; returns the Markdown path."""
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    lines = [f"# Sweep {sweep_dir}", "", "Dice: test, 3D per volume (primary); dice_2d: per slice. "
             "The study's table (mean ± std over folds and seeds): paper_table.md.", "",
             *(f"**Note:** {note}" for note in notes), *([""] if notes else []),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(run, key) for key in COLUMNS) + " |" for run in runs]
    markdown = sweep_dir / "summary.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


