"""Augmentation cost per batch against the training step, on CPU (and a GPU when given one).

    python scripts/bench_augment.py                       # CPU, batch 8, 256x256
    python scripts/bench_augment.py --device cuda --batch-size 32

Times ``seg.training.augment.augment_batch`` -- the trainer's own call, drawing from a generator on the
device and augmenting in one batched pass -- for: the ILN protocol's rotation alone (the default), the
``nnunet`` preset (its probabilities), every option at p = 1 (the worst case: each one computed for
every image, as the trainer always computes them and selects per image), and each option alone at p = 1;
against one training step (``seg.training.step.train_step``: our U-Net, norm=bn, channels_last) on the same
batch. Candidates are timed in interleaved rounds and the median round is reported. Writes
docs/results/bench_augment.md (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median

import torch

from harness import interleaved_times, markdown_table, sgd_options, write_result
from seg.data.augmentations import SPECS, Augmentation, Step
from seg.model.unet import UNet
from seg.training.augment import augment_batch
from seg.training.losses import build_loss
from seg.training.optimizers import build_optimizer
from seg.training.step import TrainStep, train_step

DEFAULT_RANGES = {"scale": (0.7, 1.4), "elastic": (0.0, 200.0), "bias_field": (0.0, 0.1), "rician": (0.0, 0.1),
                  "noise": (0.0, 0.1), "blur": (0.5, 1.0), "brightness": (0.75, 1.25), "contrast": (0.75, 1.25),
                  "lowres": (0.5, 1.0), "gamma_inverted": (0.7, 1.5), "gamma": (0.7, 1.5)}  # the schema's defaults
EXTRA = {"elastic": (9.0, 13.0), "bias_field": 3}
TRAIN_STEP = "training step (U-Net, norm=bn)"


def step_of(name: str, p: float) -> Step:
    return Step(name, p, DEFAULT_RANGES[name], EXTRA.get(name))


def candidates() -> dict[str, Augmentation]:
    """name -> the augmentation timed."""
    rotation = 15.0
    preset = tuple(step_of(spec.name, spec.presets["nnunet"]) for spec in SPECS if spec.presets["nnunet"] > 0)
    every = tuple(step_of(spec.name, 1.0) for spec in SPECS)
    chosen = {"ILN protocol (rotation 15 deg)": Augmentation(rotation),
              "preset nnunet (+ rotation)": Augmentation(rotation, False, preset),
              "every option at p = 1 (+ rotation, flips)": Augmentation(rotation, True, every)}
    chosen.update({f"{spec.name} alone, p = 1": Augmentation(0.0, False, (step_of(spec.name, 1.0),)) for spec in SPECS})
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="calls per round")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.size, args.size, device=device)
    labels = torch.randint(0, 4, (args.batch_size, args.size, args.size), device=device, dtype=torch.uint8)

    model = UNet(norm="bn", base_channels=16, num_classes=4).to(device).to(memory_format=torch.channels_last)
    step = TrainStep.of(model, build_optimizer(model, sgd_options()), build_loss("ce"),
                        memory_format=torch.channels_last, conditioned=False)
    calls = {TRAIN_STEP: lambda: train_step(step, images.contiguous(memory_format=torch.channels_last), labels)}
    for name, augmentation in candidates().items():
        generator = torch.Generator(device=device).manual_seed(0)
        calls[name] = (lambda augmentation=augmentation, generator=generator:
                       augment_batch(images, labels, augmentation, generator=generator))
    for call in calls.values():
        call(), call()  # warm-up
    times = interleaved_times(calls, args.rounds, args.steps, device)

    reference = median(times[TRAIN_STEP])
    rows = [[name, f"{1000 * median(values):.1f}", f"{100 * median(values) / reference:.0f}%"]
            for name, values in times.items()]
    about = (f"`seg.training.augment.augment_batch` on a batch of {args.batch_size} images of {args.size}x{args.size} "
             f"on {device}, against one training step on the same batch; median of {args.rounds} interleaved rounds "
             f"of {args.steps} calls. Every active option is computed for every image (selected per image by its "
             f"draw), so the cost of an option does not depend on its probability.")
    body = markdown_table(["augmentation", "ms / batch", "of a training step"], rows)
    print(body)
    write_result("bench_augment", "Augmentation: cost per batch against the training step", body, about, args.out)


if __name__ == "__main__":
    main()
