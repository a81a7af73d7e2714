"""Where a model runs, for every program that runs one (training, prediction, export).

A lower module than seg/train.py: it knows devices and processes (seg/distributed.py), never the
training loop or its configuration, so the inference scripts use it without importing the trainer.
"""

from __future__ import annotations

import re

import torch

from .distributed import World, gpu_names, sweep_gpu

DEVICE_NAME = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class DeviceError(ValueError):
    """A device that this machine or this job cannot use; the message says which and why."""


def resolve_device(name: str, world: World | None = None, job_num: int | None = None, key: str = "trainer.device"
                   ) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable device is a clear error naming ``key``.

    Which GPU for ``cuda``: under torchrun, each process its own (LOCAL_RANK); in a sweep, whose jobs
    may run side by side on one machine, one that no other job holds (``sweep_gpu``); else the first.
    """
    if not DEVICE_NAME.match(name):
        raise DeviceError(f"{key}={name}: choose auto, cpu, cuda or cuda:<index>")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{key}={name}: CUDA is not available on this machine (use auto or cpu)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"{key}={name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    processes = world.size if world is not None else 1
    if name == "cuda" and processes > 1:
        return torch.device("cuda", world.local_rank)
    if name == "cuda":
        return torch.device("cuda", 0 if job_num is None else sweep_gpu(job_num, gpu_names()))
    if name.startswith("cuda:") and processes > 1:
        raise DeviceError(f"{key}={name} names one GPU for all {processes} processes of this torchrun job; use "
                          f"{key}=auto or cuda (each process takes the GPU of its LOCAL_RANK)")
    return torch.device(name)
