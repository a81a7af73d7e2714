"""The training loop: config -> data on the device -> U-Net -> loss -> Dice -> logs and metrics.json.

``train(cfg, output_dir)`` reads top to bottom in the order things happen; the small builders
it uses (optimizer, schedule, loss, device, precision, compilation) follow it in this file. Under
torchrun the same loop runs in every process; ``world`` (seg/distributed.py) gives each its share
of the data and averages what they compute; rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .augment import augment_batch
from .checkpoint import (FORMAT_VERSION, CheckpointError, best_weights, check_compatible, check_free_space,
                         load_checkpoint, restore_rng_states, rng_states, save_checkpoint)
from .config import ConfigError, validate
from .data import DataError, class_names, load_splits
from .distributed import World, gpu_names, is_main_process, sweep_gpu
from .metrics import evaluate, per_volume_dice
from .norms import norm_class
from .ordering import epoch_order
from .runs import RunFolderError, holds_run, open_run, scheduler_job
from .schedules import build_schedule
from .stopping import Interrupted, StopSignals
from .unet import UNet


def train(cfg, output_dir: str | os.PathLike, job_num: int | None = None, stop: StopSignals | None = None) -> dict:
    """Train and test one configuration; returns (and writes to output_dir/metrics.json) its metrics.

    ``job_num``: the job's number in a sweep (it picks the GPU when parallel jobs share a machine).
    ``stop``: the entered ``StopSignals`` of the process (train.py); a signal then stops the run after
    the step in progress, saved (``Interrupted``). Without it, signals keep their usual meaning.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    metrics = {"status": "running", "norm": cfg.norm.get("name"), "norm_options": norm_options_of(cfg), "lr": cfg.lr,
               "batch_size": cfg.trainer.batch_size, "seed": cfg.seed, "task": cfg.data.get("task"),
               "data": cfg.data.get("name"), "loss": cfg.loss, "schedule": cfg.schedule.get("name"),
               "epochs": cfg.trainer.epochs, "output_dir": str(output_dir)}
    opened = False  # whether this process holds the folder (from then on, it records the run's end)
    try:
        validate(cfg)
        world = World.current()  # this process among the processes of a torchrun job (one process: rank 0 of 1)
        output_dir = world.main_decides(Path, output_dir)  # one folder for all ranks: rank 0's
        # rank 0 takes the folder (its lock, stale temporaries) and decides which checkpoint the run continues
        resume_from = world.main_decides(open_run_folder, cfg, output_dir)
        opened = True
        return train_and_test(cfg, output_dir, resume_from, metrics, world, job_num, stop or StopSignals(), started)
    except RunFolderError:
        raise  # the folder is another run's: nothing is written there
    except (Exception, Interrupted) as err:
        record_end(output_dir, metrics, err, opened, started)
        raise


