"""Shared fixtures: small real datasets on disk, the project root, a way to run train.py, the real
configuration composed once (``compose_train``, ``train_cfg``), and the helpers of the layer tests
(single-threaded tiny tensors, float64 inputs, non-trivial parameters)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from acdc_tree import make_acdc_tree

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores (``pytest -m slow -n 2``): each test, and every process it starts, uses
    # one thread, so that the workers' thread pools do not oversubscribe the cores (which slows each of them
    # far more than their number).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def acdc_root(tmp_path_factory) -> Path:
    """A 6-patient ACDC-layout tree of real NIfTI files (48x40, 4 slices)."""
    return make_acdc_tree(tmp_path_factory.mktemp("acdc"), num_patients=6, shape=(48, 40, 4))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder shared by the end-to-end runs (the phantom is generated there once)."""
    return tmp_path_factory.mktemp("data")


_COMPOSED: dict[tuple, object] = {}


def compose_train(*overrides: str, hydra: bool = False):
    """The real configs/train.yaml with ``overrides``, composed with Hydra's compose API as train.py composes
    it (the schema registered; ``hydra=True``: Hydra's own keys too). Each set of overrides is composed once
    per session; every call gets its own copy, free to change."""
    key = (overrides, hydra)
    if key not in _COMPOSED:
        from hydra import compose, initialize_config_dir

        from seg.config.launch import register_configs

        register_configs()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            _COMPOSED[key] = compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
    return copy.deepcopy(_COMPOSED[key])


def multirun_config(*overrides: str):
    """The configuration ``python train.py -m <overrides>`` hands its callbacks (sweeps allowed, hydra.* included)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from seg.config.launch import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return GlobalHydra.instance().hydra.compose_config(config_name="train", overrides=list(overrides),
                                                           run_mode=RunMode.MULTIRUN, with_log_configuration=False)


@pytest.fixture
def train_cfg():
    """The default configuration (configs/train.yaml, no overrides): composed once, a fresh copy per test."""
    return compose_train()


def run_train(*overrides: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python train.py <overrides>`` as a user would; fails the test with its output if it fails."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"train.py {' '.join(overrides)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def one_thread():
    """The layer tests' tensors are tiny: intra-op threads only add start-up cost (and stall when other
    processes share the cores), so such a module runs single-threaded and the setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, scale=1.0, shift=0.0):
    """A float64 input that requires grad, of the given scale and shift."""
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).requires_grad_()


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (affine 1/0 would hide mistakes)."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.rand_like(param) * 0.8 + 0.6)
    return module
