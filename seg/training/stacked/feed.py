"""Each stacked run's training batches, in the order and with the augmentation its own run would have.

A single run (seg/training/loop.py) draws, from one generator seeded with its seed: at the start of every
epoch the visiting order (``seg.training.ordering.epoch_order``), then for every batch the augmentation
(``seg.training.augment.augment_batch``). ``RunFeed`` keeps one run's cursor -- epoch, batch, the epoch's
order -- over its own training slices with its own generator, so runs with different folds and
seeds (different numbers of slices, hence epochs of different lengths) each move through their
own sequence; their epochs need not line up.

``augmented_batches`` gathers the next batch of several runs and augments them together: each run's
random numbers are drawn from its own generator in ``augment_batch``'s order
(``seg.training.augment.draw_augmentation``), and all runs' images are then augmented in one pass
(``apply_augmentation``: one ``grid_sample`` for the geometry, one batched operation per intensity option)
-- the same result as ``augment_batch`` per run (tested), with a constant number of operations.
"""

from __future__ import annotations

import math

import torch

from ...data.augmentations import Augmentation
from ..augment import apply_augmentation, concat_draws, draw_augmentation
from ..ordering import epoch_order


class RunFeed:
    """One run's training batches: ``images`` (S, C, H, W) and ``labels`` (S, H, W) of its training slices (on
    the training device), visited ``epochs`` times in the order ``generator`` draws, ``batch_size`` at a time.

    ``epoch`` (1-based), ``batch`` and ``order`` are where the run stands (the trainer's progress entries of
    the same names): a run resumed from a checkpoint continues from them and its generator's state.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, epochs: int,
                 generator: torch.Generator, shuffle_buffer: int | None = None,
                 augmentation: Augmentation = Augmentation(), epoch: int = 1, batch: int = 0,
                 order: torch.Tensor | None = None):
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"a run's training set needs as many labels as images, at least one: "
                             f"{images.shape[0]} images, {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.epochs, self.generator = batch_size, epochs, generator
        self.shuffle_buffer, self.augmentation = shuffle_buffer, augmentation
        self.epoch, self.batch, self.order = epoch, batch, order

    def __len__(self) -> int:
        """Training slices."""
        return self.images.shape[0]

    @property
    def finished(self) -> bool:
        return self.epoch > self.epochs

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self) / self.batch_size)

    def next_indices(self) -> torch.Tensor:
        """The slices of the run's next batch (drawing the epoch's order first, at an epoch's start)."""
        if self.finished:
            raise RuntimeError(f"the run has finished its {self.epochs} epochs")
        if self.order is None:
            self.order = epoch_order(len(self), self.generator, self.shuffle_buffer, self.images.device)
        return self.order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]

    def next_size(self) -> int:
        """The size of the next batch (the last of an epoch may be smaller), without drawing anything."""
        return min(self.batch_size, len(self) - self.batch * self.batch_size)

    def advance(self) -> bool:
        """After a step on the batch from ``next_indices``: move on; True when that batch ended an epoch."""
        self.batch += 1
        if self.batch < self.batches_per_epoch:
            return False
        self.epoch, self.batch, self.order = self.epoch + 1, 0, None
        return True


def augment_together(images: torch.Tensor, labels: torch.Tensor, draws: list[dict], augmentation: Augmentation):
    """Augment (M, C, H, W) images and (M, H, W) labels, sample by sample, by the runs' concatenated draws
    (each run's ``draw_augmentation``, in the order of the rows) -- ``augment_batch``'s operations."""
    return apply_augmentation(images, labels, concat_draws(draws), augmentation)


def augmented_batches(feeds: list[RunFeed | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next batch of every run with a feed (None: a run that sits this step out), augmented, as the
    stacked input: images (N, K*C, H, W) (run k's channels in block k) and labels (N, K, H, W) uint8; a
    run without a feed gets zeros. Every feed must have a next batch of the same size N."""
    active = [(k, feed) for k, feed in enumerate(feeds) if feed is not None]
    if not active:
        raise ValueError("no run takes this step")
    sizes = {feed.next_size() for _, feed in active}
    if len(sizes) != 1:
        raise ValueError(f"the runs of one step need batches of one size; got {sorted(sizes)}")
    first = active[0][1]
    n, (c, h, w) = sizes.pop(), first.images.shape[1:]
    indices = [feed.next_indices() for _, feed in active]
    if all(feed.images is first.images and feed.labels is first.labels for _, feed in active):
        rows = torch.cat(indices).to(first.images.device)  # one gather from a pool all runs share
        images, labels = first.images[rows], first.labels[rows]
    else:
        images = torch.cat([feed.images[rows.to(feed.images.device)] for (_, feed), rows in zip(active, indices)])
        labels = torch.cat([feed.labels[rows.to(feed.labels.device)] for (_, feed), rows in zip(active, indices)])
    augmenting = {feed.augmentation for _, feed in active}
    if len(augmenting) != 1:
        raise ValueError("the runs of one step share data.augment")
    augmentation = augmenting.pop()
    if augmentation.active:  # as augment_batch: nothing drawn otherwise
        draws = [draw_augmentation(n, (c, h, w), feed.generator, images.device, augmentation) for _, feed in active]
        images, labels = augment_together(images, labels, draws, augmentation)
    runs = len(feeds)
    stacked_images = images.new_zeros(runs, n, c, h, w)
    stacked_labels = labels.new_zeros(runs, n, h, w)
    where = torch.tensor([k for k, _ in active], device=images.device)
    stacked_images[where] = images.view(len(active), n, c, h, w)
    stacked_labels[where] = labels.view(len(active), n, h, w)
    return stacked_images.transpose(0, 1).reshape(n, runs * c, h, w), stacked_labels.transpose(0, 1).contiguous()
