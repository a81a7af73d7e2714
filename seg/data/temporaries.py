"""Temporary files and folders named after the process that writes them, and the removal of stale ones.

The phantom generator writes its tree to ``<root>.tmp-<host>-<pid>-<token>`` and the data cache its
files to ``.<name>.tmp-<host>-<pid>-<token>``, then renames them into place. A process killed
before the rename (SIGTERM from Slurm or ``kill``, SIGKILL, a power cut) leaves its temporary
behind -- for the phantom, tens of MB. ``remove_stale`` deletes, at the start of the next run, the
temporaries whose writer is gone: same host, and no process with that pid. A temporary of a live
process (a generator running beside this one) is never touched, nor one written on another host
(its process cannot be checked from here: it is reported, not removed).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from .readers import warn

TEMPORARY = re.compile(r"^(?P<stem>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


def host_name() -> str:
    """This machine's name as it appears in temporary names (only letters, digits, '.', '-' and '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temporary_path(target: Path) -> Path:
    """A new, unique temporary name beside ``target`` that says which process on which host writes it."""
    return target.with_name(f"{target.name}.tmp-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}")


def process_exists(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one of another user counts: it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


def remove_stale(folder: Path, stem: str | None = None) -> list[Path]:
    """Delete the temporaries in ``folder`` (of ``stem`` only, if given) whose process is gone; returns them."""
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return removed
    here = host_name()
    for path in entries:
        match = TEMPORARY.match(path.name)
        if match is None or (stem is not None and match["stem"] != stem):
            continue
        if match["host"] != here:
            continue  # another machine's process (a shared file system): cannot be checked from here
        if process_exists(int(match["pid"])):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            warn(f"cannot remove the stale temporary {path} ({type(err).__name__}: {err})")
            continue
        print(f"Removed {path}: a temporary left by process {match['pid']}, which is gone")
        removed.append(path)
    return removed
