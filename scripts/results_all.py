"""Every page of docs/results measured again, one after another, in one sitting.

    python scripts/results_all.py              # all pages, in the order below (about 1.5 h on 2 CPU cores)
    python scripts/results_all.py --list       # the commands, without running them
    python scripts/results_all.py --only bench_norms stacked

Each page's own command runs in turn (the same command its stamp names), so a page regenerated here
and one regenerated alone are the same. The machine should be quiet: other work on the same cores
changes the timings and, through the order of floating-point sums, can change a trained run. The
load average is checked before the first command and a start at 1.0 or more is refused
(``--anyway`` starts regardless; each page stamps the load it started at either way). Between pages
the sitting waits (up to 5 minutes) for the previous page's own load to fall below 1.0 again, so
that each page starts on a quiet machine too. A command that fails stops the sitting with its exit
code; the pages written before it stay.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# page -> its command; the layer and step benchmarks first (seconds to minutes), the sweeps last
PAGES = {
    "bench_norms": ["scripts/bench_norms.py"],
    "profile_step": ["scripts/profile_step.py"],
    "bench_train_step": ["scripts/bench_train_step.py"],
    "bench_augment": ["scripts/bench_augment.py"],
    "bench": ["scripts/bench.py"],
    "stacked": ["scripts/bench_stacked.py", "--runs", "1", "4", "8", "16", "--rounds", "3", "--paper-runs", "0"],
    "bench_prepare": ["scripts/bench_prepare.py"],
    "bench_default_run": ["scripts/bench_default_run.py"],
    "soak_resume": ["scripts/bench_resume.py", "--trials", "20"],
    "bad_inputs": ["scripts/bad_inputs_report.py"],
    "study_iln": ["scripts/study_iln.py"],
    "study_claims": ["scripts/study_claims.py"],
    "launcher_band": ["scripts/bench_launcher_band.py"],
}
QUIET = 1.0  # the 1-minute load average below which the machine counts as quiet
SETTLE_S = 300  # the longest wait between pages for the load to fall below QUIET


def settle(limit: float = SETTLE_S) -> float:
    """Wait until the 1-minute load average is below QUIET (at most ``limit`` seconds); the load then."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= QUIET and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(PAGES), help="these pages only, in the order above")
    parser.add_argument("--list", action="store_true", help="print the commands and stop")
    parser.add_argument("--anyway", action="store_true", help="start even when the machine is not quiet")
    args = parser.parse_args(argv)
    chosen = [name for name in PAGES if not args.only or name in args.only]
    if args.list:
        for name in chosen:
            print(f"{name}: python {' '.join(PAGES[name])}")
        return 0
    load = os.getloadavg()[0]
    if load >= QUIET and not args.anyway:
        print(f"error: the load average is {load:.2f} (1 minute); the pages want a quiet machine (below {QUIET}). "
              "Wait, or pass --anyway (each page stamps its load).", file=sys.stderr)
        return 2
    started = time.monotonic()
    for index, name in enumerate(chosen):
        command = [sys.executable, *PAGES[name]]
        load = settle() if index else load
        print(f"== {name}: python {' '.join(PAGES[name])} (load {load:.2f})", flush=True)
        begun = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        print(f"== {name}: exit {code} after {(time.monotonic() - begun) / 60:.1f} min", flush=True)
        if code != 0:
            print(f"error: {name} failed (exit {code}); the pages before it were written", file=sys.stderr)
            return code
    print(f"== all {len(chosen)} pages in {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
