"""What the processes of a data-parallel run (``torchrun --nproc_per_node=N train.py ...``, DDP) do together.

Everything the training loop needs to know about other processes is in ``World``: which rank this
is, this rank's part of each batch and of the evaluation slices, averaging over ranks, and the
DDP wrapper. With one process (no torchrun) every method is the identity, so ``seg.training.loop`` runs
the same code either way and the single-process run is unchanged. ``AllReduceSum`` is the
differentiable sum the synchronized norms use (seg/norms/sync.py). Joining the process group is
seg/config/launch.py's (``processes``); choosing each process's GPU is seg/runtime/device.py's.

How a torchrun job is organised:

* Rank 0 alone writes in the run folder: metrics.json, TensorBoard events and checkpoints. It decides
  where the run writes and which checkpoint it resumes, and tells the others (``main_decides``).
* Each epoch, every rank draws the same permutation (one seeded generator) and takes its share of
  each global batch (rows rank, rank + N, ...): the ranks see disjoint samples, a different order
  every epoch, and together exactly the batches one process would see with N times the batch size.
* Evaluation is sharded the same way; the per-slice Dice counts (and predictions) are summed over
  ranks, so every rank computes the same metrics.

Imports nothing of seg.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


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
