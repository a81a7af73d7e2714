"""The benchmarks' shared harness: the stamp of every measured figure, and the page it is written to.

Every benchmark of this folder (``python scripts/<name>.py``) writes its figures through
``write_result``: ``docs/results/<name>.md``, a title and what was measured, then the stamp -- the
command that produced it, the git commit (and ``dirty`` when the tree had uncommitted changes), the
machine (CPU model and cores, RAM, the GPU if any) and its load average when the page was written,
torch's version and the date -- and then the tables. No figure is typed by hand. ``interleaved_times`` is the timing loop of the benchmarks that
compare candidates (each round times every candidate once, so a drift of the machine affects all
alike), ``markdown_table`` their tables, ``write_json`` the same figures for a program to read
(``--json``), and ``sgd_options`` the optimizer they train with.

The benchmarks import this module as ``harness`` (Python puts a script's own folder first on its
path); the tests find it the same way (pyproject.toml's pytest ``pythonpath``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def command_line() -> str:
    """This process's command line, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + " ".join(shlex.quote(str(a)) for a in [shown, *sys.argv[1:]])


def git_commit() -> str:
    """The commit the measured code is at, with ``(dirty)`` when tracked files had uncommitted changes (the
    result pages themselves excepted: a sitting that regenerates them one after another measures one commit)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/results")
    return f"{commit} (dirty)" if dirty else commit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """The machine's RAM in GiB (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> str:
    """CPU model and cores (and torch's threads), RAM, the GPUs if any, the OS and Python."""
    ram = memory_gib()
    parts = [f"{cpu_model()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads)",
             f"{ram:.0f} GiB RAM" if ram is not None else "RAM unknown"]
    if torch.cuda.is_available():
        parts.append(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        parts.append("no GPU")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return "; ".join(parts)


def load() -> str:
    """The machine's load now: the mean number of runnable processes over the last 1, 5 and 15 minutes,
    against its cores (other work on a shared machine slows every timing alike)."""
    try:
        one, five, fifteen = os.getloadavg()
    except (OSError, AttributeError):
        return "unknown"
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 minutes) on {os.cpu_count()} cores"


# The commit the benchmark started at: one that runs for an hour must not be stamped with a commit made
# while it ran (the code it measured is the code it imported).
STARTED_AT = git_commit()
# The load when the benchmark started (a quiet machine is one whose load is below 1 then), and when it wrote.
LOAD_AT_START = load()


def loads() -> str:
    """'<load at the start> at the start; <load now> when written'."""
    return f"{LOAD_AT_START} at the start; {load()} when written"


def stamp() -> str:
    """Markdown lines: command, commit (when the benchmark started), machine, its load, torch's version, date."""
    return (f"- command: `{command_line()}`\n- commit: `{STARTED_AT}`\n- machine: {machine()}\n"
            f"- load average: {loads()}\n- torch: {torch.__version__}\n- date: {datetime.date.today().isoformat()}\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (cells as given, ``|`` escaped)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]) + "\n"


def write_result(name: str, title: str, body: str, about: str = "", out: Path | None = None) -> Path:
    """Write the result page ``docs/results/<name>.md`` (or ``out``): ``title``, ``about`` (what was measured),
    the stamp, then ``body`` (the tables). Returns its path."""
    path = Path(out) if out is not None else RESULTS / f"{name}.md"
    page = f"# {title}\n\n" + (f"{about.strip()}\n\n" if about.strip() else "") + stamp() + "\n" + body.strip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    print(f"written: {path}")
    return path


def write_json(path: Path, figures: dict) -> Path:
    """Write ``figures`` (a benchmark's measured values, for a program to read: gpu_check.py's report) to
    ``path`` as JSON, under the same stamp as a result page: {"stamp": {...}, "figures": figures}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"stamp": {"command": command_line(), "commit": STARTED_AT, "machine": machine(), "load": loads(),
                         "torch": torch.__version__, "date": datetime.date.today().isoformat()},
               "figures": figures}
    with open(path, "w") as file:
        json.dump(stamped, file, indent=1, default=str)
    return path


def interleaved_times(steps: dict[str, Callable[[], object]], rounds: int, repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every candidate in each round; the candidates take turns within a round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def sgd_options(lr: float = 0.01, momentum: float = 0.9):
    """The ``optim`` node the training benchmarks give seg.training.optimizers.build_optimizer: SGD with momentum."""
    return OmegaConf.create({"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": 0.0, "nesterov": False,
                             "grad_clip": None})
