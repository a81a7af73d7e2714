"""K U-Nets of one architecture as one network: every run's channels side by side on the channel axis.

A stacked tensor is (N, K*C, H, W): run k's C channels are k*C .. (k+1)*C - 1, its batch is the
same N positions (each run its own images). On that layout

* a convolution of K runs is one grouped convolution (``groups=K``; weight (K*C_out, C_in, k, k),
  run k's kernels in rows k*C_out..; a transposed one (K*C_in, C_out, k, k)): ``StackedConv``;
* a normalization layer of K runs is the registered layer built with ``runs=K`` over K*C
  channels (``seg.norms``: the layers that declare ``can_stack`` keep every statistic inside
  each run's block);
* ReLU and max-pooling are elementwise / per channel already;
* the U-Net's skip concatenation is per run: (N, K, C1) and (N, K, C2) -> (N, K, C1 + C2)
  (``concat_runs``), so that each run's input channels stay one block for the next grouped conv.

So every parameter and buffer of the stacked network is the concatenation of the K runs' tensors
on the first axis, under the same name as in the single-run ``UNet``; ``run_state_dict(k)`` is
run k's ordinary state_dict and ``load_run_state_dict`` its inverse. Nothing couples two runs: a
non-finite value of one run stays in that run's channels.

How a convolution runs (``StackedConv.mode``) does not change what it computes: ``grouped`` (one
grouped convolution), ``channels_last`` (the same, on a channels-last input: oneDNN's fastest form
for wide maps on CPU), ``loop`` (one convolution per run) or ``matmul`` (not transposed
convolutions: im2col and one batched matrix product over the runs, which beats grouped kernels on
the tiny maps of the deepest levels). ``tune_convolutions`` times them on the real shapes and keeps
the fastest per layer (docs/stacking.md has the figures).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...norms import ConvNorm, make_norm, names, spec
from ...model.unet import TransposeConv3, UNet, down_and_up

CONV_MODES = ("grouped", "channels_last", "loop", "matmul")


class StackError(ValueError):
    """Runs that cannot be stacked together (the message names what differs or what is not supported)."""


def concat_runs(tensors: list[torch.Tensor], runs: int) -> torch.Tensor:
    """Concatenate stacked (N, K*C_i, H, W) tensors per run: (N, K*sum(C_i), H, W), run k's channels together."""
    n, _, h, w = tensors[0].shape
    return torch.cat([t.reshape(n, runs, -1, h, w) for t in tensors], dim=2).view(n, -1, h, w)


