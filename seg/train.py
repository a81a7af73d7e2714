"""The training loop: config -> data on the device -> U-Net -> loss -> Dice -> logs and metrics.json.

``train(cfg, output_dir)`` reads top to bottom in the order things happen; the small builders
it uses (optimizer, schedule, loss, device) follow it in this file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .augment import augment_batch
from .checkpoint import save_checkpoint
from .config import ConfigError, validate
from .data import class_names, load_splits
from .metrics import evaluate
from .unet import UNet


def train(cfg, output_dir: str | os.PathLike) -> dict:
    """Train and test one configuration; returns (and writes to output_dir/metrics.json) its metrics."""
    started = time.perf_counter()
    validate(cfg)
    output_dir = Path(output_dir)
    check_writable(output_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    print(f"Device: {describe_device(device)}")
    progress = cfg.trainer.progress
    norm_options = {k: v for k, v in cfg.norm.items() if k != "name"}
    metrics = {"status": "running", "norm": cfg.norm.name, "norm_options": norm_options, "lr": cfg.lr,
               "batch_size": cfg.trainer.batch_size, "seed": cfg.seed, "task": cfg.data.task, "data": cfg.data.name,
               "epochs": cfg.trainer.epochs, "device": str(device), "output_dir": str(output_dir)}

    # ---- data: disk -> preprocessed 2D slices, held on the training device
    splits = {name: split.to(device) for name, split in load_splits(cfg.data, cfg.seed, progress).items()}
    train_set, val_set, test_set = splits["train"], splits.get("val"), splits["test"]
    classes = class_names(cfg.data.task)
    num_classes = len(classes) + 1
    for name, split in splits.items():
        metrics[f"num_{name}_slices"], metrics[f"num_{name}_volumes"] = len(split), len(split.cases)
    print("Data: " + ", ".join(f"{name} {len(s)} slices / {len(s.cases)} volumes" for name, s in splits.items()))

    # ---- model, optimizer, learning-rate schedule, loss
    model = UNet(in_channels=cfg.model.in_channels, num_classes=num_classes, base_channels=cfg.model.base_channels,
                 depth=cfg.model.depth, norm=cfg.norm.name, norm_options=norm_options, init=cfg.model.init,
                 bias_init=cfg.model.bias_init).to(device)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    if cfg.model.init_from:
        load_weights(model, cfg.model.init_from)
    model = model.to(memory_format=memory_format)
    post_step_layers = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.schedule.milestones),
                                                     gamma=cfg.schedule.gamma)
    loss_fn = build_loss(cfg.loss)
    writer = SummaryWriter(str(output_dir))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    batch_size, log_every = cfg.trainer.batch_size, cfg.trainer.log_every_n_steps
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    metrics["num_parameters"] = sum(p.numel() for p in model.parameters())

    # ---- the loop: an epoch of shuffled batches, then validation
    step, train_time, history = 0, 0.0, []
    best_dice, best_state, best_epoch = -math.inf, None, None
    pending_losses: list[torch.Tensor] = []
    bar = tqdm(total=cfg.trainer.epochs * steps_per_epoch, unit="step", disable=not progress)
    for epoch in range(1, cfg.trainer.epochs + 1):
        bar.set_description(f"epoch {epoch}/{cfg.trainer.epochs}")
        model.train()
        epoch_start, epoch_losses = time.perf_counter(), []
        for batch in torch.randperm(len(train_set), generator=generator, device=device).split(batch_size):
            images, labels = augment_batch(train_set.images[batch], train_set.labels[batch],
                                           rotate_deg=cfg.data.augment.rotate_deg, flip=cfg.data.augment.flip,
                                           generator=generator)
            logits = model(images.contiguous(memory_format=memory_format))
            loss = loss_fn(logits, labels.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for layer in post_step_layers:  # e.g. BIN clips its gates to [0, 1]
                layer.after_optimizer_step()
            step += 1
            bar.update()
            pending_losses.append(loss.detach())
            if step % log_every and step % steps_per_epoch:
                continue
            # every log_every steps (and at the end of an epoch): one device sync for the pending losses
            losses = torch.stack(pending_losses).tolist()
            first_step, pending_losses = step - len(losses) + 1, []
            for offset, value in enumerate(losses):
                if not math.isfinite(value):
                    return finish_diverged(metrics, writer, output_dir, first_step + offset, value, started, bar)
                writer.add_scalar("train/loss", value, first_step + offset)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            epoch_losses.extend(losses)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        scheduler.step()  # the learning rate changes here: divided by 5 after each milestone epoch

        entry = {"epoch": epoch, "train_loss": float(np.mean(epoch_losses)), "epoch_time_s": epoch_time,
                 "images_per_s": len(train_set) / epoch_time}
        writer.add_scalar("perf/images_per_s", entry["images_per_s"], epoch)
        for layer, weights in mixing_weights(model).items():  # which normalization each layer chose
            for key, value in weights.items():
                writer.add_scalar(f"norm/{layer}/{key}", value, epoch)
        if val_set is not None:
            val, prediction = evaluate(model, val_set, num_classes, classes, cfg.trainer.eval_batch_size)
            entry.update({f"val_{k}": v for k, v in val.items()})
            for key, value in val.items():
                writer.add_scalar(f"val/{key}", value, epoch)
            writer.add_image("val/input_truth_prediction", image_panel(val_set, prediction, num_classes,
                                                                       cfg.trainer.num_panel_images), epoch)
            score = val["dice"] if not math.isnan(val["dice"]) else -math.inf
        else:
            score = float(epoch)  # no validation set: the last epoch is the best
        history.append(entry)
        if score > best_dice or best_state is None:
            best_dice, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        if cfg.trainer.save_checkpoints:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                     "config": OmegaConf.to_container(cfg, resolve=True), "val_dice": entry.get("val_dice")}
            save_checkpoint(output_dir / "checkpoints" / "last.pt", state)
            if best_epoch == epoch:
                save_checkpoint(output_dir / "checkpoints" / "best.pt", state)
    bar.close()

    # ---- test, with the weights of the best validation epoch
    model.load_state_dict(best_state)
    test, _ = evaluate(model, test_set, num_classes, classes, cfg.trainer.eval_batch_size)
    for key, value in test.items():
        writer.add_scalar(f"test/{key}", value, step)
    metrics.update(status="ok", **test, best_val_dice=nan_to_none(best_dice) if val_set is not None else None,
                   best_epoch=best_epoch, steps=step, train_time_s=train_time,
                   images_per_s=len(train_set) * cfg.trainer.epochs / train_time, history=history,
                   mixing_weights=mixing_weights(model),
                   wall_time_s=time.perf_counter() - started)
    log_hparams(writer, metrics)
    writer.close()
    write_metrics(output_dir, metrics)
    print_report(metrics, classes)
    return metrics


# ---------------------------------------------------------------------------- builders


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """SGD (momentum 0.9 by default) or Adam over the model's parameters.

    A parameter may carry an ``optim_group`` dict (``lr_scale``, ``weight_decay``): such
    parameters get their own group, e.g. BIN's gates at 10x the learning rate without decay.
    """
    groups: dict[tuple, list] = {}
    for param in model.parameters():
        special = getattr(param, "optim_group", {})
        key = (special.get("lr_scale", 1.0), special.get("weight_decay", optim_cfg.weight_decay))
        groups.setdefault(key, []).append(param)
    param_groups = [{"params": params, "lr": optim_cfg.lr * scale, "weight_decay": decay}
                    for (scale, decay), params in groups.items()]
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               nesterov=optim_cfg.nesterov)
    return torch.optim.Adam(param_groups, lr=optim_cfg.lr)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Start from the weights of a checkpoint (``model.init_from``); a different model is refused clearly."""
    from .checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise ConfigError(f"model.init_from={path}: no such checkpoint file")
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"model.init_from={path} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, different shapes {wrong[:5]}")
    model.load_state_dict(state)


