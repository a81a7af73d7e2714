"""Where one training step of the default run spends its time, and how far its convolutions are from the CPU's peak.

    python scripts/profile_step.py                       # the default run's step: norm=bn, batch 1, 256x256
    python scripts/profile_step.py -- norm=iln trainer.batch_size=8   # any train.py overrides after --
    python scripts/profile_step.py --size 32 --steps 1 --out /tmp/p.md  # a quick check that it works

The step is the trainer's own: the configuration is ``configs/train.yaml`` with the overrides (composed as
``train.py`` composes it), the model, optimizer, loss and memory format are built by the trainer's functions,
and each profiled step is ``seg.training.augment.augment_batch`` (the default run's rotation) then
``seg.training.step.train_step`` (forward, loss, backward, optimizer step) on a batch of random images and
labels of the configured size (the data's values do not change the work; loading them is not part of a step).

``torch.profiler`` records ``--steps`` steps after ``--warmup`` unprofiled ones. Every operator's own time
(self CPU time) is assigned to a phase -- augmentation, forward (with the loss), backward, optimizer -- by the
profiler's nesting (backward operators run under the autograd engine's ``evaluate_function``, the optimizer's
under ``Optimizer.step``), and to a kind: a convolution operator (forward or backward) is a convolution
wherever it runs; any other operator is normalization when it runs inside a normalization layer's forward,
or in the backward node that such an operator created (matched by the autograd sequence number), and
"other" elsewhere (ReLU, pooling, concatenation, the loss).

The step's FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, forward and backward; element-wise work is not counted) and divided by the step's time measured
without the profiler (median of ``--rounds`` steps); the CPU's peak is measured as the rate of a float32
``torch.mm`` of ``--matmul-size`` square matrices (median of its rounds) in the same process and threads.
Writes docs/results/profile_step.md (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from harness import ROOT, markdown_table, write_result
from seg.config.launch import register_configs
from seg.model.build import build_model
from seg.norms import NORMS
from seg.runtime.device import autocast_context, resolve_precision
from seg.data.augmentations import augmentation_of
from seg.training.augment import augment_batch
from seg.training.losses import build_loss
from seg.training.optimizers import build_optimizer
from seg.training.step import TrainStep, train_step

NORMALIZATION, CONVOLUTION, OTHER = "normalization", "convolution", "other"
PHASES = ("augmentation", "forward", "backward", "optimizer")
_LABEL = "module: "  # the profiler ranges this script opens around the normalization layers' forward


def compose(overrides: list[str]):
    """configs/train.yaml with ``overrides``, as train.py composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return hydra_compose(config_name="train", overrides=overrides)


def is_normalization(module: nn.Module) -> bool:
    """A normalization layer: a registered layer class, a pair that replaces conv + norm, or torch's own norms."""
    return (isinstance(module, tuple(NORMS.values())) or type(module).__module__.startswith("seg.norms.")
            or isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)))


def label_normalization_layers(model: nn.Module) -> None:
    """Open a profiler range ``module: normalization`` around the forward of every outermost normalization layer."""
    def outermost(module):
        if is_normalization(module):
            yield module
            return
        for child in module.children():
            yield from outermost(child)

    ranges = []

    def enter(module, args):
        ranges.append(record_function(_LABEL + NORMALIZATION))
        ranges[-1].__enter__()

    def leave(module, args, output):
        ranges.pop().__exit__(None, None, None)

    for layer in outermost(model):
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)


