"""A sweep's runs read back: each run's setting and results from its metrics.json and .hydra/ record, and
the per-run table (summary.md, summary.csv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from ..config.identity import defines_run

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
        except (OSError, json.JSONDecodeError) as err:  # its setting still comes from .hydra/, its error said once
            metrics = {"status": "unreadable", "error": f"metrics.json cannot be read ({err})"}
        run = {"run": path.parent.name, **metrics}
        run.setdefault("fold", (metrics.get("split") or {}).get("fold"))
        run["setting"] = run_setting(path.parent, metrics)
        for key in ("norm", "lr", "batch_size", "seed", "task", "fold"):  # an unreadable run's row: from .hydra/
            if metrics.get("status") == "unreadable" and run.get(key) is None:
                run[key] = run["setting"].get(key)
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


