"""Stacked runs (seg.training.stacked) against the same runs one after another: image-steps per second.

    python scripts/bench_stacked.py                          # CPU: 64x64, depth 4; writes docs/results/stacked.md
    python scripts/bench_stacked.py --device cuda            # GPU: 256x256, the paper's U-Net (depth 5, transpose3)
    python scripts/bench_stacked.py --smoke --out /tmp/x.md  # a few seconds: checks that it runs

A training step is what the trainer does for one batch of one run: gather the batch, augment it with
the run's own generator, forward, cross-entropy, backward, SGD with momentum, BIN's clip. K runs
differ in learning rate and seed (initial weights, order, augmentation draws). Measured:

* sequential: K runs trained one after another, each as the trainer trains it (``augment_batch``,
  the trainer's default channels-last model, ``torch.optim.SGD``);
* stacked: the K runs as one ``seg.training.stacked.Stack`` (``train_step`` on ``RunFeed``s), with each
  convolution's mode chosen by ``tune_convolutions`` (the time this takes is reported), and for the
  design comparison also with grouped convolutions everywhere (untuned);
* torch.func (the other design, for the comparison only): the K models' parameters stacked by
  ``stack_module_state``, one ``vmap``-ed ``functional_call`` per step, the same per-run SGD.

The variants are timed in interleaved rounds (each round a few steps of each), and the median
round is reported, so that other work on a shared machine slows them alike. The result is one
image-step per run per step; the projected wall time of the ILN study's grid is its 1.24 million
image-steps at that rate -- a projection from this measurement, not a measured sweep (data
loading once per run, validation and checkpoints are not part of it).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import write_result
from seg.data.augmentations import Augmentation
from seg.training.augment import augment_batch
from seg.training.ordering import epoch_order
from seg.training.step import TrainStep, train_step
from seg.training.stacked import RunFeed, Stack, augmented_batches, conv_modes
from seg.model.unet import UNet

AUGMENTATION = Augmentation(rotate_deg=15.0, flip=True)
GRID_IMAGE_STEPS = 1.24e6  # experiment=iln_paper: 360 runs x 2 epochs over the paper-size training sets
TARGET_RUNS, TARGET_RATIO = 8, 2.0  # the CPU target: 64x64, K = 8, stacked >= 2x sequential


# ---------------------------------------------------------------------------- data and runs


def phantom_like(count: int, size: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` z-scored images (count, 1, size, size) of a bright ellipse in a noisy darker disc, and
    its mask as labels (count, size, size) uint8: the phantom's shape statistics without its generator."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for _ in range(count):
        cx, cy, a, b = (torch.rand(4, generator=g) * torch.tensor([0.4, 0.4, 0.25, 0.25])
                        + torch.tensor([-0.2, -0.2, 0.1, 0.1]))
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
        body = xx**2 + yy**2 < 0.8
        image = body.float() * 0.5 + inside.float() + 0.2 * torch.randn(size, size, generator=g)
        images.append((image - image.mean()) / image.std())
        labels.append(inside.to(torch.uint8))
    return torch.stack(images)[:, None].to(device), torch.stack(labels).to(device)


class Runs:
    """K runs built as the trainer builds them: UNet seeded with the run's seed, SGD momentum 0.9, their
    generators; all train on one pool of slices (each in its own order)."""

    def __init__(self, runs: int, args, device):
        self.images, self.labels = phantom_like(args.slices, args.size, 0, device)
        self.models, self.optimizers, self.generators = [], [], []
        for k in range(runs):
            torch.manual_seed(k)
            model = UNet(norm=args.norm, depth=args.depth, up=args.up).to(device)
            self.models.append(model)
            self.optimizers.append(torch.optim.SGD(model.parameters(), lr=0.01 * (k + 1) / runs, momentum=0.9))
            self.generators.append(torch.Generator(device=device).manual_seed(k))

    def clone(self) -> Runs:
        twin = copy.copy(self)
        twin.models = [copy.deepcopy(m) for m in self.models]
        twin.optimizers = [torch.optim.SGD(m.parameters(), lr=o.param_groups[0]["lr"], momentum=0.9)
                           for m, o in zip(twin.models, self.optimizers)]
        twin.generators = [torch.Generator(device=g.device).manual_seed(k) for k, g in enumerate(self.generators)]
        return twin

    def feeds(self, args) -> list[RunFeed]:
        return [RunFeed(self.images, self.labels, batch_size=1, epochs=10**9, generator=g,
                        augmentation=AUGMENTATION)
                for g in self.generators]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def sequential(runs: Runs, args, device):
    """One round: ``args.steps`` trainer steps of each run, one run after the other."""
    models = [m.to(memory_format=torch.channels_last) for m in runs.models]  # the trainer's default
    orders = [epoch_order(len(runs.images), g, None, device) for g in runs.generators]
    steps = [TrainStep.of(model, optimizer, F.cross_entropy, autocast=autocast(device, args.precision),
                          memory_format=torch.channels_last, conditioned=False)
             for model, optimizer in zip(models, runs.optimizers)]
    cursor = [0] * len(models)

    def round_():
        for k, (model, step) in enumerate(zip(models, steps)):
            model.train()
            for _ in range(args.steps):
                batch = orders[k][cursor[k] % len(orders[k])].view(1).to(device)
                cursor[k] += 1
                images, labels = augment_batch(runs.images[batch], runs.labels[batch], AUGMENTATION,
                                               generator=runs.generators[k])
                train_step(step, images, labels)
        synchronize(device)
    return round_


def stacked(runs: Runs, args, device, tune: bool):
    """One round: ``args.steps`` steps of the stack of all runs. Tuning (if asked) happens here, once."""
    stack = Stack(runs.models, runs.optimizers, autocast=autocast(device, args.precision))
    feeds = runs.feeds(args)
    tuning = 0.0
    if tune:
        started = time.perf_counter()
        stack.tune(torch.zeros(1, len(feeds), args.size, args.size, device=device))
        tuning = time.perf_counter() - started

    def round_():
        for _ in range(args.steps):
            stack.train_step(feeds)
        synchronize(device)
    round_.tuning, round_.modes = tuning, conv_modes(stack.model)
    return round_


def functorch(runs: Runs, args, device):
    """The other design: torch.func's stack_module_state + vmap(functional_call), per-run SGD on the (K, ...)
    parameters (no gate, no divergence handling: the comparison is of the computation only)."""
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(runs.models)
    base = copy.deepcopy(runs.models[0]).to("meta")
    count = len(runs.models)
    lrs = torch.tensor([o.param_groups[0]["lr"] for o in runs.optimizers], device=device)
    momentum = {name: torch.zeros_like(p) for name, p in params.items()}
    feeds = runs.feeds(args)
    post_step = [(name.rsplit(".", 1)[0]) for name in params if name.endswith(".rho") and args.norm == "bin"]

    def loss_of(p, b, images, labels):
        logits = functional_call(base, (p, b), (images,))
        return F.cross_entropy(logits.float(), labels.long())

    def round_():
        for _ in range(args.steps):
            images, labels = augmented_batches(feeds)
            for feed in feeds:
                feed.advance()
            n, _, h, w = images.shape
            images = images.view(n, count, 1, h, w).transpose(0, 1)
            with autocast(device, args.precision):
                losses = vmap(loss_of)(params, buffers, images, labels.transpose(0, 1))
            for p in params.values():
                p.grad = None
            losses.sum().backward()
            with torch.no_grad():
                for name, p in params.items():
                    buf = momentum[name]
                    buf.mul_(0.9).add_(p.grad)
                    p.sub_(lrs.view(-1, *[1] * (p.ndim - 1)) * buf)
                for prefix in post_step:  # BIN's clip
                    params[f"{prefix}.rho"].clamp_(0.0, 1.0)
        synchronize(device)
    return round_


# ---------------------------------------------------------------------------- timing


def interleaved(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each variant, their rounds interleaved (after one warm-up round each)."""
    for fn in variants.values():
        fn()
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def rate(image_steps: int, seconds: list[float]) -> float:
    """Image-steps per second of the median round."""
    return image_steps / statistics.median(seconds)


