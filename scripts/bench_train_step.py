"""Train-step throughput: our U-Net vs MONAI's BasicUNet with the same widths and norm, in one run.

    python scripts/bench_train_step.py                 # CPU, batch 8, 256x256, norm=bn
    python scripts/bench_train_step.py --device cuda --batch-size 32

A train step is forward + cross-entropy + backward + SGD step on a fixed batch (data loading is
not part of it). Models are timed in interleaved rounds and the median round is reported, so
that drift of the machine affects both alike. Prints a Markdown table and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from seg.unet import UNet

MONAI_NORMS = {"bn": "batch", "in": ("instance", {"affine": True}), "gn": ("group", {"num_groups": 16})}


def candidates(norm: str, base: int):
    widths = (base, base * 2, base * 4, base * 8, base * 16, base)
    monai = lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=widths,  # noqa: E731
                              norm=MONAI_NORMS[norm])
    return {
        "ours (channels_last, the trainer's default)": (lambda: UNet(norm=norm, base_channels=base), True),
        "ours (contiguous)": (lambda: UNet(norm=norm, base_channels=base), False),
        "MONAI BasicUNet (as shipped)": (monai, False),
        "MONAI BasicUNet (channels_last)": (monai, True),
    }


def step_fn(model, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--norm", default="bn", choices=sorted(MONAI_NORMS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.size, args.size, device=device)
    labels = torch.randint(0, 2, (args.batch_size, args.size, args.size), device=device)

    steps = {}
    for name, (build, channels_last) in candidates(args.norm, 16).items():
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build().to(device).to(memory_format=fmt)
        step = step_fn(model, images.contiguous(memory_format=fmt), labels)
        step(), step()  # warm-up
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"Train step, batch {args.batch_size}, {args.size}x{args.size}, norm={args.norm}, "
          f"device {device} ({where}), torch {torch.__version__}; median of {args.rounds} rounds\n")
    print("| model | ms / step | images / s |\n|---|---|---|")
    rate = {}
    for name, values in times.items():
        seconds = statistics.median(values)
        rate[name] = args.batch_size / seconds
        print(f"| {name} | {1000 * seconds:.0f} | {rate[name]:.2f} |")
    ours, monai = rate["ours (channels_last, the trainer's default)"], rate["MONAI BasicUNet (as shipped)"]
    print(f"\nratio ours / MONAI BasicUNet: {ours / monai:.2f}x "
          f"(like for like, both channels_last: {ours / rate['MONAI BasicUNet (channels_last)']:.2f}x)")


if __name__ == "__main__":
    main()
