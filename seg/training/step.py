"""One training step -- forward, loss, backward, optimizer step -- for the trainer and every benchmark.

``train_step(step, images, labels, domains)`` is what ``train.py`` runs on every batch; the
benchmarks (scripts/) call this same function, so they time the trainer's own step, not a copy.
``TrainStep`` holds what a step needs besides its batch: the module that runs (compiled, DDP-wrapped
or the model itself), the optimizer, the loss, the forward pass's precision and memory format, the
auxiliary loss weight, gradient clipping, and the layers to call after each optimizer step (BIN
clips its gates to [0, 1]). Fetching and augmenting the batch are not part of the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .losses import auxiliary_loss


@dataclass
class TrainStep:
    """What one training step needs besides its batch (``of`` builds it from a model)."""

    module: nn.Module  # what runs the forward pass: the model, compiled (trainer.compile) and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    parameters: list[nn.Parameter]  # the model's, for gradient clipping
    after_step: list[nn.Module] = field(default_factory=list)  # layers with ``after_optimizer_step()``
    autocast: Any = field(default_factory=contextlib.nullcontext)  # reusable: the forward pass's precision
    memory_format: torch.memory_format = torch.contiguous_format
    aux_weight: float = 0.0  # weight of a conditioner's auxiliary loss (model.aux_weight)
    grad_clip: float | None = None  # max gradient norm (optim.grad_clip); None: no clipping
    conditioned: bool = True  # the module takes (images, domains, with_aux=True), as seg.model.unet.UNet; else images

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, *, module: nn.Module | None = None,
           **options) -> TrainStep:
        """The step of ``model`` (run as ``module``, default the model itself) with ``optimizer`` and ``loss_fn``."""
        after = [layer for layer in model.modules() if hasattr(layer, "after_optimizer_step")]
        return cls(module if module is not None else model, optimizer, loss_fn, list(model.parameters()), after,
                   **options)


def train_step(step: TrainStep, images: torch.Tensor, labels: torch.Tensor,
               domains: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step on a batch (images (N, C, H, W), labels (N, H, W), domain ids (N,) or None);
    returns the loss, detached (not synchronized: reading it is the caller's choice)."""
    images = images.contiguous(memory_format=step.memory_format)
    with step.autocast:  # trainer.precision=bf16: the forward pass in bfloat16 where safe
        if step.conditioned:
            logits, aux_logits = step.module(images, domains, with_aux=True)
        else:
            logits, aux_logits = step.module(images), None
    loss = step.loss_fn(logits.float(), labels.long())
    if aux_logits is not None:  # a conditioner's low-resolution head (sean's coarse regions)
        loss = loss + step.aux_weight * auxiliary_loss(aux_logits, labels)
    step.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if step.grad_clip:
        torch.nn.utils.clip_grad_norm_(step.parameters, step.grad_clip)
    step.optimizer.step()
    for layer in step.after_step:  # e.g. BIN clips its gates to [0, 1]
        layer.after_optimizer_step()
    return loss.detach()