def build_step(cfg, size: int, device: torch.device):
    """The default run's model, optimizer and step, and a function running one augmented step on a random batch."""
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = build_model(cfg).to(device).to(memory_format=memory_format).train()
    optimizer = build_optimizer(model, cfg.optim)
    step = TrainStep.of(model, optimizer, build_loss(cfg.loss), autocast=autocast_context(
        device, resolve_precision(cfg.trainer.precision, device)), memory_format=memory_format,
        aux_weight=cfg.model.aux_weight, grad_clip=cfg.optim.grad_clip)
    n = cfg.trainer.batch_size
    images = torch.randn(n, cfg.model.in_channels, size, size, device=device)
    labels = torch.randint(0, 2, (n, size, size), device=device)
    domains = torch.zeros(n, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    augment = augmentation_of(cfg.data.augment)  # the run's augmentation, its preset applied

    def one_step():
        with record_function("augmentation"):
            batch_images, batch_labels = augment_batch(images, labels, augment, generator=generator)
        return train_step(step, batch_images, batch_labels, domains)

    return model, one_step


def classify(events) -> tuple[dict, dict]:
    """Self CPU time (us) per (phase, kind), and per operator name, over the profiled events."""
    forward_kind: dict[int, str] = {}  # autograd sequence number -> the kind of the forward op that made the node

    def ancestors(event):
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    def place(event):
        phase, kind, node = "forward", OTHER, None
        for parent in ancestors(event):
            if parent.name.startswith("autograd::engine::evaluate_function"):
                phase, node = "backward", parent
            elif parent.name.startswith("Optimizer."):
                phase = "optimizer"
            elif parent.name == "augmentation":
                phase = "augmentation"
            elif parent.name.startswith(_LABEL) and phase == "forward":
                kind = parent.name[len(_LABEL):]
        return phase, kind, node

    placed = {}
    for event in events:  # forward first: the kinds of the autograd nodes the forward ops created
        phase, kind, node = place(event)
        placed[id(event)] = (phase, kind, node)
        if phase == "forward" and getattr(event, "sequence_nr", -1) >= 0 and kind == NORMALIZATION:
            forward_kind[event.sequence_nr] = NORMALIZATION
    shares: dict[tuple[str, str], float] = defaultdict(float)
    operators: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.name.startswith(_LABEL) or event.name == "augmentation" or event.name == "profiled step":
            continue
        phase, kind, node = placed[id(event)]
        if phase == "backward" and node is not None:
            kind = forward_kind.get(node.sequence_nr, OTHER)
        if "conv" in event.name.lower() and not event.name.startswith("autograd::"):
            kind = CONVOLUTION
        shares[(phase, kind)] += event.self_cpu_time_total
        operators[event.name][0] += event.self_cpu_time_total
        operators[event.name][1] += 1
    return shares, operators


def matmul_peak(size: int, rounds: int) -> float:
    """FLOP/s of a float32 ``torch.mm`` of two size x size matrices: the median of ``rounds``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="image size (default: the data's, 256)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps (without the profiler) for FLOP/s")
    parser.add_argument("--matmul-size", type=int, default=2048, help="the peak's square matrices")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(args.overrides)
    device = torch.device("cpu")
    size = args.size or cfg.data.image_size
    model, one_step = build_step(cfg, size, device)
    for _ in range(args.warmup):
        one_step()

    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    with FlopCounterMode(display=False) as counter:
        one_step()
    flops = counter.get_total_flops()
    peak = matmul_peak(args.matmul_size, max(args.rounds, 3))

    label_normalization_layers(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("profiled step"):
                one_step()
    shares, operators = classify(prof.events())
    total = sum(shares.values())
    per_step = 1e-3 / args.steps  # us over all profiled steps -> ms per step

    rows = []
    for phase in PHASES:
        kinds = [NORMALIZATION, CONVOLUTION, OTHER] if phase in ("forward", "backward") else [None]
        for kind in kinds:
            value = (sum(v for (p, _), v in shares.items() if p == phase) if kind is None
                     else shares.get((phase, kind), 0.0))
            rows.append([phase if kind is None else f"{phase}: {kind}", f"{value * per_step:.1f}",
                         f"{100 * value / total:.1f}"])
    kinds = {kind: sum(v for (p, k), v in shares.items() if k == kind and p in ("forward", "backward"))
             for kind in (CONVOLUTION, NORMALIZATION, OTHER)}
    kinds.update({phase: sum(v for (p, _), v in shares.items() if p == phase) for phase in ("augmentation",
                                                                                              "optimizer")})
    rows += [[f"**all {kind}**", f"{value * per_step:.1f}", f"{100 * value / total:.1f}"]
             for kind, value in kinds.items()]
    largest = max(kinds, key=kinds.get)
    top = sorted(operators.items(), key=lambda item: -item[1][0])[:args.top]
    op_rows = [[name, f"{calls / args.steps:.0f}", f"{us * per_step:.2f}", f"{100 * us / total:.1f}"]
               for name, (us, calls) in top]
    achieved = flops / step_s
    summary = (f"Largest cost: **{largest}** ({100 * kinds[largest] / total:.0f}% of the profiled step's operator "
               f"time); the largest single operator: `{top[0][0]}` ({100 * top[0][1][0] / total:.0f}%).\n\n"
               f"Step time without the profiler: {1000 * step_s:.1f} ms (median of {args.rounds}); "
               f"{flops / 1e9:.3g} GFLOP per step (convolutions and matrix products, forward and backward): "
               f"**{achieved / 1e9:.3g} GFLOP/s**, against a matmul peak of {peak / 1e9:.3g} GFLOP/s "
               f"({args.matmul_size}x{args.matmul_size} float32 `torch.mm`): **{100 * achieved / peak:.1f}%** "
               f"of the peak.")
    body = ("## Summary\n\n" + summary + "\n\n## By phase and kind (self CPU time per step)\n\n"
            + markdown_table(["phase: kind", "ms / step", "% of step"], rows)
            + f"\n## The {args.top} largest operators (self CPU time per step)\n\n"
            + markdown_table(["operator", "calls / step", "ms / step", "% of step"], op_rows))
    print(body)
    about = (f"One training step of `python train.py {' '.join(args.overrides)}` (norm={cfg.norm.name}, batch "
             f"{cfg.trainer.batch_size}, {size}x{size}, channels_last={cfg.trainer.channels_last}) on the CPU with "
             f"{torch.get_num_threads()} threads: augmentation then `seg.training.step.train_step`, profiled by "
             f"operator over {args.steps} steps after {args.warmup} warm-up steps.")
    write_result("profile_step", "One training step of the default run, by operator", body, about, args.out)


if __name__ == "__main__":
    main()
