"""Stacked runs: K independent training runs of one U-Net architecture trained as one computation.

Runs that differ only in what a sweep varies -- learning rate, seed (hence initial weights, data
order and augmentation draws), fold, schedule, number of epochs -- are trained side by side in one
network whose channel axis holds every run's channels (``StackedUNet``: grouped convolutions, norm
layers built with ``runs=K``). Each run keeps its own weights, SGD momentum, learning rate and
schedule (``StackedSGD`` reads them from the run's own ``torch.optim.SGD`` at every step),
normalization statistics (BN's batch statistics and running averages are per channel, so per run)
and data cursor (``RunFeed``: its own order over its own slices; epochs of different runs need
not line up). What each run computes is what it would compute alone (tests/test_stacked.py checks
losses, weights, running statistics and Dice against single runs).

The launcher's loop, for K runs built as the trainer builds one (model, optimizer, scheduler,
generator per run, each with its own seed)::

    stack = Stack(models, optimizers, norm_options=norm_options)     # takes over their states
    feeds = [RunFeed(train.images, train.labels, batch_size=..., epochs=..., generator=g, ...) ...]
    while not stack.done(feeds):
        result = stack.train_step(feeds)           # one step of every active run
        ...log result.losses[k] for k in result.runs; a non-finite one (result.nonfinite()): the run
        ...diverged at this step (metrics.json as the trainer writes it), stack.freeze(k)
        for k in result.epoch_ended:               # (a run frozen in this step has no epoch end)
            schedulers[k].step()                   # run k's rate changes at its own epoch end
            model = stack.write_back(k)            # run k's state into models[k] and optimizers[k]
            ...evaluate(model, ...), checkpoint models[k], optimizers[k], schedulers[k], feeds[k]

A run whose loss is non-finite is updated as it would be alone (its values become non-finite
too), but nothing of it reaches the other runs: no operation of the stack mixes two runs.
``freeze(k)`` takes it (or any run) out of the following steps; a run outside a step keeps its
weights, momentum and running statistics exactly.

Why channel folding and not ``torch.func.vmap``: docs/stacking.md (measured).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ...data import class_names
from ...config.identity import flatten
from ...norms import names, spec
from .feed import RunFeed, augment_together, augmented_batches, draw_augmentation
from .model import CONV_MODES, StackedConv, StackedUNet, StackError, concat_runs, conv_modes, tune_convolutions
from .optim import StackedSGD

__all__ = ["CONV_MODES", "RunFeed", "SHARED_KEYS", "Stack", "StackError", "StackedConv", "StackedSGD",
           "StackedUNet", "StepResult", "augment_together", "augmented_batches", "check_stackable",
           "concat_runs", "conv_modes", "draw_augmentation", "per_run_cross_entropy", "stack_key",
           "tune_convolutions"]

# configuration keys (dotted; a trailing dot: every key below) that the runs of one stack share; every
# other key may differ between them (lr, seed, data.fold, data.root, schedule, epochs, optim.momentum,
# optim.weight_decay, optim.grad_clip, model.init ...)
SHARED_KEYS = ("model.name", "model.in_channels", "model.base_channels", "model.depth", "model.up", "norm.",
               "loss", "optim.name", "optim.nesterov", "trainer.batch_size", "trainer.device", "trainer.precision",
               "trainer.compile", "data.image_size", "data.augment.")


def stack_key(cfg) -> tuple:
    """What the runs of one stack must share, from a run's configuration: jobs with equal keys can be
    stacked (group a sweep's jobs by it). Includes the number of classes of ``data.task``."""
    tree = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat = flatten(tree)
    shared = sorted((key, repr(value)) for key, value in flat.items()
                    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in SHARED_KEYS))
    return (("classes", len(class_names(flat["data.task"]))), *shared)


