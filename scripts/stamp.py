"""The stamp of a figure written by a script: the command that produced it, the git commit and the machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """This script's command line, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + " ".join(shlex.quote(str(a)) for a in [shown, *sys.argv[1:]])


def stamp() -> str:
    """Markdown lines: command, commit (and whether the tree had uncommitted changes), machine."""
    import torch

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    cpu = platform.processor() or platform.machine()
    machine = (f"{cpu}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
               f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")
    return (f"- command: `{command_line()}`\n- commit: `{commit or 'unknown'}`"
            f"{' (with uncommitted changes)' if dirty else ''}\n- machine: {machine}\n")