def mixing_weights(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per normalization layer with a learned choice: the mean of each of its mixing weights."""
    return {name: {key: float(value.detach().float().mean()) for key, value in module.mixing_weights().items()}
            for name, module in model.named_modules() if hasattr(module, "mixing_weights")}


def build_loss(name: str):
    """``ce``: cross-entropy on logits (the ILN study's); ``dice_ce``: MONAI's DiceCELoss."""
    if name == "ce":
        return F.cross_entropy
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    return lambda logits, labels: dice_ce(logits, labels.unsqueeze(1))


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(output_dir: Path) -> None:
    """Fail before any work if the run folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RuntimeError(f"cannot write to the output folder {output_dir}: {err}") from None


# ---------------------------------------------------------------------------- reporting


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


def log_hparams(writer: SummaryWriter, metrics: dict) -> None:
    """Hyperparameters and final metrics for TensorBoard's HParams view (one row per run)."""
    hparams = {"norm": metrics["norm"], "lr": metrics["lr"], "batch_size": metrics["batch_size"],
               "seed": metrics["seed"], "task": metrics["task"], "epochs": metrics["epochs"]}
    final = {f"hparam/{k}": (v if v is not None else math.nan)
             for k, v in metrics.items() if k in ("dice", "dice_2d", "best_val_dice")}
    writer.add_hparams(hparams, final, run_name=".")


def nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def write_metrics(output_dir: Path, metrics: dict) -> None:
    """metrics.json, written atomically; NaN (an undefined Dice) becomes null."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    temporary = output_dir / "metrics.json.tmp"
    temporary.write_text(json.dumps(clean(metrics), indent=2, default=str))
    os.replace(temporary, output_dir / "metrics.json")


def finish_diverged(metrics, writer, output_dir, step, value, started, bar) -> dict:
    """End a run whose loss became non-finite: status 'diverged', no Dice (not a zero)."""
    bar.close()
    metrics.update(status="diverged", diverged_step=step, diverged_loss=str(value), dice=None, dice_2d=None,
                   best_val_dice=None, steps=step, wall_time_s=time.perf_counter() - started)
    writer.add_text("status", f"diverged at step {step}: loss {value}", step)
    log_hparams(writer, metrics)
    writer.close()
    write_metrics(output_dir, metrics)
    print(f"Run diverged: the loss became {value} at step {step} (norm={metrics['norm']}, lr={metrics['lr']}); "
          f"metrics.json records status 'diverged'")
    return metrics


def print_report(metrics: dict, classes: list[str]) -> None:
    per_class = ", ".join(f"{name} {metrics[f'dice_{name}']:.3f}" for name in classes)
    best = metrics["best_val_dice"]
    print(f"\nDone in {metrics['wall_time_s']:.1f} s ({metrics['images_per_s']:.1f} training images/s), "
          f"norm={metrics['norm']} lr={metrics['lr']} batch={metrics['batch_size']} seed={metrics['seed']}\n"
          f"  test Dice, 3D per volume: {metrics['dice']:.4f}  ({per_class})\n"
          f"  test Dice, 2D per slice:  {metrics['dice_2d']:.4f}\n"
          f"  best validation Dice:     {'n/a' if best is None else f'{best:.4f}'} (epoch {metrics['best_epoch']})\n"
          f"  outputs: {metrics['output_dir']}  (metrics.json, TensorBoard events, checkpoints/)")