def check_stackable(cfgs: list) -> None:
    """Refuse configurations that one stack cannot train, naming the first key that differs or is not supported."""
    keys = [dict(stack_key(cfg)) for cfg in cfgs]
    for k, key in enumerate(keys[1:], 1):
        for name in sorted(set(key) | set(keys[0]), key=lambda n: (not n.endswith(".name"), n)):  # names first
            if key.get(name) != keys[0].get(name):
                raise StackError(f"runs 0 and {k} differ in {name} ({keys[0].get(name)} vs {key.get(name)}); "
                                 f"the runs of a stack share {', '.join(SHARED_KEYS)}")
    first = keys[0]
    problems = {"optim.name": ("'sgd'", "a stack trains with SGD"), "loss": ("'ce'", "a stack computes cross-entropy"),
                "trainer.compile": ("False", "a stack is not compiled")}
    for name, (wanted, why) in problems.items():
        if first.get(name, wanted) != wanted:
            raise StackError(f"{name}={first[name]} cannot be stacked: {why}")
    norm = first.get("norm.name", "''").strip("'")
    if not spec(norm).can_stack:
        raise StackError(f"norm={norm} cannot be stacked; the layers that can: {', '.join(names(can_stack=True))}")


def per_run_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, runs: int) -> torch.Tensor:
    """(K,) the mean pixel cross-entropy of each run: logits (N, K*classes, H, W), labels (N, K, H, W).

    As the trainer, on logits in at least float32 (float64 stays float64)."""
    n, _, h, w = logits.shape
    logits = logits.reshape(n, runs, -1, h, w).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), labels.long(), reduction="none").mean((0, 2, 3))


@dataclass
class StepResult:
    """What one ``Stack.train_step`` did: the runs that stepped, their losses ((K,) on the device; the entries
    of other runs are NaN) and the runs whose step ended an epoch."""

    runs: list[int]
    losses: torch.Tensor
    epoch_ended: list[int]

    def nonfinite(self) -> list[int]:
        """The runs whose loss in this step is not finite (diverged: freeze them). Reads the losses from the
        device; a launcher that logs every few steps checks the losses it gathered instead."""
        values = self.losses.tolist()
        return [k for k in self.runs if not math.isfinite(values[k])]


