"""What the two study pages share (scripts/study_iln.py, scripts/study_claims.py): run a preset's sweep as a user
runs it, read back what it wrote, and lay out the page's scope, its runs per arm, its plots and its headline.

Each page script runs ``python train.py -m experiment=<preset> hydra/launcher=<launcher>`` in a folder of its
own, then writes through ``harness.write_result`` ``docs/results/<name>.md`` (the sweep's own tables --
paper_table.md, comparison.md, claims.md -- as the sweep wrote them), the plots copied beside it into
``docs/results/<name>/``, and ``docs/results/<name>.json``: the page's headline figures, for a program (the
README's test, tests/test_study_pages.py) to read. Nothing here computes a verdict or a table of its own: the
figures are the sweep's (seg/study), read back.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, write_json
from seg.study.runs import read_runs, read_yaml
from seg.study.tables import select_by_validation

PLOTS = ("dice_vs_lr.png", "dice_vs_batch_size.png", "learning_curves.png", "mixing_weights.png", "comparison.png")


def page_arguments(description: str, page: str) -> argparse.Namespace:
    """The command line every study page takes: the launcher, the page's path, a data folder, and the sweep's
    overrides after ``--``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--launcher", default="stacked", help="hydra/launcher of the sweep (default: stacked)")
    parser.add_argument("--out", type=Path, default=None, help=f"the result page (default: docs/results/{page}.md)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default: a fresh one)")
    parser.add_argument("overrides", nargs="*", help="overrides of the sweep (after --)")
    return parser.parse_args()


def run_sweep(preset: str, launcher: str, overrides: list[str], data_dir: Path, sweep: Path) -> tuple[float, int]:
    """``python train.py -m experiment=<preset>`` with ``launcher`` into ``sweep``: (wall seconds, exit code). Its
    output (the estimate before the run, each job) goes to this process's."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", f"experiment={preset}", f"hydra/launcher={launcher}",
               f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", "trainer.progress=false", *overrides]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - started, finished.returncode


def shown_command(preset: str, launcher: str, overrides: list[str]) -> str:
    return " ".join(["python train.py -m", f"experiment={preset}", f"hydra/launcher={launcher}", *overrides])


def demote(markdown: str, levels: int = 1) -> str:
    """A page's headings ``levels`` down, to sit under this page's sections."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in markdown.splitlines())


def sweep_file(sweep: Path, name: str) -> str | None:
    """The sweep's own page ``name`` as it wrote it, its headings two levels down (under this page's sections)
    and the temporary sweep folder's path said as "the sweep"."""
    path = sweep / name
    return demote(path.read_text().replace(str(sweep), "the sweep"), 2) if path.is_file() else None


def scope(sweep: Path, runs: list[dict]) -> dict:
    """The sizes the runs used, from the first run's recorded configuration."""
    config = next((read_yaml(sweep / r["run"] / ".hydra" / "config.yaml") for r in runs
                   if (sweep / r["run"] / ".hydra" / "config.yaml").is_file()), None) or {}
    data, model, trainer = (config.get(key) or {} for key in ("data", "model", "trainer"))
    return {"data": data.get("name"), "patients": (data.get("phantom") or {}).get("num_patients"),
            "image_size": data.get("image_size"), "spacing": data.get("spacing"),
            "slices_per_volume": data.get("max_slices_per_volume"), "depth": model.get("depth"),
            "up": model.get("up"), "epochs": trainer.get("epochs"), "batch_size": trainer.get("batch_size"),
            "device": next((r.get("device") for r in runs if r.get("device")), None)}


def scope_line(sizes: dict, runs: int) -> str:
    data = ("the built-in **synthetic phantom**" if sizes["data"] == "phantom" else f"data={sizes['data']}")
    return (f"**Scope**: {data} ({sizes['patients']} patients, {sizes['image_size']}x{sizes['image_size']} px at "
            f"{sizes['spacing']} mm, {sizes['slices_per_volume']} slices per volume), trained on "
            f"**{sizes['device'] or 'cpu'}**: U-Net depth {sizes['depth']} ({sizes['up']}), {sizes['epochs']} "
            f"epoch{'s' if sizes['epochs'] != 1 else ''}, "
            f"batch {sizes['batch_size']}; {runs} runs. The figures are about this phantom at these sizes, not about "
            f"the papers' data.")