class StackedConv(nn.Module):
    """K convolutions (or transposed convolutions) of one shape, one per run, as one module.

    ``weight`` and ``bias`` are the runs' tensors concatenated on the first axis; the input is
    (N, K*C_in, H, W), the output (N, K*C_out, H', W'). A ``TransposeConv3`` keeps its crop to
    exactly 2H x 2W. ``mode`` chooses how it runs (see the module docstring), never what it computes.
    """

    def __init__(self, convs: list[nn.Module]):
        super().__init__()
        first = convs[0]
        if not isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)) or any(type(c) is not type(first) for c in convs):
            raise StackError(f"cannot stack {type(first).__name__} layers: only plain convolutions")
        geometry = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     getattr(c, "output_padding", None), c.padding_mode, c.bias is not None) for c in convs]
        if any(g != geometry[0] for g in geometry) or first.groups != 1 or first.padding_mode != "zeros":
            raise StackError(f"cannot stack {type(first).__name__} layers of different shapes, grouped or "
                             f"non-zero-padded: {geometry[0]}")
        if any(hasattr(c, "parametrizations") for c in convs):
            raise StackError("cannot stack re-parametrized convolutions (weight normalization)")
        self.runs, self.transposed = len(convs), isinstance(first, nn.ConvTranspose2d)
        self.crop = isinstance(first, TransposeConv3)  # TensorFlow's 'same' geometry: exactly 2H x 2W
        self.in_channels, self.out_channels = first.in_channels, first.out_channels  # of one run
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.output_padding = getattr(first, "output_padding", (0, 0))
        # contiguous whatever the runs' layout (the trainer's models are channels-last): a run is a block of rows
        self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]).contiguous())
        self.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs])) if first.bias is not None else None
        self.mode = "grouped"

    def extra_repr(self) -> str:
        kind = "transposed " if self.transposed else ""
        return (f"{self.runs} runs x {kind}{self.in_channels} -> {self.out_channels}, "
                f"kernel {tuple(self.weight.shape[-2:])}, stride {self.stride}, mode={self.mode}")

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this convolution can run in (``matmul``: not for transposed ones)."""
        return tuple(m for m in CONV_MODES if not (m == "matmul" and self.transposed))

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.convolve(x, self.weight, self.bias, self.mode)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> torch.Tensor:
        """The stacked convolution of ``x`` with these weights, run as ``mode``."""
        if mode == "matmul" and not self.transposed:
            return self.matmul(x, weight, bias)
        if mode == "loop":
            biases = bias.chunk(self.runs) if bias is not None else [None] * self.runs
            out = torch.cat([self.single(part, w, b, 1) for part, w, b in
                             zip(x.chunk(self.runs, 1), weight.chunk(self.runs), biases)], dim=1)
        else:
            layout = torch.channels_last if mode == "channels_last" else torch.contiguous_format
            out = self.single(x.contiguous(memory_format=layout), weight, bias, self.runs)
        if self.crop:
            height, width = x.shape[-2:]
            out = out[..., : 2 * height, : 2 * width]
        return out

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution as im2col (``unfold``) and one batched matrix product over the runs."""
        n, _, h, w = x.shape
        runs, (kh, kw) = self.runs, weight.shape[-2:]
        cols = F.unfold(x.reshape(n * runs, -1, h, w), (kh, kw), dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # (n K, C_in kh kw, L)
        length = cols.shape[-1]
        cols = cols.view(n, runs, -1, length).permute(1, 2, 0, 3).reshape(runs, -1, n * length)
        kernels = weight.reshape(runs, self.out_channels, -1)
        out = torch.bmm(kernels, cols) if bias is None else torch.baddbmm(bias.view(runs, -1, 1), kernels, cols)
        height = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        width = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        out = out.view(runs, self.out_channels, n, height, width).permute(2, 0, 1, 3, 4)
        return out.reshape(n, runs * self.out_channels, height, width)

    def single(self, x, weight, bias, groups: int) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, groups,
                                      self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A layer's settings as attributes (eps, momentum, groups, ...), for comparing two instances."""
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str, tuple))}


