"""Launchers do not change answers: stacked against plain runs, held against the band that float rounding alone makes.

    python scripts/bench_launcher_band.py                      # the ILN study's CPU size (experiment=study_iln_cpu),
                                                               # 2 norms x RV x its rates x 2 seeds
    python scripts/bench_launcher_band.py -- norm=bn,gn,iln seed=0,1,2   # overrides of the sweep after --
    python scripts/bench_launcher_band.py --smoke --out /tmp/band.md     # a tiny grid: checks that it runs

A stacked run (``hydra/launcher=stacked``, docs/stacking.md) is the same computation as the run alone, up to
the order of float32 sums; so is the same plain run with another number of threads, or with contiguous
instead of channels-last tensors (other convolution kernels). At batch 1 and a high rate such rounding grows
over training, and two runs that differ only in it can end a few hundredths of Dice apart. This benchmark
runs one grid four times, as real ``python train.py -m`` sweeps (the same data folder):

- plain: Hydra's basic launcher, the default memory layout (channels-last), ``--threads`` threads;
- threads: the same, with another number of threads (1, or 2 when plain runs on 1)  -- rounding only;
- contiguous: the same, with ``trainer.channels_last=false``                      -- rounding only;
- stacked: ``hydra/launcher=stacked``, otherwise as plain.

For each run it reports the test Dice of plain and |ΔDice| of every other sweep against it; for each
setting but the learning rate, the rate chosen on validation (``seg.study.tables.select_by_validation``, as
the study's tables choose it) and whether another sweep chose another. The rounding-only band is the larger
max |ΔDice| of ``threads`` and ``contiguous``; stacked is within it or not. The figures come from this run only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, markdown_table, write_result
from seg.study.runs import read_runs
from seg.study.tables import select_by_validation

STUDY = ["experiment=study_iln_cpu", "norm=bn,iln", "data.task=rv", "seed=0,1"]
SMOKE = ["experiment=smoke", "data.image_size=32", "data.phantom.num_patients=6", "model.depth=2",
         "trainer.batch_size=1", "norm=bn,iln", "lr=0.5,0.1", "seed=0"]
ARMS = ("plain", "threads", "contiguous", "stacked")
ROUNDING = ("threads", "contiguous")
IGNORED = ("channels_last",)  # an arm's own override is not part of a run's identity here


def arm_command(arm: str, grid: list[str], data_dir: Path, sweep: Path) -> list[str]:
    launcher = "hydra/launcher=stacked" if arm == "stacked" else "hydra/launcher=basic"
    extra = ["trainer.channels_last=false"] if arm == "contiguous" else []
    return [sys.executable, str(ROOT / "train.py"), "-m", launcher, *grid, *extra, f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}", "trainer.progress=false", "trainer.save_checkpoints=false",
            "hydra.callbacks.estimate.enabled=false"]


def arm_threads(arm: str, threads: int) -> int:
    return (1 if threads > 1 else 2) if arm == "threads" else threads


def run_arms(grid: list[str], data_dir: Path, work: Path, threads: int, arms=ARMS, quiet: bool = False) -> dict:
    """Each arm's sweep of ``grid`` in ``work/<arm>``: {arm: (runs as seg.study.runs.read_runs reads them,
    wall seconds, exit code)}."""
    found = {}
    for arm in arms:
        sweep = work / arm
        env = {**os.environ, "OMP_NUM_THREADS": str(arm_threads(arm, threads)), "PYTHONUNBUFFERED": "1",
               "HYDRA_FULL_ERROR": "0"}
        started = time.perf_counter()
        result = subprocess.run(arm_command(arm, grid, data_dir, sweep), cwd=ROOT, env=env,
                                capture_output=quiet, text=True)
        found[arm] = (read_runs(sweep), time.perf_counter() - started, result.returncode)
        if quiet and result.returncode:
            print(result.stdout[-4000:], result.stderr[-4000:], file=sys.stderr)
    return found


def identity(setting: dict, without: tuple = ()) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in setting.items()
                        if k not in without and not any(word in k for word in IGNORED)))


def compare(found: dict) -> dict:
    """{"runs": rows (setting, plain's Dice, |ΔDice| per other arm or a status), "max": {arm: max |ΔDice|},
    "choices": rows (setting, rate chosen per arm), "flips": {arm: how many choices differ from plain},
    "band": the rounding-only band, "within": whether stacked's max is within it}."""
    runs = {arm: {identity(r["setting"]): r for r in rs} for arm, (rs, _, _) in found.items()}
    plain = runs["plain"]
    others = [arm for arm in runs if arm != "plain"]
    rows, largest = [], {arm: 0.0 for arm in others}
    missing = {arm: 0 for arm in others}
    for key, base in sorted(plain.items()):
        row = {"setting": dict(key), "plain": base.get("dice") if base.get("status") == "ok" else base.get("status")}
        for arm in others:
            other = runs[arm].get(key)
            if base.get("status") == "ok" and other is not None and other.get("status") == "ok":
                delta = abs(other["dice"] - base["dice"])
                row[arm] = delta
                largest[arm] = max(largest[arm], delta)
            else:
                row[arm] = "missing" if other is None else str(other.get("status"))
                missing[arm] += row[arm] != str(base.get("status"))
        rows.append(row)
    chosen = {arm: {identity(s["setting"], ("lr",)): s.get("chosen_lr") for s in select_by_validation(rs)}
              for arm, (rs, _, _) in found.items()}
    choices = [{"setting": dict(key), **{arm: chosen[arm].get(key) for arm in chosen}}
               for key in sorted(chosen["plain"])]
    flips = {arm: sum(c[arm] != c["plain"] for c in choices) for arm in others}
    band = max((largest[arm] for arm in ROUNDING if arm in largest), default=0.0)
    stacked = largest.get("stacked")
    return {"runs": rows, "max": largest, "missing": missing, "choices": choices, "flips": flips, "band": band,
            "within": None if stacked is None else stacked <= band and not missing.get("stacked")}


def cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def page(found: dict, result: dict, grid: list[str], threads: int) -> tuple[str, str]:
    setting_keys = [k for k in result["runs"][0]["setting"]] if result["runs"] else []
    varying = [k for k in setting_keys if len({str(r["setting"][k]) for r in result["runs"]}) > 1] or setting_keys
    others = [arm for arm in found if arm != "plain"]
    summary = markdown_table(
        ["sweep", "what differs from plain", "runs (ok / all)", "wall time", "max |ΔDice| vs plain",
         "runs whose status differs", "rates chosen on validation that differ from plain"],
        [[arm, {"plain": "—", "threads": f"OMP_NUM_THREADS={arm_threads('threads', threads)} (plain: {threads})",
                "contiguous": "trainer.channels_last=false", "stacked": "hydra/launcher=stacked"}[arm],
          f"{sum(r.get('status') == 'ok' for r in found[arm][0])} / {len(found[arm][0])}",
          f"{found[arm][1] / 60:.1f} min (exit {found[arm][2]})",
          "—" if arm == "plain" else cell(result["max"][arm]), "—" if arm == "plain" else result["missing"][arm],
          "—" if arm == "plain" else f"{result['flips'][arm]} of {len(result['choices'])}"] for arm in found])
    within = {True: "**within** it", False: "**outside** it", None: "not measured"}[result["within"]]
    verdict = (f"Rounding-only band (the larger max |ΔDice| of {' and '.join(ROUNDING)}): "
               f"**{result['band']:.4f}**. Stacked against plain: **{cell(result['max'].get('stacked', '—'))}**, "
               f"{within}. Rates chosen on validation that differ from plain: "
               + ", ".join(f"{arm} {result['flips'][arm]} of {len(result['choices'])}" for arm in others) + ".")
    per_run = markdown_table([*varying, "plain Dice", *(f"|ΔDice| {arm}" for arm in others)],
                             [[r["setting"][k] for k in varying] + [cell(r["plain"])] + [cell(r[a]) for a in others]
                              for r in result["runs"]])
    chosen_keys = [k for k in varying if k != "lr"]
    choices = markdown_table([*chosen_keys, *(f"lr ({arm})" for arm in found)],
                             [[c["setting"].get(k) for k in chosen_keys] + [c[arm] for arm in found]
                              for c in result["choices"]])
    body = (f"## Summary\n\n{verdict}\n\n{summary}\n## Per run: test Dice of plain, |ΔDice| of each other sweep\n\n"
            f"{per_run}\n## The rate chosen on validation, per sweep\n\n{choices}")
    about = (f"`scripts/bench_launcher_band.py`: one grid (`{' '.join(grid)}`) run as four `python train.py -m` "
             f"sweeps -- plain (basic launcher, {threads} threads, channels-last), the same with another thread "
             f"count, the same with contiguous tensors, and `hydra/launcher=stacked` -- and each run's test Dice "
             f"compared with plain's. The first two differences change only the order of float32 sums (the "
             f"rounding-only band); stacked is the same computation up to that order too. {verdict}")
    return about, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2),
                        help="threads of the plain sweep (default: the cores, at most 2)")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid (32 px, 4 runs): checks that it runs")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default: a fresh one)")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("overrides", nargs="*", help="overrides of the sweep (after --)")
    args = parser.parse_args()
    grid = [*(SMOKE if args.smoke else STUDY), *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        found = run_arms(grid, data_dir, Path(tmp), args.threads)
    if not found["plain"][0]:
        sys.exit(f"error: the plain sweep wrote no run (exit code {found['plain'][2]})")
    about, body = page(found, compare(found), grid, args.threads)
    write_result("launcher_band", "Launchers do not change answers: stacked vs plain against the rounding band",
                 body, about, args.out)


if __name__ == "__main__":
    main()
