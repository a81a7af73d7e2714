"""Where and how a model runs, for every program that runs one (training, prediction, export, benchmarks).

The device (``resolve_device``: auto, cpu, cuda, cuda:N, mps; under torchrun each process its own
GPU, in a sweep of parallel jobs one GPU per job: ``sweep_gpu``), the precision (``resolve_precision``,
``autocast_context``), compilation (``check_compile``, ``graph_breaks``), determinism and seeds. Its
``check_options`` refuses, before any work, a ``trainer.device``, ``trainer.precision`` or
``trainer.compile_backend`` that means nothing. It knows processes (seg/runtime/distributed.py), never the
training loop, so the inference tools use it without importing the trainer.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .distributed import World
from ..config.schema import ConfigError, check_choice

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

DEVICE_NAME = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
PRECISIONS = ("auto", "fp32", "bf16")


class DeviceError(ConfigError):
    """A device that this machine or this job cannot use; the message says which and why."""


def check_options(trainer) -> None:
    """The ``trainer.`` keys of this module: a device name, a precision and (compiled) a compile backend."""
    device = trainer.get("device")
    if not isinstance(device, str) or not DEVICE_NAME.match(device):
        raise ConfigError(f"trainer.device={device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
    check_choice("trainer.precision", trainer.get("precision"), PRECISIONS)
    if trainer.get("compile"):
        check_compile_backend(trainer.get("compile_backend"))


def resolve_device(name: str, world: World | None = None, job_num: int | None = None, key: str = "trainer.device"
                   ) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable device is a clear error naming ``key``.

    Which GPU for ``cuda``: under torchrun, each process its own (LOCAL_RANK); in a sweep, whose jobs
    may run side by side on one machine, one that no other job holds (``sweep_gpu``); else the first.
    """
    if not DEVICE_NAME.match(name):
        raise DeviceError(f"{key}={name}: choose auto, cpu, cuda or cuda:<index> (or mps on a Mac)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{key}={name}: CUDA is not available on this machine (use auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{key}=mps: MPS is not available on this machine (use auto or cpu)")
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


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


_gpu_claim: tuple[int, object] | None = None  # (GPU index, its open lock file): held until the process ends


def sweep_gpu(job_num: int | None, gpus: list[str], claims: Path | None = None) -> int:
    """The GPU for a job of a sweep whose jobs run side by side on one machine (``hydra/launcher=gpus``).

    ``gpus`` names the machine's GPUs (``gpu_names``). The process claims the first GPU that no other
    process holds -- an exclusive lock on a file named after it, in ``claims`` (a folder per user in
    the temporary directory) -- and keeps it until it exits: joblib's worker processes each keep
    one GPU for every job they run, so as many workers as GPUs never share one. With more parallel
    jobs than GPUs (all held), or without file locks (Windows), the job number modulo the GPU count.
    """
    global _gpu_claim
    if len(gpus) <= 1:
        return 0
    if _gpu_claim is not None:
        return _gpu_claim[0]
    if fcntl is not None:
        claims = claims or Path(tempfile.gettempdir()) / f"seg-gpu-claims-{getpass.getuser()}"
        claims.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(gpus):
            handle = open(claims / f"{name}.lock", "w")  # noqa: SIM115  (kept open: the claim)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _gpu_claim = (index, handle)
            return index
    return (job_num or 0) % len(gpus)


def gpu_names() -> list[str]:
    """A name per visible GPU that is the same in every process (its UUID), for ``sweep_gpu``."""
    names = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        names.append(f"gpu-{uuid}" if uuid is not None else f"gpu{index}")
    return names


# ---------------------------------------------------------------------------- precision


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports bfloat16, else fp32; bf16 on a GPU without it is a clear error."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if name == "bf16" and not bf16_ok:
        raise ConfigError(f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          f"use trainer.precision=fp32")
    return name


def autocast_context(device: torch.device, precision: str):
    """The context of the forward pass: autocast to bfloat16 (weights, norm statistics and loss stay
    float32), or nothing for fp32. Reusable: ``with autocast:`` at every step."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- compilation


def check_compile_backend(backend: str) -> None:
    """trainer.compile_backend must be one torch.compile knows."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # also the debugging ones (aot_eager...)
        usual = sorted({*torch._dynamo.list_backends(), "aot_eager", "eager"})
        raise ConfigError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; "
                          f"choose one of: {', '.join(usual)}")


def check_compile(backend: str, device: torch.device) -> None:
    """Refuse, before any work, a setup where torch.compile cannot run: a Python that dynamo does not
    support, inductor on CUDA without Triton, inductor on CPU without a C++ compiler."""
    import torch._dynamo

    problem = None
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as err:
        problem = f"torch.compile does not run here ({err})"
    if problem is None and backend == "inductor" and device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            problem = f"the inductor backend needs Triton on {device} (pip install triton)"
    if problem is None and backend == "inductor" and device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            problem = (f"the inductor backend needs a C++ compiler on the CPU and found none "
                       f"(CXX={os.environ.get('CXX', 'g++')}); install g++ or set CXX")
    if problem:
        raise ConfigError(f"trainer.compile=true: {problem}; or use trainer.compile=false")


def graph_breaks() -> int:
    """How many graph breaks torch.compile met in this process (0: each model call is one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# ---------------------------------------------------------------------------- determinism


def configure_determinism(deterministic: bool) -> None:
    """``trainer.deterministic``: deterministic kernels only, so a resumed run repeats bit for bit."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
