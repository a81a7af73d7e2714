"""Temporary files and folders: named after the process that writes them, renamed into place, and removed
when their writer is gone.

Every writer of the project -- checkpoints, metrics.json, the data cache, the built-in phantom, predicted
label maps, ONNX exports -- writes to ``temporary_path(target)``, ``<name>.tmp-<host>-<pid>-<token>``
beside the target (``hidden=True`` puts a dot in front; ``keep_suffix`` keeps an extension such as
``.nii.gz`` last, for writers that choose the format by it), then renames it over the target. A kill at
any moment leaves the previous file or the new one under the real name, never half a file.

A process killed before its rename (SIGTERM from Slurm or ``kill``, SIGKILL, a power cut) leaves its
temporary behind -- for the phantom, tens of MB. ``remove_stale`` deletes, at the start of the next run,
the temporaries whose writer is gone: same host, and no process with that pid. A temporary of a live
process (a generator running beside this one) is never touched, nor one written on another host (its
process cannot be checked from here: it is reported, not removed). A caller that holds the lock every
writer of a folder takes (a run folder, seg.runtime.runs) passes ``writers_gone=True``: there, every temporary
is stale.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path

TEMPORARY = re.compile(r"^(?P<stem>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})"
                       r"(?P<suffix>(?:\.[A-Za-z0-9]+)*)$")
ANY_TEMPORARY = re.compile(r"\.tmp(-|$)")  # any name a writer's temporary may have had


def host_name() -> str:
    """This machine's name as it appears in temporary names (only letters, digits, '.', '-' and '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temporary_path(target: Path, *, hidden: bool = False, keep_suffix: str = "") -> Path:
    """A new, unique temporary name beside ``target`` that says which process on which host writes it."""
    name = target.name
    if keep_suffix and name.endswith(keep_suffix):
        name = name[:-len(keep_suffix)]
    prefix = "." if hidden and not name.startswith(".") else ""
    return target.with_name(f"{prefix}{name}.tmp-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}{keep_suffix}")


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


def remove_stale(folder: Path, stem: str | None = None, *, writers_gone: bool = False) -> list[Path]:
    """Delete the temporaries in ``folder`` (of ``stem`` only, if given) whose process is gone -- with
    ``writers_gone``, every temporary there -- and return them; each removal is printed."""
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return removed
    here = host_name()
    for path in entries:
        match = TEMPORARY.match(path.name)
        if match is not None and stem is not None and match["stem"] != stem:
            continue
        if writers_gone and (match is not None or (stem is None and ANY_TEMPORARY.search(path.name))):
            why = "a temporary left by a process that ended while writing it"
        elif match is None or match["host"] != here:
            continue  # not a temporary, or another machine's process (a shared file system): cannot be checked
        elif process_exists(int(match["pid"])):
            continue
        else:
            why = f"a temporary left by process {match['pid']}, which is gone"
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            print(f"warning: cannot remove the stale temporary {path} ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)
            continue
        print(f"Removed {path}: {why}", flush=True)
        removed.append(path)
    return removed
