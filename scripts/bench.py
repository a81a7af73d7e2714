"""Training throughput and peak memory per normalization: our pipeline vs MONAI's, side by side in one run.

    python scripts/bench.py                                   # CPU, and the GPU when there is one
    python scripts/bench.py --devices cuda --batch-size 32 --precision bf16 --compile --steps 50
    python scripts/bench.py --norms bn iln --size 128 --steps 5       # a quicker look

For each device and each normalization, two pipelines train the same U-Net widths (16 ... 256) on
the same random data, with a random rotation as augmentation:

* **ours** -- what ``train.py`` does: the dataset is one tensor on the training device, batches are
  gathered by index, augmented there in one batched call (``seg.training.augment``), the U-Net runs
  channels_last; no DataLoader, no worker process, no host-to-device copy per step;
* **MONAI** -- ``monai.networks.nets.BasicUNet`` with the same widths, fed the way MONAI's tutorials
  do: a ``CacheDataset`` (the deterministic transforms cached), ``RandRotated`` in ``DataLoader``
  workers, each batch copied to the device (pinned memory on CUDA).

Both get the same precision (``--precision``: autocast to bf16, or fp32) and, with ``--compile``,
the same ``torch.compile``. A step is: next batch, augmentation, then the trainer's own training step
(``seg.training.step.train_step``: forward, cross-entropy, backward, SGD step); images/s is over ``--steps``
steps after ``--warmup`` steps (DataLoader workers started, compilation done). Every measurement
runs in a fresh process, so that peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``
over the timed steps (everything torch holds on the GPU, the resident dataset included); on CPU the
peak resident set size of the training process (DataLoader workers not included). With ``--compile`` the graph breaks that torch.compile met in our
model are listed too. The layers that replace the convolution + norm pair (kn, wn, bkn) have no
MONAI counterpart, nor do the conditional ones (cin, adain, spade, sean: MONAI's networks pass no
condition; ours get each image's domain id, 4 vendors). Writes one table per device to
docs/results/bench.md (``--out``: elsewhere); compare figures within one table only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import cpu_model, markdown_table, sgd_options, write_json, write_result
from seg.data.augmentations import Augmentation
from seg.training.augment import augment_batch
from seg.training.losses import build_loss
from seg.norms import names, register_monai
from seg.norms import spec as norm_spec
from seg.training.optimizers import build_optimizer
from seg.training.step import TrainStep, train_step
from seg.model.unet import UNet

WIDTHS = (16, 32, 64, 128, 256)
ROTATE_DEG = 15.0
# MONAI's own layers where it has them; our registered layers (seg.norms.register_monai) otherwise
MONAI_OWN = {"bn": "batch", "in": ("instance", {"affine": True}), "gn": ("group", {"num_groups": 16})}


# ---------------------------------------------------------------------------- one measurement (child process)


def measure(spec: dict) -> dict:
    """Train ``spec['pipeline']`` with ``spec['norm']`` on ``spec['device']``; images/s, peak memory, graph breaks."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    n, size, batch_size = spec["samples"], spec["size"], spec["batch_size"]
    images = torch.randn(n, 1, size, size)
    labels = (torch.rand(n, size, size) < 0.1).to(torch.uint8)
    ours_pipeline = spec["pipeline"] == "ours"
    model, next_batch = (ours if ours_pipeline else monai)(spec, images, labels, device)
    module = torch.compile(model, backend=spec["compile_backend"]) if spec["compile"] else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    # the trainer's step: ours channels_last with each image's domain id, MONAI's as shipped (images only)
    step = TrainStep.of(model, build_optimizer(model, sgd_options()), build_loss("ce"), module=module,
                        autocast=autocast, conditioned=ours_pipeline,
                        memory_format=torch.channels_last if ours_pipeline else torch.contiguous_format)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        train_step(step, *next_batch())
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = train_step(step, *next_batch())
    synchronize()
    seconds = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    result = {"images_per_s": spec["steps"] * batch_size / seconds, "peak_mib": peak}
    if spec["compile"]:
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sum(counters["graph_break"].values())
    return result


def ours(spec, images, labels, device):
    """The trainer's pipeline: data on the device, gathered by index, augmented in one batched call; batches
    of (images, labels, domain ids)."""
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    model = UNet(num_classes=2, base_channels=WIDTHS[0], depth=len(WIDTHS) - 1, norm=spec["norm"], num_domains=4)
    model = model.to(device).to(memory_format=torch.channels_last)
    order, position = torch.empty(0, dtype=torch.long), 0

    domains = torch.arange(len(images), device=device) % 4  # for conditional layers (cin): 4 vendors

    def next_batch():
        nonlocal order, position
        if position + spec["batch_size"] > len(order):  # a new epoch: a new permutation
            order, position = torch.randperm(len(images), generator=generator, device=device), 0
        index = order[position:position + spec["batch_size"]]
        position += spec["batch_size"]
        x, y = augment_batch(images[index], labels[index], Augmentation(ROTATE_DEG),
                             generator=generator)
        return x, y, domains[index]

    return model, next_batch


