"""Tables and plots of a whole sweep, from every run's metrics.json.

Written automatically at the end of a multirun (``MultirunSummary``, a Hydra callback configured
in configs/train.yaml), or by ``python scripts/summarize.py <sweep folder>``; both call
``write_summary(sweep_dir)``, which writes into the sweep folder:

- ``summary.md`` / ``summary.csv``: one row per run (norm, lr, batch size, seed, status, Dice...);
- ``paper_table.md`` / ``paper_table.csv``: the study's table, laid out like the ILN paper's --
  rows norms, columns learning rates (or batch sizes, when the sweep varies those instead), each
  cell the test Dice mean ± std over the runs that differ only in fold and seed. One table per
  value of anything else the sweep varied (task, test vendor, ...);
- ``dice_vs_lr.png`` (or ``dice_vs_batch_size.png``), ``learning_curves.png`` and
  ``mixing_weights.png`` when matplotlib is installed (the ``study`` extra).

How runs are pooled and shown (``Cell``):

- A run's setting is read from its metrics.json, completed by its ``.hydra/`` record (a run that
  failed at start wrote little else). Fold and seed are replicates; every other key that takes
  more than one value in the sweep is a factor.
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

from .identity import defines_run  # which command-line keys say what a run computed (one list, seg/identity.py)

COLUMNS = ["run", "norm", "lr", "batch_size", "seed", "status", "dice", "dice_2d", "best_val_dice",
           "images_per_s", "wall_time_s", "task", "fold", "error"]

# The study's order of rows (the paper's, then the other layers); unknown names follow alphabetically.
NORM_ORDER = ("bn", "in", "ln", "gn", "bin", "iln", "sn", "bkn", "kn", "wn", "pn", "lcn", "none")
REPLICATES = ("fold", "seed")  # runs that differ only in these are pooled into one cell
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
        return len(self.runs) - len(self.values) - self.count("diverged") - self.count("failed")

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
        lost = [(name, k) for name, k in (("diverged", self.count("diverged")), ("failed", self.count("failed")),
                                          ("incomplete", self.incomplete)) if k]
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
        """{norm: column value} of each norm's best cell (highest mean of its finished runs)."""
        chosen = {}
        for (norm, value), c in self.cells.items():
            if c.values and (norm not in chosen or c.mean > self.cells[(norm, chosen[norm])].mean):
                chosen[norm] = value
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


def study_tables(runs: list[dict], metric: str = "dice") -> tuple[list[StudyTable], dict]:
    """The runs pooled over folds and seeds into tables; also the settings constant over the sweep."""
    keys = sorted({key for run in runs for key in run["setting"]} - set(REPLICATES))
    known = {key: {hashable(run["setting"].get(key)) for run in runs} - {None} for key in keys}
    factors = [key for key in keys if len(known[key]) > 1]
    # a key with one known value is constant: a run that did not record it (failed early) had it too
    constant = {key: next(iter(known[key])) for key in keys if len(known[key]) == 1}
    runs = [{**run, "setting": {**constant, **{k: v for k, v in run["setting"].items() if v is not None}}}
            for run in runs]
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


def write_study_table(sweep_dir: Path, runs: list[dict], metric: str = "dice") -> Path:
    """paper_table.md and paper_table.csv; returns the Markdown path."""
    tables, constant = study_tables(runs, metric)
    what = {"dice": "test Dice, 3D per volume", "dice_2d": "test Dice, 2D per slice"}.get(metric, metric)
    lines = [f"# Study table: {sweep_dir}", "",
             f"{what} (`{metric}`), mean ± std over {replicate_note(runs)}. **Bold**: the best of its column "
             f"among settings whose runs all finished. A run that diverged or failed has no Dice and is not "
             f"counted as zero: \"diverged (2/4)\" means 2 of the cell's 4 runs diverged; \"0.812 ± 0.013 "
             f"(1/4 diverged)\" is the mean over the 3 that finished.", ""]
    if constant:
        lines += ["Fixed in this sweep: " + ", ".join(f"{k}={show(v)}" for k, v in constant.items()), ""]
    csv_rows = []
    for table in tables:
        best = table.best()
        sizes = sorted({len(c.runs) for c in table.cells.values()})
        lines += [f"## {table.title()}", "", f"Runs per cell: {', '.join(map(str, sizes))}", "",
                  "| norm | " + " | ".join(f"{table.column}={show(v)}" for v in table.columns) + " |",
                  "|---|" + "---|" * len(table.columns)]
        for norm in table.norms:
            texts = [table.cells[(norm, v)].text((norm, v) in best) if (norm, v) in table.cells else ""
                     for v in table.columns]
            lines.append(f"| {show(norm)} | " + " | ".join(texts) + " |")
            plain = [text.replace("**", "") + (" (best)" if (norm, v) in best else "")
                     for v, text in zip(table.columns, texts)]
            csv_rows.append({**{k: show(v) for k, v in table.where.items()}, "norm": show(norm),
                             **{f"{table.column}={show(v)}": text for v, text in zip(table.columns, plain)}})
        lines.append("")
    markdown = sweep_dir / "paper_table.md"
    markdown.write_text("\n".join(lines))
    fieldnames = list(dict.fromkeys(key for row in csv_rows for key in row))
    with open(sweep_dir / "paper_table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(csv_rows)
    return markdown


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


# ---------------------------------------------------------------------------- everything


def write_summary(sweep_dir: str | Path, metric: str = "dice", plots: bool = True) -> Path | None:
    """Write the per-run table, the study's table and its plots; returns the per-run table's path."""
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        return None
    markdown = write_run_table(sweep_dir, runs)
    write_study_table(sweep_dir, runs, metric)
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
