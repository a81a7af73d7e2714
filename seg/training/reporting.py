"""What a run shows and writes about itself: metrics.json, TensorBoard's scalars, images and HParams, the final report.

metrics.json is written atomically by rank 0 alone (``write_metrics``); ranks other than 0 get a
``SilentWriter`` in place of TensorBoard's. Nothing here decides anything about training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from ..runtime.distributed import is_main_process
from ..runtime.temporaries import temporary_path


class SilentWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def tensorboard_writer(output_dir: Path, is_main: bool, purge_step: int | None = None):
    """Rank 0's TensorBoard writer in the run folder (``purge_step``: a resumed run drops the events after its
    checkpoint), a ``SilentWriter`` elsewhere."""
    return SummaryWriter(str(output_dir), purge_step=purge_step) if is_main else SilentWriter()


@contextlib.contextmanager
def quiet_writer_thread_errors():
    """TensorBoard writes from a thread of its own: when the disk is full, that thread would print its
    traceback; the training thread gets the same error at its next write and reports it in one line."""
    previous = threading.excepthook

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def mixing_weights(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per normalization layer with a learned choice: the mean of each of its mixing weights. A layer whose
    weights cannot act (its ``mixing_weights_inert`` gives the reason, e.g. ILN where channels = groups)
    is left out: its weights stay where they started, which is not a choice (``inert_mixing_weights``)."""
    return {name: {key: float(value.detach().float().mean()) for key, value in module.mixing_weights().items()}
            for name, module in model.named_modules()
            if hasattr(module, "mixing_weights") and not getattr(module, "mixing_weights_inert", None)}


def inert_mixing_weights(model: torch.nn.Module) -> dict[str, str]:
    """{layer: why its mixing weights have no effect} for the layers ``mixing_weights`` leaves out."""
    return {name: module.mixing_weights_inert for name, module in model.named_modules()
            if getattr(module, "mixing_weights_inert", None)}


def log_mixing_weights(writer, model: torch.nn.Module, step: int) -> None:
    """Which normalization each layer with a learned choice chose, as TensorBoard scalars ``norm/<layer>/<key>``."""
    for layer, weights in mixing_weights(model).items():
        for key, value in weights.items():
            writer.add_scalar(f"norm/{layer}/{key}", value, step)


def image_panel(slices, prediction: torch.Tensor, num_classes: int, count: int) -> torch.Tensor:
    """(1, count*H, 3*W) image: rows of [input | ground truth | prediction] for slices with foreground."""
    with_foreground = torch.nonzero(slices.labels.flatten(1).any(1)).flatten()
    pool = with_foreground if len(with_foreground) else torch.arange(len(slices), device=slices.labels.device)
    chosen = pool[torch.linspace(0, len(pool) - 1, min(count, len(pool)), device=pool.device).long()]
    image = slices.images[chosen, 0]
    low, high = image.amin((1, 2), keepdim=True), image.amax((1, 2), keepdim=True)
    image = (image - low) / (high - low).clamp(min=1e-6)
    scale = max(num_classes - 1, 1)
    rows = torch.cat([image, slices.labels[chosen].float() / scale, prediction[chosen].float() / scale], dim=2)
    return rows.reshape(1, -1, rows.shape[-1]).cpu()


def augmentation_panel(images: torch.Tensor, augmented: list, num_classes: int) -> torch.Tensor:
    """(1, N*H, (1 + 2 len(augmented))*W) image: per slice, [input | augmented | its labels | ...] for each of
    ``augmented`` ((images, labels) of the same slices); each image scaled by its own range."""

    def scaled(image):
        low, high = image.amin((1, 2), keepdim=True), image.amax((1, 2), keepdim=True)
        return (image - low) / (high - low).clamp(min=1e-6)

    scale = max(num_classes - 1, 1)
    columns = [scaled(images[:, 0].float())]
    for image, labels in augmented:
        columns += [scaled(image[:, 0].float()), labels.float() / scale]
    rows = torch.cat(columns, dim=2)
    return rows.reshape(1, -1, rows.shape[-1]).cpu()


def log_hparams(writer, metrics: dict) -> None:
    """Hyperparameters and final metrics for TensorBoard's HParams view (one row per run)."""
    hparams = {"norm": metrics["norm"], "lr": metrics["lr"], "batch_size": metrics["batch_size"],
               "seed": metrics["seed"], "task": metrics["task"], "epochs": metrics["epochs"]}
    final = {f"hparam/{k}": (v if v is not None else math.nan)
             for k, v in metrics.items() if k in ("dice", "dice_2d", "best_val_dice")}
    writer.add_hparams(hparams, final, run_name=".")


def nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def write_metrics(output_dir: Path, metrics: dict) -> None:
    """metrics.json, written atomically (under torchrun by rank 0 only); NaN (an undefined Dice) becomes null."""
    if not is_main_process():
        return

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    temporary = temporary_path(output_dir / "metrics.json", hidden=True)  # one per process
    try:
        temporary.write_text(json.dumps(clean(metrics), indent=2, default=str))
        os.replace(temporary, output_dir / "metrics.json")
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def print_report(metrics: dict, classes: list[str]) -> None:
    per_class = ", ".join(f"{name} {metrics[f'dice_{name}']:.3f}" for name in classes)
    best = metrics["best_val_dice"]
    print(f"\nDone in {metrics['wall_time_s']:.1f} s ({metrics['images_per_s']:.1f} training images/s), "
          f"norm={metrics['norm']} lr={metrics['lr']} batch={metrics['batch_size']} seed={metrics['seed']}\n"
          f"  test Dice, 3D per volume: {metrics['dice']:.4f}  ({per_class})\n"
          f"  test Dice, 2D per slice:  {metrics['dice_2d']:.4f}\n"
          + (f"  test HD95, ASSD (mm):     {metrics['hd95']:.2f}, {metrics['assd']:.2f}\n"
             if isinstance(metrics.get("hd95"), float) and isinstance(metrics.get("assd"), float) else "")
          + f"  best validation Dice:     {'n/a' if best is None else f'{best:.4f}'} (epoch {metrics['best_epoch']})\n"
          f"  outputs: {metrics['output_dir']}  (metrics.json, TensorBoard events, checkpoints/)")
