"""Checkpoints written atomically: a kill at any moment leaves the previous file intact."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without running pickled code (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)
