"""SGD with momentum for K stacked runs: each run the update that its own ``torch.optim.SGD`` would make.

The stack takes over the K runs' optimizers as the trainer builds them (``build_optimizer``: one
group per (learning-rate scale, weight decay), e.g. BIN's rho at 10x the rate without decay) and
reads from them, per run and per group, the learning rate, momentum and weight decay -- at every
step, so a run's scheduler changes its rate exactly where the trainer's would (``scheduler.step()``
at that run's own epoch end). Per stacked parameter (K*n elements, run k's block k) the update is
torch's SGD (dampening 0) with (K,) vectors in place of its scalars:

    g = grad + wd * p;   buf = momentum * buf + g;   d = g + momentum * buf (nesterov) or buf;   p -= lr * d

A run outside the step's ``gate`` (finished, frozen) is left exactly as it was: its momentum
factor is 1, its gradient's factor 0 and its rate 0, so neither its weights nor its momentum move
(exactly, for finite values: a diverged run's non-finite values stay in its own block until
``Stack.freeze`` clears them). A zero momentum buffer makes the first step ``buf = g``, as torch's
SGD does when it creates the buffer. The gate is known to the host, so the step needs no
synchronization with the device.

``write_back(k)`` puts run k's buffers into its own optimizer, so that ``optimizer.state_dict()``
is what the single-run trainer would save; ``read_back(k)`` takes them from it.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import StackError


class StackedSGD:
    """The optimizer of a ``StackedUNet`` whose runs had ``optimizers`` (one ``torch.optim.SGD`` each, over
    the parameters of ``models``); the optimizers' current momentum buffers are taken over."""

    def __init__(self, stacked: nn.Module, models: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 grad_clip: list[float | None] | None = None):
        runs = len(models)
        if len(optimizers) != runs:
            raise StackError(f"{runs} models but {len(optimizers)} optimizers")
        for k, optimizer in enumerate(optimizers):
            if type(optimizer) is not torch.optim.SGD:
                raise StackError(f"run {k}'s optimizer is {type(optimizer).__name__}; a stack trains with SGD "
                                 f"(optim.name=sgd) only")
            for group in optimizer.param_groups:
                if group["dampening"] or group["maximize"]:
                    raise StackError(f"run {k}'s SGD has dampening or maximize set; a stack supports neither")
        nesterov = {group["nesterov"] for optimizer in optimizers for group in optimizer.param_groups}
        if len(nesterov) > 1:
            raise StackError("stacked runs share optim.nesterov")
        self.nesterov = nesterov.pop()
        self.runs, self.optimizers = runs, optimizers
        self.grad_clip = list(grad_clip) if grad_clip is not None else [None] * runs
        if len(self.grad_clip) != runs:
            raise StackError(f"{runs} runs but {len(self.grad_clip)} grad_clip values")
        # for each trainable stacked parameter: the runs' own parameters of the same name, and the group
        # (index into its optimizer's param_groups) each belongs to
        self.params: list[tuple[str, nn.Parameter]] = []
        self.run_params: dict[str, list[nn.Parameter]] = {}
        self.groups: dict[str, tuple[int, ...]] = {}
        group_of = [{id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]} for opt in optimizers]
        run_named = [dict(model.named_parameters()) for model in models]
        for name, param in stacked.named_parameters():
            if not param.requires_grad:
                continue  # e.g. BN*'s frozen affine: no gradient, never stepped (as torch's SGD skips it)
            own = [named[name] for named in run_named]
            missing = [k for k in range(runs) if id(own[k]) not in group_of[k]]
            if missing:
                raise StackError(f"run {missing[0]}'s optimizer does not hold its parameter {name}")
            self.params.append((name, param))
            self.run_params[name] = own
            self.groups[name] = tuple(group_of[k][id(own[k])] for k in range(runs))
        self.buffers = {name: torch.zeros_like(param) for name, param in self.params}
        with torch.no_grad():
            for k in range(runs):
                for name, _ in self.params:
                    state = optimizers[k].state.get(self.run_params[name][k], {})
                    if state.get("momentum_buffer") is not None:
                        self.block(self.buffers[name], k).copy_(state["momentum_buffer"].reshape(-1))
        self.device, self.dtype = self.params[0][1].device, self.params[0][1].dtype
        self.seen: tuple | None = None  # the hyperparameters the vectors below were made from
        self.vectors: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # per group pattern: (K,) lr, ...
        self.vectors_by_gate: dict[tuple[bool, ...], dict] = {}

    def block(self, tensor: torch.Tensor, k: int) -> torch.Tensor:
        """Run k's part of a stacked tensor, flat."""
        return tensor.view(self.runs, -1)[k]

    # ---------------------------------------------------------------- hyperparameters per run

    def hyperparameters(self) -> tuple:
        """(lr, momentum, weight_decay) of every group of every run's optimizer, as they are now."""
        return tuple(tuple((g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups)
                     for opt in self.optimizers)

    def refresh(self) -> None:
        """Remake the (K,) vectors of each group pattern if a run's optimizer changed (its scheduler stepped)."""
        current = self.hyperparameters()
        if current == self.seen:
            return
        self.seen, self.vectors, self.vectors_by_gate = current, {}, {}
        for pattern in set(self.groups.values()):
            values = torch.tensor([current[k][g] for k, g in enumerate(pattern)], dtype=torch.float64)
            self.vectors[pattern] = {key: values[:, i].to(self.device, self.dtype)
                                     for i, key in enumerate(("lr", "momentum", "weight_decay"))}
        self.decay = any(wd for run in current for (_, _, wd) in run)

    # ---------------------------------------------------------------- the step

    def gated(self, gate: tuple[bool, ...]) -> dict[tuple[int, ...], dict[str, torch.Tensor]]:
        """Per group pattern, the (K, 1) factors of a step of the runs in ``gate`` (made once per gate and
        hyperparameters: no small tensors are made at every step)."""
        self.refresh()
        if gate not in self.vectors_by_gate:
            on = torch.tensor(gate, device=self.device)
            self.vectors_by_gate[gate] = {
                pattern: {"gate": on.to(self.dtype)[:, None],
                          "lr": torch.where(on, vectors["lr"], 0)[:, None],
                          "momentum": torch.where(on, vectors["momentum"], 1)[:, None],
                          "nesterov_momentum": vectors["momentum"][:, None],
                          "weight_decay": vectors["weight_decay"][:, None]}
                for pattern, vectors in self.vectors.items()}
        return self.vectors_by_gate[gate]

    @torch.no_grad()
    def step(self, gate: tuple[bool, ...]) -> None:
        """One SGD step of the runs k with ``gate[k]``; the others do not move."""
        factors = self.gated(tuple(bool(g) for g in gate))
        clip = self.clip_coefficients() if any(c for c in self.grad_clip) else None
        for name, param in self.params:
            if param.grad is None:
                continue
            v = factors[self.groups[name]]
            p, buf, g = param.view(self.runs, -1), self.buffers[name].view(self.runs, -1), param.grad.view(self.runs, -1)
            if clip is not None:
                g = g * clip
            if self.decay:
                g = g.addcmul(p, v["weight_decay"])
            buf.mul_(v["momentum"]).addcmul_(g, v["gate"])
            direction = g.addcmul(buf, v["nesterov_momentum"]) if self.nesterov else buf
            p.addcmul_(direction, v["lr"], value=-1)

    def clip_coefficients(self) -> torch.Tensor:
        """(K, 1): per run, ``torch.nn.utils.clip_grad_norm_``'s factor min(1, max_norm / (norm + 1e-6)) over
        that run's gradients (1 for a run without grad_clip)."""
        squares = torch.zeros(self.runs, device=self.device, dtype=self.dtype)
        for _, param in self.params:
            if param.grad is not None:
                squares += param.grad.view(self.runs, -1).square().sum(1)
        limits = torch.tensor([c if c else float("inf") for c in self.grad_clip], device=self.device, dtype=self.dtype)
        return (limits / (squares.sqrt() + 1e-6)).clamp(max=1.0)[:, None]

    # ---------------------------------------------------------------- one run's state

    @torch.no_grad()
    def write_back(self, k: int) -> torch.optim.Optimizer:
        """Run k's momentum buffers into its own optimizer (``optimizers[k].state``); returns that optimizer."""
        optimizer = self.optimizers[k]
        for name, _ in self.params:
            own = self.run_params[name][k]
            optimizer.state[own]["momentum_buffer"] = self.block(self.buffers[name], k).view_as(own).clone()
        return optimizer

    @torch.no_grad()
    def read_back(self, k: int) -> None:
        """Take run k's momentum buffers from its own optimizer (after ``optimizer.load_state_dict``)."""
        for name, _ in self.params:
            state = self.optimizers[k].state.get(self.run_params[name][k], {})
            buffer = state.get("momentum_buffer")
            target = self.block(self.buffers[name], k)
            target.copy_(buffer.reshape(-1) if buffer is not None else torch.zeros_like(target))

    @torch.no_grad()
    def clear_nonfinite(self, k: int) -> None:
        """Replace non-finite values of run k's momentum by 0 (a diverged run taken out of the stack)."""
        for name, _ in self.params:
            self.block(self.buffers[name], k).nan_to_num_(0.0, 0.0, 0.0)
