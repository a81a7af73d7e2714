"""Checkpoints: written atomically, loaded without running pickled code, refused when they don't fit.

``last.pt`` holds everything needed to continue a run exactly where it stopped: model, optimizer,
schedule, the position in the epoch (its shuffled order and the next batch), the random generators
of torch, numpy, Python and the trainer, the run's configuration -- and the weights of its best
validation epoch, so that ``last.pt`` alone is the truth at every instant. ``best.pt`` (the best
epoch's weights and the configuration, for scripts/predict.py) is written after it and rebuilt from
it when a kill came in between or the file was deleted.

A run is continued only by a configuration that defines the same run: only the keys of
seg/identity.py (where and how it runs) may differ from the checkpoint's.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .identity import identity_differences

# 2: last.pt also holds the best epoch's weights (``best_model``) and the scheduler job that wrote it;
# best.pt holds the best epoch's weights and the configuration (what scripts/predict.py needs)
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or used; the message says which and why."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a partial file. If
    writing fails (a full disk), the temporary file is removed and the previous checkpoint stays.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one per process
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as a RuntimeError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; "
                              f"the previous checkpoint, if any, is intact") from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without running pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # truncated, not a checkpoint, or holding objects weights_only refuses
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {err}") from None


def check_compatible(saved_config: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint of a different run: any difference in a key that defines a run (seg/identity.py),
    listed with the checkpoint's value and this run's."""
    differences = identity_differences(saved_config, config)
    if differences:
        raise CheckpointError(f"checkpoint {path} is from a different run: " + "; ".join(differences)
                              + " (only where and how a run runs may change when it is continued: "
                              + "docs/reliability.md)")


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


def resume_request(resume, must_exist: bool = True) -> bool | Path:
    """``trainer.resume`` as False, True, or the checkpoint file it names (a run folder names its
    ``checkpoints/last.pt``); with ``must_exist``, a named checkpoint that is not there is an error."""
    if resume in (None, False, "false", "False", ""):
        return False
    if resume is True or resume in ("true", "True"):
        return True
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints").is_dir() else path / "last.pt"
    if must_exist and not path.is_file():
        raise CheckpointError(f"trainer.resume={resume}: no checkpoint at {path}")
    return path


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<file>``), or None for a file elsewhere."""
    checkpoint = Path(checkpoint).absolute()
    return checkpoint.parents[1] if checkpoint.parent.name == "checkpoints" else None


def best_weights(state: dict, path: Path) -> dict | None:
    """The best epoch's weights that a ``last.pt`` carries (format 2), or, for a format-1 checkpoint, those
    of the ``best.pt`` beside it; None before the first epoch ended."""
    if state.get("format_version", 1) >= 2:
        return state.get("best_model")
    if state["progress"].get("best_epoch") is None:
        return None
    best = path.parent / "best.pt"
    if not best.is_file():
        raise CheckpointError(f"{path} (format 1) does not hold the best epoch's weights and {best} is missing; "
                              f"the run cannot report its test Dice: start it again")
    return load_checkpoint(best)["model"]


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before training when the output folder's disk cannot hold the run's checkpoints."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise CheckpointError(f"only {free / 2**20:.0f} MiB free on the disk of {folder}; this run's checkpoints "
                              f"need about {needed_bytes / 2**20:.0f} MiB")
