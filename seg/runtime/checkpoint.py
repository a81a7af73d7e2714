"""Checkpoints: written atomically, loaded without running pickled code, refused when they don't fit.

``last.pt`` holds everything needed to continue a run exactly where it stopped: model, optimizer,
schedule, where the run stands (``RunState``: the epoch, its shuffled order and the next batch, the
step, the history, the best epoch so far, the training time), the random generators of torch, numpy,
Python and the trainer, the run's configuration -- and the weights of its best validation epoch, so
that ``last.pt`` alone is the truth at every instant (``last_record``, ``restore_run``). ``best.pt``
(the best epoch's weights and the configuration, for seg-predict) is written after it and rebuilt
from it when a kill came in between or the file was deleted (``repair_best``).

A run is continued only by a configuration that defines the same run: only the keys of
seg/config/identity.py (where and how it runs) may differ from the checkpoint's.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..config.identity import identity_differences
from .temporaries import temporary_path

# 2: last.pt also holds the best epoch's weights (``best_model``) and the scheduler job that wrote it;
# best.pt holds the best epoch's weights and the configuration (what seg-predict needs)
# 3: the run's position is saved as ``run_state`` (formats 1 and 2 called it ``progress``)
FORMAT_VERSION = 3


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or used; the message says which and why."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a partial file. If
    writing fails (a full disk), the temporary file is removed and the previous checkpoint stays.
    """
    path = Path(path)
    temporary = temporary_path(path, hidden=True)  # one per process
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
    """Refuse a checkpoint of a different run: any difference in a key that defines a run (seg/config/identity.py),
    listed with the checkpoint's value and this run's."""
    differences = identity_differences(saved_config, config)
    if differences:
        raise CheckpointError(f"checkpoint {path} is from a different run: " + "; ".join(differences)
                              + " (only where and how a run runs may change when it is continued: "
                              + "docs/reliability.md)")


@dataclass
class RunState:
    """Where a run stands: what last.pt saves and a resumed run starts from (the same fields, in a dict)."""

    epoch: int = 1  # the epoch in progress (1-based); epochs + 1 once training is done
    batch: int = 0  # the next batch of the epoch
    order: torch.Tensor | None = None  # the epoch's shuffled order of the training slices (None: not drawn yet)
    step: int = 0  # optimizer steps taken
    epoch_losses: list[float] = field(default_factory=list)  # the training losses of this epoch so far
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch (metrics.json's history)
    best_dice: float = -math.inf  # the best validation Dice so far
    best_epoch: int | None = None
    train_time: float = 0.0  # seconds spent in training steps, over every epoch
    train_time_before_epoch: float = 0.0  # train_time when this epoch started

    def next_epoch(self) -> None:
        """The epoch ended: the next one starts at its first batch, with an order of its own."""
        self.epoch, self.batch, self.order, self.epoch_losses = self.epoch + 1, 0, None, []
        self.train_time_before_epoch = self.train_time

    def record(self) -> dict:
        """As saved in last.pt: a dict of plain values and tensors (``weights_only`` loading accepts it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_run_state(state: dict) -> RunState:
    """The ``RunState`` a loaded last.pt holds (format 3: ``run_state``; formats 1 and 2: ``progress``)."""
    return RunState(**(state["run_state"] if "run_state" in state else state["progress"]))


def holds_run_state(state) -> bool:
    """Whether a loaded checkpoint is a run's last.pt: its configuration and where the run stood."""
    return isinstance(state, dict) and "config" in state and ("run_state" in state or "progress" in state)


def last_record(model, optimizer, scheduler, generator: torch.Generator, run_state: RunState, config: dict,
                domains: list, best_model: dict | None, scheduler_job: str | None) -> dict:
    """last.pt: everything needed to continue the run where it stands."""
    return {"format_version": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "rng": rng_states(),
            "run_state": run_state.record(), "config": config, "domains": domains, "best_model": best_model,
            "scheduler_job": scheduler_job}


def best_record(model_state: dict, config: dict, domains: list, run_state: RunState) -> dict:
    """best.pt: the best validation epoch's weights and what is needed to use them (seg-predict)."""
    return {"format_version": FORMAT_VERSION, "model": model_state, "config": config, "domains": domains,
            "best_epoch": run_state.best_epoch, "best_val_dice": run_state.best_dice, "step": run_state.step}


def restore_run(path: Path, model, optimizer, scheduler, generator: torch.Generator) -> tuple[RunState, dict | None]:
    """Load a run's last.pt into the live objects (and the global random generators); returns where the run
    stood and the best epoch's weights."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    restore_rng_states(state["rng"])
    return read_run_state(state), best_weights(state, path)


def repair_best(last: Path, state: dict) -> None:
    """best.pt always follows last.pt (``state``, loaded): written after it, rebuilt from it when missing or
    older."""
    best_model = best_weights(state, last)
    if best_model is None:
        return
    path = last.parent / "best.pt"
    run_state = read_run_state(state)
    try:
        current = load_checkpoint(path).get("best_epoch") if path.is_file() else None
    except CheckpointError:
        current = None  # unreadable: rebuilt below
    if current != run_state.best_epoch:
        was = "older" if path.exists() else "missing"
        save_checkpoint(path, best_record(best_model, state["config"], state.get("domains", []), run_state))
        print(f"Rebuilt {path} (epoch {run_state.best_epoch}) from {last.name}: it was {was}")


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
    if read_run_state(state).best_epoch is None:
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