def stack_norm(layers: list[nn.Module], num_channels: int, norm, norm_options: dict, like: torch.Tensor) -> nn.Module:
    """One layer ``norm`` with ``runs=K`` over K * num_channels channels, holding the K runs' layers.

    Each run's layer must be the one that ``norm_options`` build (same class and settings: eps,
    groups, momentum...); its parameters and buffers are concatenated on the first axis. The layer
    is made on the device and in the floating-point type of ``like``.
    """
    single = make_norm(norm, num_channels, **norm_options)
    for k, layer in enumerate(layers):
        if type(layer) is not type(single) or plain_attributes(layer) != plain_attributes(single):
            raise StackError(f"run {k}'s {type(layer).__name__} is not the layer that norm={spec(norm).name} with "
                             f"{norm_options} builds ({plain_attributes(layer)} != {plain_attributes(single)}); "
                             f"stacked runs share the norm and its options")
    stacked = make_norm(norm, len(layers) * num_channels, runs=len(layers), **norm_options).to(like.device, like.dtype)
    states = [layer.state_dict() for layer in layers]
    with torch.no_grad():
        for key, tensor in stacked.state_dict(keep_vars=True).items():
            if tensor.ndim == 0:  # a counter (num_batches_tracked): kept per run by the StackedUNet
                continue
            tensor.copy_(torch.cat([state[key] for state in states]))
    return stacked


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def stack_modules(modules: list[nn.Module], norm, norm_options: dict) -> nn.Module:
    """The stacked counterpart of the K runs' same-named submodules (a shallow copy of the container
    whose stateful leaves are stacked: conv + norm pairs, convolutions; stateless modules copied)."""
    first = modules[0]
    if isinstance(first, ConvNorm):
        conv = StackedConv([m.conv for m in modules])
        layers = [m.norm for m in modules]
        return ConvNorm(conv, stack_norm(layers, first.conv.out_channels, norm, norm_options, conv.weight))
    if isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)):
        return StackedConv(modules)
    if not _owns_state(first):
        return copy.deepcopy(first)  # ReLU, max-pooling, the image conditioner
    if first._parameters or first._buffers or not first._modules:
        raise StackError(f"cannot stack {type(first).__name__}: a layer with its own state that seg.training.stacked does "
                         f"not know how to stack")
    stacked = copy.copy(first)
    stacked._parameters, stacked._buffers, stacked._modules = {}, {}, {}
    for name in first._modules:
        stacked._modules[name] = stack_modules([m._modules[name] for m in modules], norm, norm_options)
    return stacked


