"""Train-step throughput: our U-Net vs MONAI's BasicUNet with the same widths and norm, in one run.

    python scripts/bench_train_step.py                 # CPU, batch 8, 256x256, norm=bn
    python scripts/bench_train_step.py --device cuda --batch-size 32

A train step is the trainer's own ``seg.training.step.train_step`` -- forward, cross-entropy, backward, SGD
step -- on a fixed batch (data loading is not part of it), for each candidate: our U-Net (channels_last,
the trainer's default, and contiguous) and MONAI's BasicUNet (as shipped, and channels_last).
Candidates are timed in interleaved rounds and the median round is reported, so that drift of the
machine affects all alike. Writes docs/results/bench_train_step.md (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median

import torch
from monai.networks.nets import BasicUNet

from harness import interleaved_times, markdown_table, sgd_options, write_result
from seg.training.losses import build_loss
from seg.training.optimizers import build_optimizer
from seg.training.step import TrainStep, train_step
from seg.model.unet import UNet

MONAI_NORMS = {"bn": "batch", "in": ("instance", {"affine": True}), "gn": ("group", {"num_groups": 16})}
OURS = "ours (channels_last, the trainer's default)"
MONAI = "MONAI BasicUNet (as shipped)"
MONAI_CHANNELS_LAST = "MONAI BasicUNet (channels_last)"


def candidates(norm: str, base: int) -> dict:
    """name -> (a function building the model, channels_last?, is it our U-Net?)."""
    widths = (base, base * 2, base * 4, base * 8, base * 16, base)

    def monai():
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=widths, norm=MONAI_NORMS[norm])

    def ours():
        return UNet(norm=norm, base_channels=base)

    return {OURS: (ours, True, True), "ours (contiguous)": (ours, False, True), MONAI: (monai, False, False),
            MONAI_CHANNELS_LAST: (monai, True, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--norm", default="bn", choices=sorted(MONAI_NORMS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.size, args.size, device=device)
    labels = torch.randint(0, 2, (args.batch_size, args.size, args.size), device=device)

    steps = {}
    for name, (build, channels_last, conditioned) in candidates(args.norm, 16).items():
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build().to(device).to(memory_format=fmt)
        step = TrainStep.of(model, build_optimizer(model, sgd_options()), build_loss("ce"), memory_format=fmt,
                            conditioned=conditioned)
        batch = images.contiguous(memory_format=fmt)
        steps[name] = lambda step=step, batch=batch: train_step(step, batch, labels)
        steps[name](), steps[name]()  # warm-up
    times = interleaved_times(steps, args.rounds, args.steps, device)

    rate, rows = {}, []
    for name, values in times.items():
        seconds = median(values)
        rate[name] = args.batch_size / seconds
        rows.append([name, f"{1000 * seconds:.0f}", f"{rate[name]:.2f}"])
    ratio = (f"Ratio ours / MONAI BasicUNet: **{rate[OURS] / rate[MONAI]:.2f}x** (like for like, both channels_last: "
             f"{rate[OURS] / rate[MONAI_CHANNELS_LAST]:.2f}x).")
    about = (f"One training step (`seg.training.step.train_step`: forward, cross-entropy, backward, SGD step) on a fixed batch "
             f"of {args.batch_size} images of {args.size}x{args.size}, norm={args.norm}, on {device}; median of "
             f"{args.rounds} interleaved rounds of {args.steps} steps.")
    body = markdown_table(["model", "ms / step", "images / s"], rows) + "\n" + ratio
    print(body)
    write_result("bench_train_step", "Train step: our U-Net and MONAI's BasicUNet", body, about, args.out)


if __name__ == "__main__":
    main()
