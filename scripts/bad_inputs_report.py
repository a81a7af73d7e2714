"""Bad configurations and bad data through the real ``train.py``: the exit code and message of each.

    python scripts/bad_inputs_report.py [--out docs/results/bad_inputs.md]

Runs every case of the shared table (scripts/bad_inputs.py: a typo, a wrong type, a value out of
range, a folder that holds another run, a truncated file, mismatched shapes, ...) and writes a
Markdown table of the exit code and the one line the user gets, stamped with this command, the git
commit and the machine. tests/test_reliability.py checks the same table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bad_inputs import CASES, ROOT, run_case
from stamp import stamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bad_inputs.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        for number, case in enumerate(CASES):
            if case.cpu_only and torch.cuda.is_available():
                continue
            outcome = run_case(case, workspace, number)
            text = outcome.message.replace(str(workspace), "<tmp>").replace("|", "\\|")
            traceback = " (with a traceback)" if "Traceback" in outcome.output else ""
            rows.append(f"| {case.name} | {outcome.returncode}{traceback} | {text[:300]} |")
            print(rows[-1], flush=True)
    document = ("# Bad inputs: what train.py answers\n\n"
                "Each case of the shared table (scripts/bad_inputs.py) run through `train.py` on a small ACDC-layout "
                "tree (`<tmp>` is the script's temporary folder). Exit code 1 and one line, no traceback, is the "
                "promise; tests/test_reliability.py checks every case.\n\n" + stamp() + "\n"
                "| case | exit code | message |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
