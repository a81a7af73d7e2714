"""Checkpoints: written atomically, loaded without running pickled code, refused when they don't fit.

A checkpoint holds everything needed to continue a run exactly where it stopped: model,
optimizer, schedule, the position in the epoch (its shuffled order and the next batch), the
random generators of torch, numpy, Python and the trainer, and the run's configuration.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

FORMAT_VERSION = 1
# configuration keys that must agree between a checkpoint and the run that resumes or loads it
MUST_MATCH = ("model", "norm", "data.task", "data.image_size")
# options under those that do not change the weights: where they came from, and norm.sync (a run
# resumed on another number of processes may switch it)
RUNTIME_ONLY = ("init_from", "sync")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or used; the message says which and why."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a partial file. If
    writing fails (a full disk), the temporary file is removed and the previous checkpoint stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; "
                              f"the previous checkpoint, if any, is intact") from None
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without running pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # truncated, not a checkpoint, or holding objects weights_only refuses
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {err}") from None


def check_compatible(saved_config: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint whose model, norm or task differs from this run's, listing the differences."""

    def select(tree, dotted):
        for part in dotted.split("."):
            tree = tree.get(part, {}) if isinstance(tree, dict) else None
        return tree

    differences = []
    for key in MUST_MATCH:
        old, new = select(saved_config, key), select(config, key)
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if sub not in RUNTIME_ONLY and old.get(sub) != new.get(sub):
                    differences.append(f"{key}.{sub}: checkpoint {old.get(sub)!r}, this run {new.get(sub)!r}")
        elif old != new:
            differences.append(f"{key}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise CheckpointError(f"checkpoint {path} is from a different model: " + "; ".join(differences))


def rng_states() -> dict:
    """The global random generators' states, in types that ``weights_only`` loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                      has_gauss, cached],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_checkpoint(resume, output_dir: Path) -> Path | None:
    """The checkpoint that ``trainer.resume`` designates, or None for a fresh run.

    ``true``: ``last.pt`` of this run folder, else of the most recent earlier run folder beside
    it started with the same overrides (so re-running the same command continues it; only when
    Hydra chose the folder, not when the command named it with hydra.run.dir), else
    nothing: the run starts fresh (a sweep re-run with resume=true starts the jobs that never
    ran). A path: that checkpoint file, or the ``last.pt`` of that run folder; it must exist.
    """
    if resume in (None, False, "false", "False", ""):
        return None
    if resume is True or resume in ("true", "True"):
        own = output_dir / "checkpoints" / "last.pt"
        if own.is_file():
            return own
        overrides = run_overrides(output_dir)
        earlier = []
        if not named_run_dir(output_dir):  # a folder the user named is the run: never borrow a neighbour's
            earlier = [p for p in output_dir.parent.glob("*/checkpoints/last.pt")
                       if p.parents[1] != output_dir and run_overrides(p.parents[1]) == overrides]
        if not earlier:  # e.g. a job of a re-run sweep that never started before: start it
            print(f"trainer.resume=true: no checkpoint of this run yet (none in {output_dir} nor in an earlier run "
                  f"folder beside it with the same overrides); starting fresh")
            return None
        return max(earlier, key=lambda p: p.stat().st_mtime)
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints").is_dir() else path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"trainer.resume={resume}: no checkpoint at {path}")
    return path


def named_run_dir(run_dir: Path) -> bool:
    """Whether the run's folder was given on the command line (hydra.run.dir / hydra.sweep.dir)."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["overrides"]["hydra"]
    except (OSError, KeyError, TypeError):
        return False
    return any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides or [])


def run_overrides(run_dir: Path) -> list[str] | None:
    """A run folder's command-line overrides (from Hydra's record), without the resume switch."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except OSError:
        return None
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(("trainer.resume", "hydra.")))


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before training when the output folder's disk cannot hold the run's checkpoints."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise CheckpointError(f"only {free / 2**20:.0f} MiB free on the disk of {folder}; this run's checkpoints "
                              f"need about {needed_bytes / 2**20:.0f} MiB")
