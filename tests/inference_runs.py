"""Small trained runs shared by the inference tests (each trained once per test session), the tools
run as a user runs them, and NIfTI copies of a volume in another orientation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import ROOT, run_train

_RUNS: dict[tuple, Path] = {}

# the ACDC-layout test tree at its own spacing: the input grid is the training grid, padded evenly
# (48 x 40 -> 64 x 64), so a mirrored input stays a mirrored input through the preprocessing
SMOKE_ACDC = ("experiment=smoke", "data=acdc", "data.spacing=1.5", "data.max_slices_per_volume=null",
              "trainer.progress=false")


def trained_run(tmp_path_factory, acdc_root: Path, *overrides: str) -> Path:
    """The folder of a smoke run on ``acdc_root`` with ``overrides``, trained on first use."""
    key = (str(acdc_root), overrides)
    if key not in _RUNS:
        run = tmp_path_factory.mktemp("run")
        run_train(*SMOKE_ACDC, f"data.root={acdc_root}", *overrides, f"hydra.run.dir={run}")
        _RUNS[key] = run
    return _RUNS[key]


def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "best.pt"


def script(tool: str, *arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The tool ``seg-<tool> <arguments>`` (predict, evaluate, export) in a process of its own, as a user runs it
    (``python -m seg.tools.<tool>``: the console command without depending on where it was installed)."""
    return subprocess.run([sys.executable, "-m", f"seg.tools.{tool}", *arguments], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def script_ok(name: str, *arguments: str) -> str:
    result = script(name, *arguments)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# ---------------------------------------------------------------------------- orientations

# new voxel index -> old voxel index, as a 4x4 matrix of a (48, 40, 4) volume; with it the copy
# ``array`` -> ``reoriented(array, kind)`` holds the same world content under ``affine @ M``
def index_map(kind: str, shape) -> np.ndarray:
    nx, ny, nz = shape
    maps = {
        "flipped_x": [[-1, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, 1, 0]],
        "slices_first": [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]],  # stored (S, X, Y)
        "swapped_flipped_y": [[0, 1, 0, 0], [-1, 0, 0, ny - 1], [0, 0, 1, 0]],  # stored (Y reversed, X, S)
        "flipped_slices": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, nz - 1]],
    }
    return np.array([*maps[kind], [0, 0, 0, 1]], dtype=np.float64)


def reoriented_array(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "flipped_x":
        return array[::-1]
    if kind == "slices_first":
        return array.transpose(2, 0, 1)
    if kind == "swapped_flipped_y":
        return array.transpose(1, 0, 2)[::-1]
    if kind == "flipped_slices":
        return array[:, :, ::-1]
    raise ValueError(kind)


def write_reoriented(source: Path, target: Path, kind: str) -> None:
    """A copy of the NIfTI ``source`` stored in another voxel order, with the affine that keeps every
    voxel at its place in the world (so it is the same image)."""
    image = nib.load(str(source))
    array = np.asarray(image.dataobj)
    data = np.ascontiguousarray(reoriented_array(array, kind))
    copy = nib.Nifti1Image(data, image.affine @ index_map(kind, array.shape))
    copy.set_data_dtype(image.get_data_dtype())
    nib.save(copy, str(target))


def back_to_source_grid(array: np.ndarray, kind: str, shape) -> np.ndarray:
    """Read the reoriented ``array`` at every voxel of the source grid (world position by position)."""
    old = np.indices(shape).reshape(3, -1)
    new = np.linalg.inv(index_map(kind, shape)) @ np.vstack([old, np.ones((1, old.shape[1]))])
    new = np.rint(new[:3]).astype(int)
    return array[new[0], new[1], new[2]].reshape(shape)