def best(image_steps: int, seconds: list[float]) -> float:
    """Image-steps per second of the fastest round (the least disturbed by other work on the machine)."""
    return image_steps / min(seconds)


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def mode_summary(modes: dict[str, str]) -> str:
    counts = {}
    for mode in modes.values():
        counts[mode] = counts.get(mode, 0) + 1
    return ", ".join(f"{mode} {n}" for mode, n in sorted(counts.items()))


# ---------------------------------------------------------------------------- the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16, 64], help="the stack sizes K")
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--design-norms", nargs="*", default=["bn", "iln", "bin"],
                        help="norms of the design comparison (torch.func vs channel folding) at K = 8")
    parser.add_argument("--size", type=int, help="image size (default: 64 on CPU, 256 on CUDA)")
    parser.add_argument("--depth", type=int, help="U-Net depth (default: 4 on CPU, the model's default; 5 on CUDA)")
    parser.add_argument("--up", help="up-convolution (default: transpose2 on CPU; transpose3 on CUDA, the paper's)")
    parser.add_argument("--precision", help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA, as trainer.precision=auto)")
    parser.add_argument("--steps", type=int, default=2, help="steps per run per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--slices", type=int, default=64, help="slices in the synthetic pool")
    parser.add_argument("--paper-runs", type=int, default=8,
                        help="CPU only: also time K runs at the paper's size (256x256, depth 5, transpose3), "
                             "2 rounds of 1 step, for the grid projection at that size (0: skip)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that the script runs")
    parser.add_argument("--out", default=None, help="the page (default docs/results/stacked.md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.size = args.size or (256 if gpu else 64)
    args.depth = args.depth or (5 if gpu else 4)
    args.up = args.up or ("transpose3" if gpu else "transpose2")
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if args.smoke:
        args.size, args.depth, args.runs, args.steps, args.rounds, args.slices = 32, 2, [1, 2], 1, 1, 4
        args.design_norms = args.design_norms[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True  # both variants: cuDNN picks its algorithms per shape
    started, load_before = time.perf_counter(), os.getloadavg()[0]

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    params = sum(p.numel() for p in UNet(norm=args.norm, depth=args.depth, up=args.up).parameters())
    setting = (f"{args.size}x{args.size} input, batch 1, U-Net depth {args.depth} ({params / 1e6:.2f} M parameters), "
               f"up={args.up}, {args.precision}, norm={args.norm}, augmentation (rotation 15 deg, flips), SGD momentum 0.9")
    title = f"Stacked runs: image-steps per second ({device.type.upper()})"
    lines = ["`scripts/bench_stacked.py`: K training runs of one U-Net stacked into one computation "
             "(`seg.training.stacked`) against the same K runs trained one after another as the trainer trains them. "
             "A step is: gather, augment, forward, cross-entropy, backward, SGD; each run takes one image per step. "
             f"Median of {args.rounds} interleaved rounds of {args.steps} steps per run (best: the fastest round, "
             "the least disturbed by other work on a shared machine). The grid projection is "
             f"{GRID_IMAGE_STEPS:.3g} image-steps (experiment=iln_paper) at the measured rate: a projection, "
             "not a measured sweep.", "", f"Setting: {setting}.", ""]

    # ---- the two designs, at K = 8
    design_runs = 2 if args.smoke else TARGET_RUNS
    lines += [f"## The two designs at K = {design_runs}", "",
              "| norm | sequential | torch.func (vmap) | channel folding, grouped convs | channel folding, tuned convs |",
              "|---|---|---|---|---|"]
    for norm in args.design_norms:
        base = Runs(design_runs, argparse.Namespace(**{**vars(args), "norm": norm}), device)
        variants = {"sequential": sequential(base.clone(), args, device),
                    "vmap": functorch(base.clone(), argparse.Namespace(**{**vars(args), "norm": norm}), device),
                    "grouped": stacked(base.clone(), args, device, tune=False),
                    "tuned": stacked(base.clone(), args, device, tune=True)}
        seconds = interleaved(variants, args.rounds)
        rates = {name: rate(design_runs * args.steps, s) for name, s in seconds.items()}
        lines.append(f"| {norm} | " + " | ".join(
            f"{rates[n]:.1f}" + ("" if n == "sequential" else f" ({rates[n] / rates['sequential']:.2f}x)")
            for n in variants) + " |")
        log(f"designs, norm={norm}: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items()))
    lines += ["", "Image-steps per second (ratio to sequential).", ""]

    # ---- K = 1, 4, 16, 64
    lines += ["## Stacked against sequential", "",
              "| K | sequential (image-steps/s) | stacked (image-steps/s) | ratio | convolution modes (tuned) | tuning (s) "
              "| grid, sequential | grid, stacked |" + (" peak GPU memory |" if gpu else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for count in args.runs:
        base = Runs(count, args, device)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        variants = {"sequential": sequential(base.clone(), args, device),
                    "stacked": stacked(base.clone(), args, device, tune=True)}
        seconds = interleaved(variants, args.rounds)
        seq, stk = (rate(count * args.steps, seconds[n]) for n in ("sequential", "stacked"))
        seq_best, stk_best = (best(count * args.steps, seconds[n]) for n in ("sequential", "stacked"))
        tuned = variants["stacked"]
        memory = f" {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB |" if gpu else ""
        lines.append(f"| {count} | {seq:.1f} (best {seq_best:.1f}) | {stk:.1f} (best {stk_best:.1f}) | {stk / seq:.2f}x | "
                     f"{mode_summary(tuned.modes)} | {tuned.tuning:.1f} | {duration(GRID_IMAGE_STEPS / seq)} | "
                     f"{duration(GRID_IMAGE_STEPS / stk)} |{memory}")
        log(f"K={count}: sequential {seq:.1f}, stacked {stk:.1f} image-steps/s ({stk / seq:.2f}x)")
        del base, variants
    lines += ["", f"Grid: the projected wall time of {GRID_IMAGE_STEPS:.3g} image-steps at that rate, at this "
              f"input size ({args.size}x{args.size}).", ""]

    # ---- the paper's size on this CPU (on CUDA the table above is at that size already)
    if not gpu and args.paper_runs and not args.smoke:
        paper = argparse.Namespace(**{**vars(args), "size": 256, "depth": 5, "up": "transpose3", "steps": 1})
        base = Runs(args.paper_runs, paper, device)
        variants = {"sequential": sequential(base.clone(), paper, device),
                    "stacked": stacked(base.clone(), paper, device, tune=True)}
        seconds = interleaved(variants, 2)
        seq, stk = (rate(args.paper_runs, seconds[n]) for n in ("sequential", "stacked"))
        lines += [f"## The paper's size on this machine: K = {args.paper_runs}", "",
                  "256x256, U-Net depth 5 with `transpose3` (experiment=iln_paper's model), otherwise as above; median of "
                  "2 interleaved rounds of 1 step per run.", "",
                  "| K | sequential (image-steps/s) | stacked (image-steps/s) | ratio | grid, sequential | grid, stacked |",
                  "|---|---|---|---|---|---|",
                  f"| {args.paper_runs} | {seq:.2f} | {stk:.2f} | {stk / seq:.2f}x | {duration(GRID_IMAGE_STEPS / seq)} | "
                  f"{duration(GRID_IMAGE_STEPS / stk)} |", "",
                  f"Grid: {GRID_IMAGE_STEPS:.3g} image-steps at that rate, a projection.", ""]
        log(f"paper size, K={args.paper_runs}: sequential {seq:.2f}, stacked {stk:.2f} image-steps/s")
        del base, variants

    # ---- the CPU target, measured twice
    target_runs = 2 if args.smoke else TARGET_RUNS
    lines += [f"## Target: K = {target_runs}, stacked >= {TARGET_RATIO:g}x sequential (measured twice)", "",
              "| measurement | sequential | stacked | ratio | target met |", "|---|---|---|---|---|"]
    for attempt in (1, 2):
        base = Runs(target_runs, args, device)
        variants = {"sequential": sequential(base.clone(), args, device),
                    "stacked": stacked(base.clone(), args, device, tune=True)}
        seconds = interleaved(variants, args.rounds)
        seq, stk = (rate(target_runs * args.steps, seconds[n]) for n in ("sequential", "stacked"))
        seq_best, stk_best = (best(target_runs * args.steps, seconds[n]) for n in ("sequential", "stacked"))
        lines.append(f"| {attempt} | {seq:.1f} (best {seq_best:.1f}) | {stk:.1f} (best {stk_best:.1f}) | "
                     f"{stk / seq:.2f}x (best rounds {stk_best / seq_best:.2f}x) | "
                     f"{'yes' if stk / seq >= TARGET_RATIO else 'no'} |")
        log(f"target, measurement {attempt}: {stk / seq:.2f}x")
    lines += ["", f"Total time of this benchmark: {(time.perf_counter() - started) / 60:.1f} min; the machine's load "
              f"average (1 min) was {load_before:.1f} at its start and {os.getloadavg()[0]:.1f} at its end (other work "
              f"on a shared machine slows both variants, not always alike).", ""]

    about, body = lines[0], "\n".join(lines[1:])
    out = write_result("stacked", title, body, about=about, out=Path(args.out) if args.out else None)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
