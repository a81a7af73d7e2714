"""The ILN paper's comparison on the built-in phantom, sized for a CPU: the sweep run, and its page written.

    python scripts/study_iln.py                                   # experiment=study_iln_cpu, stacked launcher
    python scripts/study_iln.py --launcher basic                  # the same sweep, one run after another
    python scripts/study_iln.py -- data.image_size=32 seed=0      # any overrides of the sweep after --

Runs ``python train.py -m experiment=study_iln_cpu`` (bn, in, ln, gn, bin, iln x RV, LV x 3 rates of the paper's
grid x 3 seeds; each norm's rate chosen on validation) in a temporary folder, then writes
docs/results/study_iln.md: the scope and the command in its first lines, the stamp, each arm's finished/total
runs, the headline (each layer's test Dice at its rate chosen on validation, per task), the sweep's own
paper_table.md and comparison.md (paired tests) and claims.md, and its plots, copied into
docs/results/study_iln/. The headline also goes to docs/results/study_iln.json, which the README's figures
are checked against (tests/test_study_pages.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness import markdown_table, write_result
from study_page import (arms, arms_table, chosen_dice, copy_plots, launcher_note, page_arguments, page_paths,
                        plots_section, read_sweep, run_sweep, scope, scope_line, shown_command, sweep_file,
                        wall_line, write_headline)

PRESET = "study_iln_cpu"
FULL_SIZE = ("`python train.py -m experiment=iln_paper hydra/launcher=stacked` (the paper's grid and network at "
             "256 px, 360 runs) on a GPU; on a Slurm cluster `python train.py -m experiment=iln_paper "
             "hydra/launcher=slurm hydra.launcher.partition=<partition>`; on ACDC add `data=acdc "
             "data.root=/path/to/ACDC/database`")


def headline_table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows})
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    cell = {(r["norm"], r["task"]): r for r in rows}

    def show(row: dict | None) -> str:
        if row is None or row["mean"] is None:
            return "no finished run" if row is not None else "—"
        spread = f" ± {row['std']:.3f}" if row["std"] is not None else ""
        return f"{row['mean']:.3f}{spread} ({row['n']}/{row['of']}; lr {', '.join(row['chosen_lr'])})"

    return markdown_table(["norm", *(f"{t} test Dice" for t in tasks)],
                          [[n, *(show(cell.get((n, t))) for t in tasks)] for n in norms])


def best_per_task(rows: list[dict]) -> dict:
    best = {}
    for task in sorted({r["task"] for r in rows}):
        scored = [r for r in rows if r["task"] == task and r["mean"] is not None and r["n"] == r["of"]]
        if scored:
            top = max(scored, key=lambda r: r["mean"])
            best[task] = {"norm": top["norm"], "mean": top["mean"], "std": top["std"]}
    return best


def main() -> None:
    args = page_arguments(__doc__.splitlines()[0], "study_iln")
    page_path, json_path, plots_dir = page_paths("study_iln", args.out)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        wall, code = run_sweep(PRESET, args.launcher, args.overrides, args.data_dir or Path(tmp) / "data", sweep)
        runs = read_sweep(sweep)
        if not runs:
            raise SystemExit(f"error: the sweep wrote no run (exit code {code})")
        tables = {name: sweep_file(sweep, name) for name in ("paper_table.md", "comparison.md", "claims.md")}
        copied = copy_plots(sweep, plots_dir)
        sizes = scope(sweep, runs)
    counted = arms(runs, ("norm", "task"))
    rows = chosen_dice(runs, ("norm", "task"))
    figures = {"preset": PRESET, "launcher": args.launcher, "overrides": args.overrides, "scope": sizes,
               "wall_time_min": round(wall / 60, 1), "exit_code": code,
               "runs": {"finished": sum(a["finished"] for a in counted), "total": len(runs)},
               "dice": rows, "best": best_per_task(rows)}
    write_headline(json_path, figures)
    command = shown_command(PRESET, args.launcher, args.overrides)
    about = (f"{scope_line(sizes, len(runs))}\n\nThe sweep: `{command}`. {wall_line(wall, code, runs, args.launcher)} "
             f"The same page at full size: {FULL_SIZE}.")
    body = (f"## Runs per arm\n\n{arms_table(counted, ('norm', 'task'))}\n"
            f"## Headline: each layer at its learning rate chosen on validation\n\n"
            f"Test Dice, mean ± sample std over the seeds (finished runs / runs; the rates chosen). The same "
            f"figures, for a program: [{json_path.name}]({json_path.name}).\n\n{headline_table(rows)}\n"
            f"{launcher_note()}\n\n")
    for name, title in (("paper_table.md", "The study's table (paper_table.md)"),
                        ("comparison.md", "Paired comparison (comparison.md)"), ("claims.md", "Claims (claims.md)")):
        body += f"## {title}\n\n" + (tables[name] if tables[name] else "The sweep did not write it.") + "\n\n"
    body += plots_section(plots_dir.name, copied)
    write_result("study_iln", "The ILN paper's comparison on the synthetic phantom (CPU size)", body, about, page_path)


if __name__ == "__main__":
    main()
