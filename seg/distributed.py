"""Data-parallel training across processes: ``torchrun --nproc_per_node=N train.py ...`` (DDP).

Everything the training loop needs to know about other processes is in ``World``: which rank this
is, this rank's part of each batch and of the evaluation slices, averaging over ranks, and the
DDP wrapper. With one process (no torchrun) every method is the identity, so ``seg.train`` runs
the same code either way and the single-process run is unchanged.

How a torchrun job is organised:

* ``processes()`` (entered by train.py before Hydra composes the configuration) joins the process
  group -- gloo for CPU tensors, NCCL for CUDA tensors -- and makes the ranks agree on one clock:
  rank 0's launch time is broadcast and ``${launch_time:...}`` in ``hydra.run.dir`` uses it, so
  every rank composes the same output folder. Ranks other than 0 do not write Hydra's ``.hydra/``
  record there (``hydra.output_subdir=null``) and their standard output is silenced (errors still
  reach standard error).
* Rank 0 alone writes in the folder: metrics.json, TensorBoard events and checkpoints. It decides
  where the run writes and which checkpoint it resumes, and tells the others.
* Each epoch, every rank draws the same permutation (one seeded generator) and takes its share of
  each global batch (rows rank, rank + N, ...): the ranks see disjoint samples, a different order
  every epoch, and together exactly the batches one process would see with N times the batch size.
* Evaluation is sharded the same way; the per-slice Dice counts (and predictions) are summed over
  ranks, so every rank computes the same metrics.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def torchrun_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def processes():
    """Under torchrun: join the process group for the whole command (see the module docstring)."""
    if torchrun_world_size() <= 1:
        yield
        return
    from .config import fix_launch_time

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
    finally:
        dist.destroy_process_group()


class World:
    """This process's place among the processes of a data-parallel run (one process: rank 0 of 1)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @classmethod
    def current(cls) -> World:
        """This process's world: from torch.distributed's default group when it is initialized."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, checkpoints and writes metrics.json."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # ---- decisions and data that rank 0 owns

    def main_decides(self, decide, *args):
        """``decide(*args)`` computed by rank 0 alone, its result (any picklable object) given to every rank.

        E.g. the run's folder and the checkpoint it resumes: every rank must use the same.
        """
        if self.size == 1:
            return decide(*args)
        holder = [None]
        if self.is_main:
            try:
                holder = [("ok", decide(*args))]
            except Exception as err:  # every rank fails with rank 0's error (instead of waiting for it forever)
                holder = [("error", err)]
        dist.broadcast_object_list(holder, src=0)
        kind, value = holder[0]
        if kind == "error":
            raise value
        return value

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. generates the phantom, writes the data cache), then the others."""
        if self.size > 1 and not self.is_main:
            dist.barrier()
        yield
        if self.size > 1 and self.is_main:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (e.g. a signal asked one of them to stop): the same answer on all."""
        if self.size == 1:
            return bool(flag)
        value = torch.tensor([int(bool(flag))])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo, also in a cpu:gloo,cuda:nccl group
        return bool(value.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. rank 0 has written the checkpoint before all exit)."""
        if self.size > 1:
            dist.barrier()

    # ---- sharding

    def batches(self, order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """This rank's part of each global batch of ``batch_size`` x size samples of ``order``.

        ``order`` is first padded with its own first samples to a multiple of the world size (as
        torch's DistributedSampler does), so that every rank has as many batches, of equal sizes.
        """
        if self.size == 1:
            return list(order.split(batch_size))
        order = torch.cat([order, order[: (-len(order)) % self.size]])
        return [batch[self.rank::self.size] for batch in order.split(batch_size * self.size)]

    def rows(self, count: int) -> slice:
        """This rank's share of ``count`` evaluation rows: rank, rank + size, ..."""
        return slice(self.rank, count, self.size)

    def gather_rows(self, part: torch.Tensor, count: int) -> torch.Tensor:
        """The (count, ...) tensor whose rows ``rows(count)`` every rank computed: the shares put together."""
        if self.size == 1:
            return part
        full = part.new_zeros((count, *part.shape[1:]))
        full[self.rows(count)] = part
        dist.all_reduce(full)
        return full

    # ---- reductions

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``tensor`` (same shape on every rank), e.g. the training losses."""
        if self.size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (running statistics), e.g. before evaluating.

        DDP broadcasts them at the start of each forward, so they differ only by each rank's last
        update; this makes the evaluated model, on every rank, the one that rank 0 checkpoints.
        """
        if self.size == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    # ---- the model

    def data_parallel(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` wrapped in DistributedDataParallel (gradients averaged over ranks), or itself."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


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


class AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over all ranks, differentiable: the gradient is summed over ranks too.

    With DDP averaging the parameter gradients, this gives each rank the gradient of the average
    of the ranks' losses through a statistic shared by all of them (synchronized batch norm).
    Traced by torch.compile without a graph break.
    """

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total)
        return total


def is_main_process() -> bool:
    """Whether this process writes the run's files: always, except on ranks other than 0 of a torchrun job."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """Number of processes of the default group; 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