class StackedUNet(nn.Module):
    """K runs' ``UNet`` (one architecture, one norm, its own weights each) as one network.

    ``forward(x)``: x (N, K*C_in, H, W) -> logits (N, K*classes, H, W), run k's in block k. Built
    from the K models (their current weights and buffers are copied in); the submodules carry the
    UNet's names, so ``run_state_dict(k)`` has exactly the keys of ``UNet.state_dict()``.

    ``steps`` (K,) counts the training steps each run has taken here; a run's BN counter
    (``num_batches_tracked``) is its count at stacking time plus that.
    """

    def __init__(self, models: list[UNet], norm_options: dict | None = None):
        super().__init__()
        if not models or any(not isinstance(m, UNet) for m in models):
            raise StackError("a stack is built from one or more seg.model.unet.UNet models")
        first = models[0]
        norm = first.norm
        found = spec(norm)
        if not found.can_stack:
            raise StackError(f"norm={found.name} cannot be stacked; the layers that can: "
                             f"{', '.join(names(can_stack=True))} (docs/stacking.md says why the others cannot)")
        shapes = {key: tuple(t.shape) for key, t in first.state_dict().items()}
        for k, model in enumerate(models[1:], 1):
            other = {key: tuple(t.shape) for key, t in model.state_dict().items()}
            if other != shapes or model.norm != norm or (model.depth, model.up_mode) != (first.depth, first.up_mode):
                raise StackError(f"run {k}'s U-Net differs from run 0's (architecture or norm); stacked runs share "
                                 f"the model and the norm")
        norm_options = dict(norm_options or {})
        self.runs, self.depth, self.norm = len(models), first.depth, norm
        self.run_shapes = shapes
        for name in ("conditioner", "down", "pool", "upsample", "up", "head"):
            setattr(self, name, stack_modules([getattr(m, name) for m in models], norm, norm_options))
        device = next(first.parameters()).device
        self.to(device=device, dtype=next(first.parameters()).dtype)
        # each counter of the single-run layers, per run, at stacking time
        self.counters = {key: torch.stack([m.state_dict()[key] for m in models]).to(device)
                         for key, shape in shapes.items() if shape == ()}
        self.register_buffer("steps", torch.zeros(self.runs, dtype=torch.long, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if x.ndim != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple or x.shape[1] % self.runs:
            raise ValueError(f"a stack of {self.runs} U-Nets of depth {self.depth} needs (N, {self.runs}*C, H, W) "
                             f"input with H and W multiples of {multiple}; got shape {tuple(x.shape)}")
        cond = self.conditioner(x, None)  # stackable layers read no condition
        return self.head(down_and_up(self, x, cond, join=lambda skip, x: concat_runs([skip, x], self.runs)))

    # ---------------------------------------------------------------- one run's state

    def run_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's weights and buffers as ``UNet.state_dict()`` (same keys, shapes; copies)."""
        state = {}
        for key, tensor in self.state_dict().items():
            if key == "steps":
                continue
            shape = self.run_shapes[key]
            if shape == ():
                state[key] = (self.counters[key][k] + self.steps[k]).clone()
            else:
                state[key] = tensor.view(self.runs, *shape)[k].clone()
        return state

    @torch.no_grad()
    def load_run_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Put an ordinary ``UNet`` state_dict (run k's) into block k."""
        own = self.state_dict(keep_vars=True)
        if set(state) != set(self.run_shapes):
            raise StackError(f"run {k}'s state does not fit this stack: missing "
                             f"{sorted(set(self.run_shapes) - set(state))[:5]}, unexpected "
                             f"{sorted(set(state) - set(self.run_shapes))[:5]}")
        for key, shape in self.run_shapes.items():
            value = state[key]
            if tuple(value.shape) != shape:
                raise StackError(f"run {k}'s {key} has shape {tuple(value.shape)}, the stack holds {shape}")
            if shape == ():
                self.counters[key][k] = value.to(self.counters[key].device) - self.steps[k]
            else:
                own[key].view(self.runs, *shape)[k].copy_(value)


# ---------------------------------------------------------------------------- choosing how convolutions run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(conv: StackedConv, shape: tuple[int, ...], mode: str, repeats: int, needs_input_grad: bool) -> float:
    """The fastest of ``repeats`` forward + backward passes of ``conv`` run as ``mode`` on a random input."""
    device, dtype = conv.weight.device, conv.weight.dtype
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=needs_input_grad)
    weight = conv.weight.detach().requires_grad_()
    bias = conv.bias.detach().requires_grad_() if conv.bias is not None else None
    best = float("inf")
    for attempt in range(repeats + 1):  # the first is a warm-up
        synchronize(device)
        started = time.perf_counter()
        out = conv.convolve(x, weight, bias, mode)
        out.backward(torch.ones_like(out))
        synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


def tune_convolutions(model: StackedUNet, example: torch.Tensor, repeats: int = 3,
                      modes: tuple[str, ...] = CONV_MODES, margin: float = 0.1) -> dict[str, dict[str, float]]:
    """Set each convolution's ``mode`` to the fastest of ``modes`` on this machine, at the shapes of
    ``example`` (a stacked input); returns the times (s) per layer and mode. A mode replaces
    ``grouped`` only if it is faster by more than ``margin`` (a fraction: timing noise of a shared
    machine should not decide). Call it in the forward pass's autocast context, if any, so that the
    convolutions are timed in the precision they will run in. The weights, buffers and results are
    unchanged (every mode computes the same)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(module, args) -> None:
            shapes[name] = tuple(args[0].shape)
        return record

    hooks = [module.register_forward_pre_hook(recorder(name))
             for name, module in model.named_modules() if isinstance(module, StackedConv)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    times = {}
    for name, module in model.named_modules():
        if isinstance(module, StackedConv):
            first_layer = name == "down.0.first.conv_norm.conv"  # the input needs no gradient
            times[name] = {mode: time_mode(module, shapes[name], mode, repeats, not first_layer)
                           for mode in modes if mode in module.modes}
            fastest = min(times[name], key=times[name].get)
            baseline = times[name].get("grouped", float("inf"))
            module.mode = fastest if times[name][fastest] < (1 - margin) * baseline else "grouped"
    return times


def conv_modes(model: nn.Module) -> dict[str, str]:
    """How each stacked convolution runs."""
    return {name: m.mode for name, m in model.named_modules() if isinstance(m, StackedConv)}
