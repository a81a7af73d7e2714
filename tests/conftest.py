"""Shared fixtures: small real datasets on disk, the project root, a way to run train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from acdc_tree import make_acdc_tree  # noqa: E402


@pytest.fixture(scope="session")
def acdc_root(tmp_path_factory) -> Path:
    """A 6-patient ACDC-layout tree of real NIfTI files (48x40, 4 slices)."""
    return make_acdc_tree(tmp_path_factory.mktemp("acdc"), num_patients=6, shape=(48, 40, 4))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder shared by the end-to-end runs (the phantom is generated there once)."""
    return tmp_path_factory.mktemp("data")


def run_train(*overrides: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python train.py <overrides>`` as a user would; fails the test with its output if it fails."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"train.py {' '.join(overrides)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
