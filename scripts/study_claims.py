"""The claims preset as a user runs it: ``python train.py -m experiment=claims``, and the verdicts it reaches.

    python scripts/study_claims.py                          # the preset (36 runs), stacked launcher
    python scripts/study_claims.py --launcher basic         # the same sweep, one run after another
    python scripts/study_claims.py -- data.image_size=32    # any overrides of the sweep after --

Runs the sweep in a temporary folder, then writes docs/results/study_claims.md: the scope and the command in
its first lines, the stamp, each arm's finished/total runs, every claim's verdict as the sweep's claims.md
states it (seg/study/claims.py: reproduced, not reproduced, inconclusive or insufficient, with the paired statistics), what
the phantom can and cannot show, the sweep's paper_table.md and comparison.md, and its plots (copied into
docs/results/study_claims/). The verdicts also go to docs/results/study_claims.json, which the README's
figures are checked against (tests/test_study_pages.py).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from harness import write_result
from study_page import (arms, arms_table, chosen_dice, copy_plots, launcher_note, page_arguments, page_paths,
                        plots_section, read_sweep, run_sweep, scope, scope_line, shown_command, sweep_file,
                        wall_line, write_headline)

PRESET = "claims"
FULL_SIZE = ("`python train.py -m experiment=claims hydra/launcher=stacked data.image_size=256 data.spacing=1.5 "
             "data.max_slices_per_volume=null data.phantom.num_patients=100 seed=0,1,2,3,4` on a GPU; on a Slurm "
             "cluster the same with `hydra/launcher=slurm hydra.launcher.partition=<partition>`")
LIMITS = """## What the phantom can and cannot show

The phantom is synthetic: each patient's heart is drawn from a few shape parameters, and its vendors A-D
differ in contrast, intensity scale, noise, bias field and resolution (seg/data/phantom.py). It can show
whether a layer's behaviour that follows from its arithmetic appears at all -- batch statistics from one
image (claims 1-2), a learned mix of instance and layer statistics (claim 3), instance statistics under a
change of intensity scale and contrast (claim 4). It cannot show how large the effects are on cardiac MRI,
whose anatomy, pathology and artefacts vary in ways the phantom does not draw; and at this size (few
patients, few epochs, small images) a difference smaller than the spread between seeds is not detected,
which the verdicts report as inconclusive rather than as a difference.
"""


def verdicts(runs: list[dict]) -> list[dict]:
    """Each claim's verdict as seg/study/claims.py reaches it on the sweep's runs (what its claims.md writes)."""
    if importlib.util.find_spec("scipy") is None:
        return []
    from seg.study.claims import evaluate_claims
    from seg.study.tables import complete_settings, select_by_validation

    _, _, factors = complete_settings(runs)
    return [{"claim": claim.number, "statement": claim.statement, "context": claim.context,
             "verdict": claim.verdict} for claim in evaluate_claims(select_by_validation(runs), factors)]


def main() -> None:
    args = page_arguments(__doc__.splitlines()[0], "study_claims")
    page_path, json_path, plots_dir = page_paths("study_claims", args.out)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        wall, code = run_sweep(PRESET, args.launcher, args.overrides, args.data_dir or Path(tmp) / "data", sweep)
        runs = read_sweep(sweep)
        tables = {name: sweep_file(sweep, name) for name in ("claims.md", "paper_table.md", "comparison.md")}
        if tables["claims.md"] is None:
            raise SystemExit(f"error: the sweep wrote no claims.md (exit code {code}, {len(runs)} runs)")
        copied = copy_plots(sweep, plots_dir)
        sizes = scope(sweep, runs)
    counted = arms(runs, ("claim",))
    reached = verdicts(runs)
    figures = {"preset": PRESET, "launcher": args.launcher, "overrides": args.overrides, "scope": sizes,
               "wall_time_min": round(wall / 60, 1), "exit_code": code,
               "runs": {"finished": sum(a["finished"] for a in counted), "total": len(runs)},
               "claims": reached, "dice": chosen_dice(runs, ("claim",))}
    write_headline(json_path, figures)
    command = shown_command(PRESET, args.launcher, args.overrides)
    about = (f"{scope_line(sizes, len(runs))}\n\nThe sweep: `{command}`. {wall_line(wall, code, runs, args.launcher)} "
             f"The same page at full size: {FULL_SIZE}.")
    summary = "\n".join(f"- claim {c['claim']}" + (f" ({c['context']})" if c["context"] else "")
                        + f": **{c['verdict']}**" for c in reached)
    body = (f"## Runs per arm\n\n{arms_table(counted, ('claim',))}\n"
            f"## Verdicts\n\n{summary or 'See claims.md below.'}\n\nThe same, for a program: "
            f"[{json_path.name}]({json_path.name}). {launcher_note()}\n\n"
            f"## claims.md\n\n{tables['claims.md']}\n\n{LIMITS}\n")
    for name in ("paper_table.md", "comparison.md"):
        body += f"## {name}\n\n" + (tables[name] if tables[name] else "The sweep did not write it.") + "\n\n"
    body += plots_section(plots_dir.name, copied)
    write_result("study_claims", "The claims preset: verdicts on the built-in phantom", body, about, page_path)


if __name__ == "__main__":
    main()
