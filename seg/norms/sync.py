"""Batch statistics over the batches of every process of a data-parallel run (``norm.sync=true``).

Under torchrun each process sees its own share of the global batch; with ``sync`` the batch
statistics of bn and of bin's batch part are those of the global batch, as if one process had
seen it all (synchronized batch norm: Peng et al., "MegDet", CVPR 2018, arXiv 1711.07240).

They are computed from the instance statistics (N, C) that the fused layers already have, by the
law of total variance as ``mixed.batch_stats`` does in one process: two small all-reduces, one for
the mean and the sample count, one for the spread around the global mean (no E[x^2] - E[x]^2
cancellation). Both are differentiable (``seg.runtime.distributed.AllReduceSum``), so the gradient of
every rank's loss reaches every rank's samples through the shared statistics, as in
``torch.nn.SyncBatchNorm`` -- but on any device and backend (gloo on CPU too; torch's own
SyncBatchNorm kernels are CUDA-only) and inside bin's mix, which SyncBatchNorm cannot express.
"""

from __future__ import annotations

import torch

from ..runtime.distributed import AllReduceSum, world_size


def synchronized() -> bool:
    """Whether statistics have other processes to be synchronized with."""
    return world_size() > 1


def global_batch_stats(var_in: torch.Tensor, mean_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (variance, mean) over the samples of all processes, from this process's instance
    statistics (N, C), and the total number of samples: (C,), (C,) and a scalar tensor."""
    count_here = mean_in.new_full((1,), mean_in.shape[0])
    sums = AllReduceSum.apply(torch.cat([mean_in.sum(0), count_here]))
    mean, count = sums[:-1] / sums[-1], sums[-1]
    spread = AllReduceSum.apply(var_in.sum(0) + (mean_in - mean).square().sum(0))
    return spread / count, mean, count
