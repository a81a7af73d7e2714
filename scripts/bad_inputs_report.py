"""Bad configurations, data and checkpoints through the real ``train.py``, ``seg-predict`` and ``seg-export``: the
exit code and message of each.

    python scripts/bad_inputs_report.py             # writes docs/results/bad_inputs.md

Runs every case of the shared table (scripts/bad_inputs.py: a typo, a wrong type, a value out of
range, a key added with + or removed with ~, a folder that holds another run, a truncated file, mismatched
shapes, a checkpoint with NaN weights, an ensemble of sweep jobs, ...) and writes, through
the harness, a Markdown table of the exit code and the one line the user gets, stamped with this
command, the git commit and the machine. tests/test_reliability.py checks the same table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bad_inputs import CASES, run_case
from harness import markdown_table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        for number, case in enumerate(CASES):
            if case.cpu_only and torch.cuda.is_available():
                continue
            outcome = run_case(case, workspace, number)
            text = outcome.message.replace(str(workspace), "<tmp>")
            traceback = " (with a traceback)" if "Traceback" in outcome.output else ""
            rows.append([case.name, f"{outcome.returncode}{traceback}", text[:300]])
            print(f"{case.name}: {rows[-1][1]}: {rows[-1][2]}", flush=True)
    about = ("Each case of the shared table (scripts/bad_inputs.py) run through `train.py`, or the tool it names "
             "(`python -m seg.tools.<tool>`), on a small ACDC-layout tree and a smoke run trained on it (`<tmp>` is "
             "the benchmark's temporary folder). A refused input: exit code 1 and one line `error: ...`, no "
             "traceback; one the tool goes on with: exit code 0 and the line shown (a `warning:`, or its result). "
             "tests/test_reliability.py checks every case.")
    write_result("bad_inputs", "Bad inputs: what train.py answers",
                 markdown_table(["case", "exit code", "message"], rows), about, args.out)


if __name__ == "__main__":
    main()
