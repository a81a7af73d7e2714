"""How a command starts: Hydra's schema and resolvers, and under torchrun the process group.

* ``register_configs()`` (train.py and seg-prepare-data call it before Hydra composes) stores the schema
  (seg/config/schema.py) as ``train_schema`` and registers the resolvers of configs/train.yaml:
  ``${launch_time:<strftime pattern>}`` (hydra.run.dir), ``${cuda_device_count:}``
  (hydra/launcher=gpus) and ``${not_identity:}`` (the keys that do not define a run, seg/config/identity.py:
  hydra.job's override_dirname leaves them out of a sweep's job folder names).
* ``processes()`` (entered by train.py before Hydra composes the configuration) joins torchrun's
  process group -- gloo for CPU tensors, NCCL for CUDA tensors -- and makes the ranks agree on one
  clock: rank 0's launch time is broadcast and ``${launch_time:...}`` in ``hydra.run.dir`` uses it,
  so every rank composes the same output folder. Ranks other than 0 do not write Hydra's ``.hydra/``
  record there (``hydra.output_subdir=null``) and their standard output is silenced (errors still
  reach standard error). What the ranks then do together is seg/runtime/distributed.py's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .identity import job_folder, not_identity
from .schema import TrainConfig


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list, and its resolvers."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)
    if not OmegaConf.has_resolver("cuda_device_count"):
        OmegaConf.register_new_resolver("cuda_device_count", cuda_device_count)
    if not OmegaConf.has_resolver("not_identity"):
        OmegaConf.register_new_resolver("not_identity", not_identity)
    if not OmegaConf.has_resolver("job_folder"):
        OmegaConf.register_new_resolver("job_folder", job_folder)


_launch_time: datetime | None = None


def launch_time(pattern: str) -> str:
    """Hydra's ``${now:...}`` for the run folder, except that every process of a torchrun job has the
    same one: rank 0's clock, broadcast before Hydra composes (``processes``)."""
    global _launch_time
    if _launch_time is None:
        _launch_time = datetime.now()
    return _launch_time.strftime(pattern)


def fix_launch_time(timestamp: float) -> None:
    """Set the instant ``${launch_time:...}`` formats (a POSIX timestamp)."""
    global _launch_time
    _launch_time = datetime.fromtimestamp(timestamp)


def cuda_device_count() -> int:
    """The number of GPUs of this machine, at least 1 (the parallel jobs of ``hydra/launcher=gpus``)."""
    return max(torch.cuda.device_count(), 1)


def torchrun_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def processes():
    """Under torchrun: join the process group for the whole command (see the module docstring)."""
    if torchrun_world_size() <= 1:
        yield
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    launch = torch.tensor([time.time()], dtype=torch.float64)
    dist.broadcast(launch, src=0)
    fix_launch_time(float(launch))
    if rank != 0:
        if not any(arg.startswith("hydra.output_subdir=") for arg in sys.argv):
            sys.argv.append("hydra.output_subdir=null")  # rank 0 writes the run's .hydra/ record
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the whole process)
    try:
        yield
        # every rank leaves the group together: a rank that tears gloo down while another still talks to it
        # can abort at exit ("terminate called without an active exception", exit code -6)
        dist.barrier()
    finally:
        dist.destroy_process_group()