class Stack:
    """K runs (``models``: ``seg.model.unet.UNet`` of one architecture and norm, ``optimizers``: their
    ``torch.optim.SGD``) trained as one computation; their current states are taken over.

    ``norm_options``: the norm's options (the config's ``norm`` less its name), the same for every run.
    ``grad_clip``: per run, ``optim.grad_clip`` (None: no clipping). ``autocast``: the context of the
    forward pass (the trainer's ``autocast_context``), or None. ``models[k]`` and ``optimizers[k]`` hold
    run k's state only after ``write_back(k)``; ``read_back(k)`` takes it from them again (resume).
    """

    def __init__(self, models: list, optimizers: list, *, norm_options: dict | None = None,
                 grad_clip: list[float | None] | None = None, autocast=None):
        self.models, self.runs = list(models), len(models)
        self.model = StackedUNet(self.models, norm_options)
        self.optimizer = StackedSGD(self.model, self.models, optimizers, grad_clip)
        self.active = [True] * self.runs  # False: frozen (diverged, or taken out by the caller)
        self.post_step_layers = [m for m in self.model.modules() if hasattr(m, "after_optimizer_step")]
        self.buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if any(b.numel() % self.runs for b in self.buffers):
            raise StackError("a layer of this model has a buffer that is not per run")
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.device = self.model.steps.device
        self.gates: dict[tuple[bool, ...], torch.Tensor] = {}

    # ---------------------------------------------------------------- training

    def step(self, images: torch.Tensor, labels: torch.Tensor, runs: list[int] | None = None) -> torch.Tensor:
        """One training step of ``runs`` (default: every active run) on the stacked batch (images
        (N, K*C, H, W), labels (N, K, H, W)); returns the (K,) losses (detached; those of other runs are
        meaningless). Runs outside the step keep their weights, momentum and statistics exactly."""
        chosen = set(range(self.runs) if runs is None else runs)
        gate = tuple(self.active[k] and k in chosen for k in range(self.runs))
        everyone = all(gate)
        saved = None if everyone else [b.clone() for b in self.buffers]  # put back for the runs outside
        self.model.train()
        with self.autocast:
            logits = self.model(images)
        losses = per_run_cross_entropy(logits, labels, self.runs)
        for _, param in self.optimizer.params:
            param.grad = None
        losses.sum().backward()  # each run's gradient is that of its own loss: the runs share no operation
        self.optimizer.step(gate)
        for k in range(self.runs):  # what torch's schedulers check: the run's optimizer has stepped
            if gate[k]:
                self.optimizer.optimizers[k]._opt_called = True
        for layer in self.post_step_layers:  # e.g. BIN clips its gates to [0, 1]
            layer.after_optimizer_step()
        with torch.no_grad():
            if saved is not None:
                taking = self.gate_column(gate)
                for buffer, before in zip(self.buffers, saved):
                    kept = buffer.view(self.runs, -1)
                    kept.copy_(torch.where(taking, kept, before.view(self.runs, -1)))
            self.model.steps.add_(self.gate_column(gate)[:, 0].long())
        return losses.detach()

    def gate_column(self, gate: tuple[bool, ...]) -> torch.Tensor:
        """(K, 1) bool on the device, made once per gate."""
        if gate not in self.gates:
            self.gates[gate] = torch.tensor(gate, device=self.device)[:, None]
        return self.gates[gate]

    def train_step(self, feeds: list[RunFeed]) -> StepResult:
        """One step of every active run that has not finished its epochs, each on the next batch of its own
        feed (runs whose next batch is smaller -- an epoch's last -- take their step separately)."""
        if len(feeds) != self.runs:
            raise ValueError(f"{self.runs} runs but {len(feeds)} feeds")
        ready = [k for k in range(self.runs) if self.active[k] and not feeds[k].finished]
        by_size: dict[int, list[int]] = {}
        for k in ready:
            by_size.setdefault(feeds[k].next_size(), []).append(k)
        losses = None
        ended = []
        for _, runs in sorted(by_size.items(), reverse=True):
            images, labels = augmented_batches([feeds[k] if k in runs else None for k in range(self.runs)])
            step_losses = self.step(images.to(self.model.steps.device), labels, runs)
            chosen = torch.zeros(self.runs, dtype=torch.bool, device=self.device)
            chosen[runs] = True
            losses = torch.where(chosen, step_losses, float("nan") if losses is None else losses)
            ended += [k for k in runs if feeds[k].advance()]
        if losses is None:
            losses = torch.full((self.runs,), float("nan"), device=self.device)
        return StepResult(runs=ready, losses=losses, epoch_ended=sorted(ended))

    def done(self, feeds: list[RunFeed]) -> bool:
        """Whether every run has finished its epochs or been frozen."""
        return all(not self.active[k] or feeds[k].finished for k in range(self.runs))

    def freeze(self, k: int) -> None:
        """Take run k out of every following step (a diverged run, or one the caller stops). Its state stays as
        it is, except that non-finite values (a diverged run's) are replaced by 0, so that its share of the
        stacked computation stays finite."""
        self.active[k] = False
        with torch.no_grad():
            for tensor in (*self.model.parameters(), *self.buffers):
                tensor.view(self.runs, -1)[k].nan_to_num_(0.0, 0.0, 0.0)
        self.optimizer.clear_nonfinite(k)

    # ---------------------------------------------------------------- one run's state

    def write_back(self, k: int):
        """Run k's weights, buffers and momentum into ``models[k]`` and its optimizer; returns ``models[k]``
        (an ordinary UNet: evaluate it, save its state_dict and its optimizer's as the trainer does)."""
        self.models[k].load_state_dict(self.model.run_state_dict(k))
        self.optimizer.write_back(k)
        return self.models[k]

    def read_back(self, k: int) -> None:
        """Take run k's state from ``models[k]`` and its optimizer again (e.g. after loading a checkpoint
        into them)."""
        self.model.load_run_state_dict(k, self.models[k].state_dict())
        self.optimizer.read_back(k)

    def tune(self, example: torch.Tensor, repeats: int = 3) -> dict:
        """Choose how each convolution runs, by timing (in the stack's autocast context), on the shape of
        ``example`` (a stacked input; see ``tune_convolutions``). Returns the times per layer and mode."""
        with self.autocast:
            return tune_convolutions(self.model, example, repeats)