def arms(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Each arm (the runs that share ``keys`` of their setting): {"arm": {...}, "finished": n ok, "total": n,
    "statuses": {status: n}}, in order."""
    grouped: dict[tuple, list[dict]] = collections.defaultdict(list)
    for run in runs:
        grouped[tuple(str(run["setting"].get(k)) for k in keys)].append(run)
    return [{"arm": dict(zip(keys, key)), "finished": sum(r.get("status") == "ok" for r in members),
             "total": len(members), "statuses": dict(collections.Counter(str(r.get("status")) for r in members))}
            for key, members in sorted(grouped.items())]


def arms_table(counted: list[dict], keys: tuple[str, ...]) -> str:
    from harness import markdown_table

    return markdown_table([*keys, "finished / total", "statuses"],
                          [[*(a["arm"][k] for k in keys), f"{a['finished']} / {a['total']}",
                            ", ".join(f"{n} {s}" for s, n in sorted(a["statuses"].items()))] for a in counted])


def chosen_dice(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Per value of ``keys``: the test Dice of the runs chosen on validation (each setting's rate chosen by
    ``select_by_validation``, as the sweep's paper_table does), their mean, sample std and count, and the rates
    chosen."""
    grouped: dict[tuple, list[dict]] = collections.defaultdict(list)
    for entry in select_by_validation(runs):
        grouped[tuple(str(entry["setting"].get(k)) for k in keys)].append(entry)
    rows = []
    for key, members in sorted(grouped.items()):
        dice = [m["dice"] for m in members if m.get("status") == "ok" and isinstance(m.get("dice"), (int, float))]
        rows.append({**dict(zip(keys, key)), "mean": round(statistics.fmean(dice), 3) if dice else None,
                     "std": round(statistics.stdev(dice), 3) if len(dice) > 1 else None, "n": len(dice),
                     "of": len(members), "chosen_lr": sorted({str(m.get("chosen_lr")) for m in members})})
    return rows


def copy_plots(sweep: Path, folder: Path) -> list[str]:
    """The sweep's plots copied into ``folder`` (emptied of earlier PNGs first); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    copied = []
    for name in PLOTS:
        if (sweep / name).is_file():
            shutil.copyfile(sweep / name, folder / name)
            copied.append(name)
    return copied


def plots_section(folder_name: str, copied: list[str]) -> str:
    if not copied:
        return "## Plots\n\nThe sweep wrote no plot (matplotlib is in the `study` extra).\n"
    return "## Plots\n\n" + "\n\n".join(f"![{name[:-4]}]({folder_name}/{name})" for name in copied) + "\n"


def page_paths(name: str, out: Path | None) -> tuple[Path, Path, Path]:
    """The page, its JSON and its plots' folder: docs/results/<name>.md, .json, <name>/ (or beside ``out``)."""
    from harness import RESULTS

    page = Path(out) if out is not None else RESULTS / f"{name}.md"
    return page, page.with_suffix(".json"), page.with_suffix("")


def read_sweep(sweep: Path) -> list[dict]:
    return read_runs(sweep)


def write_headline(path: Path, figures: dict) -> Path:
    """The page's headline figures as JSON (stamped as a result page), for the README's test."""
    written = write_json(path, figures)
    print(f"written: {written}")
    return written


def wall_line(wall: float, code: int, runs: list[dict], launcher: str) -> str:
    statuses = collections.Counter(str(r.get("status")) for r in runs)
    return (f"Sweep wall time **{wall / 60:.1f} min** (launcher `{launcher}`), exit code {code}; runs: "
            + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ".")


def launcher_note() -> str:
    return ("The verdicts do not depend on the launcher: a stacked run is the plain run's computation up to the "
            "order of float32 sums, and `python scripts/bench_launcher_band.py` measures, at this page's size, "
            "stacked against plain runs next to the band that rounding alone makes (the same plain run with "
            "another thread count or memory layout), with the rates chosen on validation under each "
            "([launcher_band.md](launcher_band.md), docs/stacking.md).")