def record_end(output_dir: Path, metrics: dict, err: BaseException, opened: bool, started: float) -> None:
    """metrics.json of a run that failed (status ``failed`` and the error in one line) or that a signal stopped
    before it could save (``interrupted``); never over the record of a run the folder holds, unless this
    process had taken the folder and failed while running it."""
    if isinstance(err, Interrupted):
        if err.saved or holds_run(output_dir):
            return  # already recorded with its checkpoint, or the folder's run is intact
        metrics.update(status="interrupted", signal=err.signal_name)
    elif opened or not holds_run(output_dir):
        metrics.update(status="failed", error=one_line(err))
    else:
        return
    metrics["wall_time_s"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        write_metrics(output_dir, metrics)


def open_run_folder(cfg, output_dir: Path) -> Path | None:
    """This run's folder, taken (seg/runs.py): writable, locked, without stale temporaries; returns the
    checkpoint the run continues, checked to be of this very run (only the keys of seg/identity.py may
    differ), after rebuilding its best.pt if a kill or a user removed it."""
    check_writable(output_dir)
    resume_from = open_run(cfg.trainer.resume, output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        if "config" not in state or "progress" not in state:
            raise CheckpointError(f"trainer.resume={cfg.trainer.resume}: {resume_from} is not a training checkpoint "
                                  f"of this project")
        check_compatible(state["config"], OmegaConf.to_container(cfg, resolve=True), resume_from)
        if "optimizer" not in state:
            raise CheckpointError(f"trainer.resume={cfg.trainer.resume}: {resume_from} holds weights only (a best.pt); "
                                  f"continue the run from its last.pt, or start a new run from these weights with "
                                  f"model.init_from={resume_from}")
        if resume_from.parent == output_dir / "checkpoints":
            repair_best(resume_from, state)
    return resume_from


def repair_best(last: Path, state: dict) -> None:
    """best.pt always follows last.pt: written after it, rebuilt from it when missing or older."""
    best_model = best_weights(state, last)
    if best_model is None:
        return
    path = last.parent / "best.pt"
    best_epoch = state["progress"]["best_epoch"]
    try:
        current = load_checkpoint(path).get("best_epoch") if path.is_file() else None
    except CheckpointError:
        current = None  # unreadable: rebuilt below
    if current != best_epoch:
        was = "older" if path.exists() else "missing"
        save_checkpoint(path, best_record(best_model, state["config"], state.get("domains", []), state["progress"]))
        print(f"Rebuilt {path} (epoch {best_epoch}) from {last.name}: it was {was}")


def best_record(model_state: dict, config: dict, domains: list, progress: dict) -> dict:
    """best.pt: the best validation epoch's weights and what is needed to use them (scripts/predict.py)."""
    return {"format_version": FORMAT_VERSION, "model": model_state, "config": config, "domains": domains,
            "best_epoch": progress["best_epoch"], "best_val_dice": progress["best_dice"], "step": progress["step"]}


def train_and_test(cfg, output_dir: Path, resume_from: Path | None, metrics: dict, world: World,
                   job_num: int | None, stop: StopSignals, started: float) -> dict:
    """``train``'s work, in the order it happens, once the run's folder is taken."""
    seed_everything(cfg.seed)
    configure_determinism(cfg.trainer.deterministic)
    device = resolve_device(cfg.trainer.device, world, job_num)
    precision = resolve_precision(cfg.trainer.precision, device)
    autocast = autocast_context(device, precision)
    if cfg.trainer.compile:
        check_compile(cfg.trainer.compile_backend, device)
    print(f"Device: {describe_device(device)}; precision {precision}"
          + (f"; compiled ({cfg.trainer.compile_backend})" if cfg.trainer.compile else "")
          + (f"; {world.size} processes (DDP), batch {cfg.trainer.batch_size} each" if world.size > 1 else ""))
    progress_bar = cfg.trainer.progress and world.is_main
    config = OmegaConf.to_container(cfg, resolve=True)
    norm_options = norm_options_of(cfg)
    metrics.update(device=str(device), precision=precision, compile=cfg.trainer.compile, world_size=world.size)

    # ---- data: disk -> preprocessed 2D slices (cached next to the data), held on the training device
    with world.main_first():  # rank 0 generates the phantom and writes the data cache; the others read it
        loaded = load_splits(cfg.data, cfg.seed, progress_bar)
    metrics.update(loaded.record())  # the split's patients, cases skipped as bad, the data cache used
    splits = {name: split.to(device) for name, split in loaded.items()}
    train_set, val_set, test_set = splits["train"], splits.get("val"), splits["test"]
    classes = class_names(cfg.data.task)
    num_classes = len(classes) + 1
    for name, split in splits.items():
        metrics[f"num_{name}_slices"], metrics[f"num_{name}_volumes"] = len(split), len(split.cases)
    print("Data: " + ", ".join(f"{name} {len(s)} slices / {len(s.cases)} volumes" for name, s in splits.items()))

    # the domain (vendor) of every slice, for conditional norms: 0..D-1 the training domains, -1 unseen ones
    domains = sorted({str(c[cfg.data.domain_key]) for c in train_set.cases if c.get(cfg.data.domain_key)})
    domain_of = {name: split.domain_ids(domains, cfg.data.domain_key) for name, split in splits.items()}
    metrics["domains"] = domains
    if "domain" in getattr(norm_class(cfg.norm.name), "condition_inputs", ()) and not domains:
        raise ConfigError(f"norm={cfg.norm.name} needs a domain per image, but no training case of data={cfg.data.name} "
                          f"records data.domain_key={cfg.data.domain_key!r} (the phantom and M&Ms record vendor)")

    # ---- model, optimizer, learning-rate schedule, loss
    try:  # a norm option that does not fit a layer's width (e.g. groups) surfaces here, before any step
        model = UNet(in_channels=cfg.model.in_channels, num_classes=num_classes,
                     base_channels=cfg.model.base_channels, depth=cfg.model.depth, norm=cfg.norm.name,
                     norm_options=norm_options, init=cfg.model.init, bias_init=cfg.model.bias_init,
                     num_domains=max(len(domains), 1), up=cfg.model.up).to(device)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"norm={cfg.norm.name} with {norm_options} does not fit this U-Net: {err}") from None
    if cfg.model.init_from:
        load_weights(model, cfg.model.init_from)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # how the model runs: compiled (trainer.compile), and in training wrapped for data parallelism
    # (DDP averages the gradients over the ranks); checkpoints always hold the plain model's weights
    fast_model = torch.compile(model, backend=cfg.trainer.compile_backend) if cfg.trainer.compile else model
    train_model = world.data_parallel(fast_model, device)
    post_step_layers = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, OmegaConf.to_container(cfg.schedule, resolve=True), cfg.trainer.epochs)
    loss_fn = build_loss(cfg.loss)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # shuffling and augmentation
    batch_size, log_every = cfg.trainer.batch_size, cfg.trainer.log_every_n_steps
    checkpoint_every = cfg.trainer.checkpoint_every_n_steps
    num_parameters = sum(p.numel() for p in model.parameters())
    metrics["num_parameters"] = num_parameters
    if cfg.trainer.save_checkpoints:
        check_free_space(output_dir, 10 * num_parameters * 4 + 2**20)  # last (with best) + best + temporaries

    # where the run stands; a checkpoint saves it, resuming restores it
    progress = {"epoch": 1, "batch": 0, "order": None, "step": 0, "epoch_losses": [], "history": [],
                "best_dice": -math.inf, "best_epoch": None, "train_time": 0.0, "train_time_before_epoch": 0.0}
    best_state = None
    if resume_from is not None:
        progress, best_state = restore(resume_from, model, optimizer, scheduler, generator)
        print(f"Resuming {resume_from}: epoch {progress['epoch']}, step {progress['step']}")
    saved = {"step": progress["step"] if resume_from is not None else None}  # the step of the last checkpoint

    def checkpoint() -> None:
        """last.pt, then (when the best epoch changed) best.pt: last.pt alone is the truth at every instant."""
        if cfg.trainer.save_checkpoints and world.is_main:
            folder = output_dir / "checkpoints"
            save_checkpoint(folder / "last.pt", {
                "format_version": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "rng": rng_states(),
                "progress": progress, "config": config, "domains": domains, "best_model": best_state,
                "scheduler_job": scheduler_job()})
            if best_state is not None and progress["best_epoch"] != written_best.get("epoch"):
                save_checkpoint(folder / "best.pt", best_record(best_state, config, domains, progress))
                written_best["epoch"] = progress["best_epoch"]
        saved["step"] = progress["step"]

    written_best = {"epoch": progress["best_epoch"]}  # best.pt on disk holds this epoch (repaired at start)
    writer = (SummaryWriter(str(output_dir), purge_step=progress["step"] + 1 if resume_from else None)
              if world.is_main else SilentWriter())  # rank 0 alone logs
    steps_per_epoch = len(world.batches(torch.arange(len(train_set)), batch_size))
    total_steps = cfg.trainer.epochs * steps_per_epoch
    pending_losses: list[torch.Tensor] = []

    def flush_losses() -> float | None:
        """Log the losses (mean over ranks) of the steps since the last flush (one device sync); a non-finite
        one is returned."""
        losses = world.mean(torch.stack(pending_losses)).tolist() if pending_losses else []
        first = progress["step"] - len(losses) + 1
        pending_losses.clear()
        for offset, value in enumerate(losses):
            if not math.isfinite(value):
                progress["step"] = first + offset
                return value
            writer.add_scalar("train/loss", value, first + offset)
        progress["epoch_losses"].extend(losses)
        return None

    def stop_if_requested(where: str) -> None:
        """A signal asked to stop (all ranks agree): save where the run stands, record it, raise Interrupted."""
        if not world.any(stop.requested is not None):
            return
        if saved["step"] != progress["step"]:
            checkpoint()
        bar.close()
        metrics.update(status="interrupted", signal=stop.requested, steps=progress["step"],
                       epochs_done=len(progress["history"]), history=progress["history"],
                       checkpoint=str(output_dir / "checkpoints" / "last.pt") if cfg.trainer.save_checkpoints else None,
                       wall_time_s=time.perf_counter() - started)
        writer.close()
        write_metrics(output_dir, metrics)
        world.barrier()  # every rank leaves once rank 0 has written
        raise Interrupted(stop.requested or "a signal", saved=cfg.trainer.save_checkpoints,
                          where=f"at epoch {progress['epoch']}, step {progress['step']} ({where})")

    # ---- the loop: epochs of shuffled batches, then validation
    bar = tqdm(total=total_steps, initial=progress["step"], unit="step", disable=not progress_bar)
    stop.defer()  # from here a signal stops the run after the step in progress
    try:
        with quiet_writer_thread_errors():
            while progress["epoch"] <= cfg.trainer.epochs:
                epoch = progress["epoch"]
                bar.set_description(f"epoch {epoch}/{cfg.trainer.epochs}")
                model.train()
                if progress["order"] is None:
                    progress["order"] = epoch_order(len(train_set), generator, cfg.data.shuffle_buffer, device)
                batches = world.batches(progress["order"], batch_size)  # this rank's part of each global batch
                epoch_start = time.perf_counter()
                while progress["batch"] < len(batches):
                    batch = batches[progress["batch"]].to(device)
                    images, labels = augment_batch(train_set.images[batch], train_set.labels[batch],
                                                   rotate_deg=cfg.data.augment.rotate_deg, flip=cfg.data.augment.flip,
                                                   generator=generator, shard=(world.rank, world.size))
                    with autocast:  # trainer.precision=bf16: the forward pass in bfloat16 where safe
                        logits, aux_logits = train_model(images.contiguous(memory_format=memory_format),
                                                         domain_of["train"][batch], with_aux=True)
                    loss = loss_fn(logits.float(), labels.long())
                    if aux_logits is not None:  # a conditioner's low-resolution head (sean's coarse regions)
                        loss = loss + cfg.model.aux_weight * auxiliary_loss(aux_logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    for layer in post_step_layers:  # e.g. BIN clips its gates to [0, 1]
                        layer.after_optimizer_step()
                    progress["step"] += 1
                    progress["batch"] += 1
                    pending_losses.append(loss.detach())
                    bar.update()
                    step = progress["step"]
                    at_epoch_end = progress["batch"] == len(batches)
                    stopping = not at_epoch_end and world.any(stop.requested is not None)
                    if (step % log_every == 0 or at_epoch_end or stopping
                            or (checkpoint_every and step % checkpoint_every == 0)):
                        bad = flush_losses()
                        if bad is not None:
                            return finish_diverged(metrics, writer, output_dir, progress["step"], bad, started, bar)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                        bar.set_postfix(loss=f"{progress['epoch_losses'][-1]:.4f}")
                        if (stopping or checkpoint_every and step % checkpoint_every == 0) and not at_epoch_end:
                            progress["train_time"] += time.perf_counter() - epoch_start
                            epoch_start = time.perf_counter()
                            checkpoint()
                    if stopping:
                        stop_if_requested("mid-epoch")
                progress["train_time"] += time.perf_counter() - epoch_start
                epoch_lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
                scheduler.step()  # the learning rate changes here, by the schedule (seg/schedules.py)

                step = progress["step"]
                epoch_seconds = progress["train_time"] - progress["train_time_before_epoch"]
                entry = {"epoch": epoch, "step": step, "lr": epoch_lr,
                         "train_loss": float(np.mean(progress["epoch_losses"])),
                         "images_per_s": len(train_set) / max(epoch_seconds, 1e-9)}
                writer.add_scalar("perf/images_per_s", entry["images_per_s"], step)
                for layer, weights in mixing_weights(model).items():  # which normalization each layer chose
                    for key, value in weights.items():
                        writer.add_scalar(f"norm/{layer}/{key}", value, step)
                score = float(epoch)  # without a validation set, the last epoch is the best
                if val_set is not None:
                    world.sync_buffers(model)  # every rank evaluates (its share) with rank 0's running statistics
                    with autocast:
                        val, prediction = evaluate(fast_model, val_set, num_classes, classes,
                                                   cfg.trainer.eval_batch_size, domain_of["val"], world=world)
                    entry.update({f"val_{k}": v for k, v in val.items()})
                    for key, value in val.items():
                        writer.add_scalar(f"val/{key}", value, step)
                    writer.add_image("val/input_truth_prediction", image_panel(val_set, prediction, num_classes,
                                                                               cfg.trainer.num_panel_images), step)
                    score = val["dice"] if not math.isnan(val["dice"]) else -math.inf
                progress["history"].append(entry)
                if score > progress["best_dice"] or progress["best_epoch"] is None:
                    progress["best_dice"], progress["best_epoch"] = score, epoch
                    best_state = copy.deepcopy(model.state_dict())
                progress.update(epoch=epoch + 1, batch=0, order=None, epoch_losses=[],
                                train_time_before_epoch=progress["train_time"])
                checkpoint()
                stop_if_requested("at the end of an epoch")
            bar.close()
            stop_if_requested("before the test")
            train_images = len(train_set) * len(progress["history"])  # epochs completed

            # ---- test, with the weights of the best validation epoch
            model.load_state_dict(best_state)
            with autocast:
                test, test_prediction = evaluate(fast_model, test_set, num_classes, classes,
                                                 cfg.trainer.eval_batch_size, domain_of["test"], world=world)
            for key, value in test.items():
                writer.add_scalar(f"test/{key}", value, progress["step"])
            best = progress["best_dice"] if val_set is not None else None
            metrics.update(status="ok", **test, best_val_dice=nan_to_none(best), best_epoch=progress["best_epoch"],
                           steps=progress["step"], train_time_s=progress["train_time"],
                           images_per_s=train_images / max(progress["train_time"], 1e-9), history=progress["history"],
                           mixing_weights=mixing_weights(model), resumed_from=str(resume_from) if resume_from else None,
                           wall_time_s=time.perf_counter() - started)
            metrics["per_volume"] = per_volume_dice(test_prediction, test_set, num_classes, classes)  # paired tests
            if cfg.trainer.compile:
                metrics["graph_breaks"] = graph_breaks()  # 0 for every norm (a test checks)
            log_hparams(writer, metrics)
            writer.close()
    except torch.OutOfMemoryError:
        raise TrainingFailed(f"out of memory on {device} at batch size {batch_size} (step {progress['step']}); "
                             f"try a smaller trainer.batch_size, trainer.precision=bf16 or a smaller "
                             f"data.image_size") from None
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise CheckpointError(f"could not write to the run folder {output_dir} ({err.strerror}); "
                              + (f"its last checkpoint (step {saved['step']}) is intact" if saved["step"] is not None
                                 else "no checkpoint had been written yet")) from None
    write_metrics(output_dir, metrics)
    print_report(metrics, classes)
    return metrics


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


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


def norm_options_of(cfg) -> dict:
    return {k: v for k, v in cfg.norm.items() if k != "name"}


def one_line(err: BaseException) -> str:
    """An error as one line: its message, with the exception's type when that is not one of ours."""
    text = " ".join(str(err).split())
    ours = (ConfigError, CheckpointError, TrainingFailed, DataError)
    return text if isinstance(err, ours) else f"{type(err).__name__}: {text}"


def restore(path: Path, model, optimizer, scheduler, generator) -> tuple[dict, dict | None]:
    """Load a run's checkpoint into the live objects; returns its progress and the best epoch's weights."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    restore_rng_states(state["rng"])
    return state["progress"], best_weights(state, path)


# ---------------------------------------------------------------------------- builders


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """SGD (momentum 0.9 by default) or Adam (``optim.momentum`` as its beta1) over the model's parameters.

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
    return torch.optim.Adam(param_groups, lr=optim_cfg.lr, betas=(optim_cfg.momentum, 0.999))


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Start from the weights of a checkpoint (``model.init_from``); a different model is refused clearly.

    The checkpoint may come from another norm (that is the point of fine-tuning with frozen BN),
    so only the tensors are compared: names and shapes must match.
    """
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


def auxiliary_loss(aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a low-resolution prediction against each class's share of the pixels of its cell."""
    target = F.one_hot(labels.long(), aux_logits.shape[1]).permute(0, 3, 1, 2).float()
    return F.cross_entropy(aux_logits.float(), F.adaptive_avg_pool2d(target, aux_logits.shape[-2:]))


def resolve_device(name: str, world: World | None = None, job_num: int | None = None) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable device is a clear error.

    Which GPU for ``cuda``: under torchrun, each process its own (LOCAL_RANK); in a sweep, whose jobs
    may run side by side on one machine, one that no other job holds (``sweep_gpu``); else the first.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available on this machine (use auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available on this machine (use auto or cpu)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={name}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    processes = world.size if world is not None else 1
    if name == "cuda" and processes > 1:
        return torch.device("cuda", world.local_rank)
    if name == "cuda":
        return torch.device("cuda", 0 if job_num is None else sweep_gpu(job_num, gpu_names()))
    if name.startswith("cuda:") and processes > 1:
        raise ConfigError(f"trainer.device={name} names one GPU for all {processes} processes of this torchrun job; "
                          f"use trainer.device=auto or cuda (each process takes the GPU of its LOCAL_RANK)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports bfloat16, else fp32; bf16 on a GPU without it is a clear error."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if name == "bf16" and not bf16_ok:
        raise ConfigError(f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          f"use trainer.precision=fp32")
    return name


def autocast_context(device: torch.device, precision: str):
    """The context of the forward pass: autocast to bfloat16 (weights, norm statistics and loss stay
    float32), or nothing for fp32. Reusable: ``with autocast:`` at every step."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_compile(backend: str, device: torch.device) -> None:
    """Refuse, before any work, a setup where torch.compile cannot run: a Python that dynamo does not
    support, inductor on CUDA without Triton, inductor on CPU without a C++ compiler."""
    import torch._dynamo

    problem = None
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as err:
        problem = f"torch.compile does not run here ({err})"
    if problem is None and backend == "inductor" and device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            problem = f"the inductor backend needs Triton on {device} (pip install triton)"
    if problem is None and backend == "inductor" and device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            problem = (f"the inductor backend needs a C++ compiler on the CPU and found none "
                       f"(CXX={os.environ.get('CXX', 'g++')}); install g++ or set CXX")
    if problem:
        raise ConfigError(f"trainer.compile=true: {problem}; or use trainer.compile=false")


def graph_breaks() -> int:
    """How many graph breaks torch.compile met in this process (0: each model call is one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


class SilentWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class TrainingFailed(RuntimeError):
    """A run that cannot go on (e.g. out of memory); the message says why and what to try."""


def configure_determinism(deterministic: bool) -> None:
    """``trainer.deterministic``: deterministic kernels only, so a resumed run repeats bit for bit."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(output_dir: Path) -> None:
    """Fail before any work if the run folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test.{os.getpid()}"  # one per process: ranks may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"cannot write to the output folder {output_dir}: {err}") from None


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

    temporary = output_dir / f".metrics.json.tmp-{os.getpid()}"  # one per process
    try:
        temporary.write_text(json.dumps(clean(metrics), indent=2, default=str))
        os.replace(temporary, output_dir / "metrics.json")
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


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
