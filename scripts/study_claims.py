"""The claims preset as a user runs it: ``python train.py -m experiment=claims``, and the verdicts it reaches.

    python scripts/study_claims.py                          # the preset (36 runs; about 30 min on 2 CPU cores)
    python scripts/study_claims.py -- data.image_size=32    # any overrides of the sweep after --

Runs the sweep in a temporary folder, then writes its claims.md (each claim reproduced, not reproduced
or inconclusive or insufficient, with the paired statistics) and paper_table.md (Dice per arm, mean ± std over the
seeds), with the sweep's wall time and its runs' statuses, to docs/results/study_claims.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, write_result


def demote(markdown: str) -> str:
    """A page's headings one level down, to sit under this page's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default: a fresh one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        data_dir = args.data_dir or Path(tmp) / "data"
        command = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=claims", f"paths.data_dir={data_dir}",
                   f"hydra.sweep.dir={sweep}", "trainer.progress=false", *args.overrides]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - started
        statuses = collections.Counter(json.loads(path.read_text()).get("status", "?")
                                       for path in sweep.glob("*/metrics.json"))
        pages = {name: (sweep / name).read_text() if (sweep / name).exists() else None
                 for name in ("claims.md", "paper_table.md")}
    if pages["claims.md"] is None:
        sys.exit(f"error: the sweep wrote no claims.md (exit code {finished.returncode})")
    shown = " ".join(["python train.py -m experiment=claims", *args.overrides])
    about = (f"`{shown}`: the sweep's claims.md and paper_table.md as it wrote them. Sweep wall time "
             f"{wall / 60:.1f} min, exit code {finished.returncode}; runs: "
             + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) + ".")
    body = "## claims.md\n\n" + demote(pages["claims.md"])
    if pages["paper_table.md"]:
        body += "\n\n## paper_table.md\n\n" + demote(pages["paper_table.md"])
    write_result("study_claims", "The claims preset: verdicts on the built-in phantom", body, about, args.out)


if __name__ == "__main__":
    main()