def monai(spec, images, labels, device):
    """MONAI's usual pipeline: CacheDataset, random transforms in DataLoader workers, BasicUNet; batches of
    (images, labels)."""
    from monai.data import CacheDataset, DataLoader
    from monai.networks.nets import BasicUNet
    from monai.transforms import Compose, EnsureTyped, RandRotated

    register_monai()
    keys = ["image", "label"]
    items = [{"image": images[i].numpy(), "label": labels[i][None].numpy()} for i in range(len(images))]
    transform = Compose([
        EnsureTyped(keys=keys),  # cached
        RandRotated(keys=keys, range_x=math.radians(ROTATE_DEG), prob=1.0, mode=("bilinear", "nearest"),
                    padding_mode=("border", "zeros")),
    ])
    dataset = CacheDataset(items, transform, cache_rate=1.0, progress=False)
    workers = spec["workers"]
    loader = DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    norm = MONAI_OWN.get(spec["norm"], spec["norm"])
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(*WIDTHS, WIDTHS[0]), norm=norm)
    model = model.to(device)
    batches = iter(())

    def next_batch():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        x = batch["image"].as_tensor().to(device, non_blocking=True)
        y = batch["label"].as_tensor()[:, 0].to(device, non_blocking=True)
        return x, y, None

    return model, next_batch


# ---------------------------------------------------------------------------- the comparison (parent process)


def run_child(spec: dict) -> dict:
    """One measurement in a fresh Python process; its result, or the reason it failed."""
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": reason}
    return json.loads(lines[-1])


def device_name(device: str, threads: int | None) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


def cell(result: dict | None, key: str, digits: int) -> str:
    if result is None:
        return "n/a"
    if "error" in result:
        return f"failed: {result['error'][:60]}"
    return f"{result[key]:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=["bn", "in", "ln", "gn", "bin", "iln", "sn"],
                        choices=names())
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image size (a multiple of 16)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a GPU that supports it, fp32 elsewhere (as the trainer)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--samples", type=int, default=64, help="dataset size (random images)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="MONAI DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures as JSON (per device and norm: ours, MONAI, their ratio)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.size % 2 ** (len(WIDTHS) - 1):
        parser.error(f"--size must be a multiple of {2 ** (len(WIDTHS) - 1)}")
    if args.samples < args.batch_size:
        parser.error("--samples must be at least --batch-size")
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    sections, figures = [], {}
    for device in devices:
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda")
                                            and torch.cuda.is_bf16_supported())
        precision = "bf16" if bf16 else "fp32"
        compiled = f"compiled ({args.compile_backend})" if args.compile else "eager"
        title = (f"**{device}** ({device_name(device, args.threads)}): batch {args.batch_size}, "
                 f"{args.size}x{args.size}, {precision}, {compiled}, {args.steps} timed steps after {args.warmup}; "
                 f"MONAI: CacheDataset + DataLoader with {args.workers} workers")
        print(f"\n{title}\n", flush=True)
        memory = "peak GPU memory (MiB)" if device.startswith("cuda") else "peak RSS (MiB)"
        header = ["norm", "ours: images/s", f"ours: {memory}", "MONAI BasicUNet: images/s", f"MONAI: {memory}",
                  "ours / MONAI"] + (["graph breaks (ours)"] if args.compile else [])
        print(markdown_table(header, []), end="", flush=True)
        rows = []
        for norm in args.norms:
            spec = {"device": device, "norm": norm, "batch_size": args.batch_size, "size": args.size,
                    "precision": precision, "compile": args.compile, "compile_backend": args.compile_backend,
                    "steps": args.steps, "warmup": args.warmup, "samples": args.samples, "workers": args.workers,
                    "threads": args.threads}
            ours_result = run_child({**spec, "pipeline": "ours"})
            has_monai = norm_spec(norm).fits_monai
            monai_result = run_child({**spec, "pipeline": "monai"}) if has_monai else None
            both = all(r is not None and "error" not in r for r in (ours_result, monai_result))
            ratio = f"{ours_result['images_per_s'] / monai_result['images_per_s']:.2f}x" if both else "n/a"
            row = [norm, cell(ours_result, "images_per_s", 1), cell(ours_result, "peak_mib", 0),
                   cell(monai_result, "images_per_s", 1), cell(monai_result, "peak_mib", 0), ratio]
            if args.compile:
                row.append(cell(ours_result, "graph_breaks", 0))
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
            figures.setdefault(device, {})[norm] = {
                "ours": ours_result, "monai": monai_result,
                "ratio": ours_result["images_per_s"] / monai_result["images_per_s"] if both else None}
        sections.append(f"{title}\n\n{markdown_table(header, rows)}")
    about = ("Training throughput and peak memory per normalization: this pipeline (the data on the device, "
             "augmented there, the trainer's `seg.training.step.train_step`) against MONAI's `BasicUNet` fed by "
             "`CacheDataset` + `DataLoader`, same widths, same precision and compilation; every measurement in a "
             "fresh process. Compare figures within one table only.")
    write_result("bench", "Training throughput: this pipeline and MONAI's", "\n".join(sections), about, args.out)
    if args.json:
        write_json(args.json, {"batch_size": args.batch_size, "size": args.size, "compile": args.compile,
                               "compile_backend": args.compile_backend, "precision": args.precision,
                               "steps": args.steps, "devices": figures})


if __name__ == "__main__":
    main()
