"""The sweep's plots: Dice against the learning rate (or batch size), learning curves, mixing weights and
the comparison's critical-difference diagram (matplotlib, the study extra)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from .runs import show
from .stats import nemenyi_cd
from .tables import Cell, StudyTable, is_number, norm_sort_key, study_tables

if TYPE_CHECKING:  # annotations only: comparison.py calls plot_comparison
    from .comparison import Comparison, RankFamily

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
                if not (math.isfinite(low) and math.isfinite(high)):  # fewer than 2 patients: no interval
                    low = high = layer.mean
                ax.errorbar([layer.mean], [index], xerr=[[layer.mean - low], [high - layer.mean]], fmt="o",
                            capsize=4, color=norm_color(layer.norm))
        ax.set_yticks(range(len(group.layers)), [show(layer.norm) for layer in group.layers])
        ax.invert_yaxis()
        ax.set_xlabel("test Dice per patient: mean and 95% t-interval")
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


