"""The training loop: ``train(cfg, output_dir)`` is its table of contents, each phase a function below it.

    set_up          seeds, the device, the data on it, the model, optimizer, schedule and loss: a ``Run``
    starting_state  where the run stands: a fresh ``RunState``, or the one its last.pt saved (seg/runtime/checkpoint.py)
    train_epoch     the epoch's shuffled batches, each one ``train_step`` (seg/training/step.py), the losses logged
    end_epoch       the epoch's record, validation, the best epoch's weights, last.pt; a signal stops here
    evaluate_split  the Dice of one split (validation after each epoch, test at the end)
    finish          the test with the best validation epoch's weights (per test volume also HD, HD95, ASSD and
                    volumes, per patient EF and mass: seg/evaluation/per_volume.py), metrics.json and the report

The learning rate changes in ``train`` itself, at the end of every epoch, by the schedule (seg/training/schedules.py).
Where the pieces come from: the model ``seg.model.build.build_model``, the optimizer ``seg.training.optimizers``, the
loss ``seg.training.losses``, the device and precision ``seg.runtime.device``, the run folder ``seg.runtime.runs``, metrics.json
and TensorBoard ``seg.training.reporting``. Under torchrun the same loop runs in every process; ``world``
(seg/runtime/distributed.py) gives each its share of the data and averages what they compute; rank 0 alone
logs and writes.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from .augment import augment_batch
from ..runtime.checkpoint import (CheckpointError, RunState, best_record, check_free_space, last_record, restore_run,
                         save_checkpoint)
from .checks import validate
from ..data import DataError, class_names, load_splits
from ..data.augmentations import Augmentation, augmentation_of
from ..runtime.distributed import World
from .losses import build_loss
from ..evaluation.dice import evaluate
from ..evaluation.per_volume import per_volume_figures, summary as per_volume_summary
from ..model.build import build_model, load_weights, norm_options
from ..norms import spec
from .optimizers import build_optimizer
from .ordering import epoch_order
from .reporting import (augmentation_panel, image_panel, inert_mixing_weights, log_hparams, log_mixing_weights,
                        mixing_weights, nan_to_none, print_report, quiet_writer_thread_errors, tensorboard_writer, write_metrics)
from ..runtime.runs import RunFolderError, holds_run, open_run_folder, scheduler_job
from ..runtime.device import (autocast_context, check_compile, configure_determinism, describe_device, graph_breaks,
                      resolve_device, resolve_precision, seed_everything)
from .schedules import build_schedule
from ..config.schema import ConfigError
from .step import TrainStep, train_step
from ..runtime.stopping import Interrupted, StopSignals

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class TrainingFailed(RuntimeError):
    """A run that cannot go on (e.g. out of memory); the message says why and what to try."""


def train(cfg, output_dir: str | os.PathLike, job_num: int | None = None, stop: StopSignals | None = None) -> dict:
    """Train and test one configuration; returns (and writes to output_dir/metrics.json) its metrics.

    ``job_num``: the job's number in a sweep (it picks the GPU when parallel jobs share a machine).
    ``stop``: the entered ``StopSignals`` of the process (train.py); a signal then stops the run after
    the step in progress, saved (``Interrupted``). Without it, signals keep their usual meaning.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    metrics = first_metrics(cfg, output_dir)
    opened = False  # whether this process holds the folder (from then on, it records the run's end)
    try:
        validate(cfg)
        world = World.current()  # this process among the processes of a torchrun job (one process: rank 0 of 1)
        output_dir = world.main_decides(Path, output_dir)  # one folder for all ranks: rank 0's
        # rank 0 takes the folder (its lock, stale temporaries) and decides which checkpoint the run continues
        resume_from = world.main_decides(open_run_folder, cfg, output_dir)
        opened = True
        run = set_up(cfg, output_dir, resume_from, world, job_num, stop or StopSignals(), metrics, started)
        state = starting_state(run)
        with failures_in_one_line(run, state):
            while state.epoch <= cfg.trainer.epochs:
                lr = run.optimizer.param_groups[0]["lr"]  # the rate of this epoch, set by the schedule
                diverged_loss = train_epoch(run, state)
                if diverged_loss is not None:
                    return finish_diverged(run, state, diverged_loss)
                run.scheduler.step()  # the learning rate changes here, at the end of every epoch (seg/training/schedules.py)
                end_epoch(run, state, lr)
            finish(run, state)
        return report(run)
    except RunFolderError:
        raise  # the folder is another run's: nothing is written there
    except (Exception, Interrupted) as err:
        record_end(output_dir, metrics, err, opened, started)
        raise


# ---------------------------------------------------------------------------- what a run is set up with


@dataclass
class Run:
    """What a run is set up with (``set_up``), and the bookkeeping of its writes; where it stands is the
    ``RunState``."""

    cfg: Any
    output_dir: Path
    resume_from: Path | None  # the checkpoint the run continues (None: a fresh run)
    world: World
    stop: StopSignals
    metrics: dict  # metrics.json in the making
    started: float  # perf_counter() at the start of ``train``
    device: torch.device
    autocast: Any  # the forward pass's precision context (reusable)
    splits: dict  # "train", "val" (if any), "test" -> SliceSet on the device
    domains: list[str]  # the training domains (vendors) of a conditional norm
    domain_of: dict  # split name -> the domain id of each of its slices (-1: not a training domain)
    classes: list[str]  # the task's foreground classes
    model: torch.nn.Module  # the plain model: checkpoints hold its weights
    fast_model: torch.nn.Module  # as it evaluates: compiled (trainer.compile), or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: TrainStep  # what train_step needs besides the batch (the model as it trains: compiled, DDP-wrapped)
    generator: torch.Generator  # shuffling and augmentation
    config: dict  # the resolved configuration, as checkpoints record it
    augmentation: Augmentation = Augmentation()  # data.augment, resolved (its preset applied)
    writer: Any = None  # TensorBoard (rank 0), created once the run knows where it stands
    bar: Any = None  # the progress bar (trainer.progress)
    best_weights: dict | None = None  # the best validation epoch's weights (last.pt carries them too)
    saved_step: int | None = None  # the step of the last checkpoint written
    written_best: int | None = None  # the epoch whose weights best.pt holds
    pending_losses: list = field(default_factory=list)  # losses of the steps not yet logged (device tensors)

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1


def first_metrics(cfg, output_dir: Path) -> dict:
    """metrics.json's first keys: what the run is, known before anything is checked."""
    def value(key: str):  # a key removed with ~ (refused by validate next) is None here
        try:
            return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except (AttributeError, OmegaConfBaseException):  # a group removed with ~ (``~norm``) reads "???"
            return None

    return {"status": "running", "norm": value("norm.name"),
            "norm_options": norm_options(cfg) if OmegaConf.is_dict(value("norm")) else {}, "lr": value("lr"),
            "batch_size": value("trainer.batch_size"), "seed": value("seed"), "task": value("data.task"),
            "data": value("data.name"), "loss": value("loss"), "schedule": value("schedule.name"),
            "epochs": value("trainer.epochs"), "output_dir": str(output_dir)}


def set_up(cfg, output_dir: Path, resume_from: Path | None, world: World, job_num: int | None, stop: StopSignals,
           metrics: dict, started: float, load=None) -> Run:
    """Seeds, the device, the data on it, then the model with its optimizer, schedule and loss.

    ``load``: what gets the data, called as ``load_data`` (default); the stacked sweep passes one that loads
    the data of a (data configuration, seed) once for all the runs that read it."""
    seed_everything(cfg.seed)
    configure_determinism(cfg.trainer.deterministic)
    device = resolve_device(cfg.trainer.device, world, job_num)
    precision = resolve_precision(cfg.trainer.precision, device)
    if cfg.trainer.compile:
        check_compile(cfg.trainer.compile_backend, device)
    print(f"Device: {describe_device(device)}; precision {precision}"
          + (f"; compiled ({cfg.trainer.compile_backend})" if cfg.trainer.compile else "")
          + (f"; {world.size} processes (DDP), batch {cfg.trainer.batch_size} each" if world.size > 1 else ""))
    metrics.update(device=str(device), precision=precision, compile=cfg.trainer.compile, world_size=world.size)
    splits, domains, domain_of = (load or load_data)(cfg, world, device, metrics)

    model = build_model(cfg, num_domains=max(len(domains), 1)).to(device)
    if cfg.model.init_from:
        load_weights(model, cfg.model.init_from)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # how the model runs: compiled (trainer.compile), and in training wrapped for data parallelism
    # (DDP averages the gradients over the ranks); checkpoints always hold the plain model's weights
    fast_model = torch.compile(model, backend=cfg.trainer.compile_backend) if cfg.trainer.compile else model
    train_module = world.data_parallel(fast_model, device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, OmegaConf.to_container(cfg.schedule, resolve=True), cfg.trainer.epochs)
    autocast = autocast_context(device, precision)
    step = TrainStep.of(model, optimizer, build_loss(cfg.loss), module=train_module, autocast=autocast,
                        memory_format=memory_format, aux_weight=cfg.model.aux_weight, grad_clip=cfg.optim.grad_clip)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # shuffling and augmentation
    metrics["num_parameters"] = num_parameters = sum(p.numel() for p in model.parameters())
    metrics["mixing_weights_inert"] = inert = inert_mixing_weights(model)
    if inert:  # e.g. ILN's rho where channels = groups: its value would read as a choice the network made
        reasons = sorted(set(inert.values()))
        print(f"Note: the mixing weights of {len(inert)} layers cannot act ({'; '.join(reasons)}): "
              f"{', '.join(inert)}; they are not logged")
    if cfg.trainer.save_checkpoints:
        check_free_space(output_dir, 10 * num_parameters * 4 + 2**20)  # last (with best) + best + temporaries
    return Run(cfg, output_dir, resume_from, world, stop, metrics, started, device, autocast, splits, domains,
               domain_of, class_names(cfg.data.task), model, fast_model, optimizer, scheduler, step, generator,
               OmegaConf.to_container(cfg, resolve=True), augmentation=augmentation_of(cfg.data.augment))


def load_data(cfg, world: World, device: torch.device, metrics: dict) -> tuple[dict, list[str], dict]:
    """Disk -> preprocessed 2D slices (cached next to the data), held on the training device; the domain
    (vendor) of every slice, for conditional norms: 0..D-1 the training domains, -1 unseen ones."""
    with world.main_first():  # rank 0 generates the phantom and writes the data cache; the others read it
        loaded = load_splits(cfg.data, cfg.seed, cfg.trainer.progress and world.is_main)
    metrics.update(loaded.record())  # the split's patients, cases skipped as bad, the data cache used
    splits = {name: split.to(device) for name, split in loaded.items()}
    for name, split in splits.items():
        metrics[f"num_{name}_slices"], metrics[f"num_{name}_volumes"] = len(split), len(split.cases)
    print("Data: " + ", ".join(f"{name} {len(s)} slices / {len(s.cases)} volumes" for name, s in splits.items()))
    key = cfg.data.domain_key
    domains = sorted({str(c[key]) for c in splits["train"].cases if c.get(key)})
    domain_of = {name: split.domain_ids(domains, key) for name, split in splits.items()}
    metrics["domains"] = domains
    if spec(cfg.norm.name).needs_domain and not domains:
        raise ConfigError(f"norm={cfg.norm.name} needs a domain per image, but no training case of "
                          f"data={cfg.data.name} records data.domain_key={key!r} (the phantom and M&Ms record vendor)")
    return splits, domains, domain_of


def starting_state(run: Run) -> RunState:
    """Where the run starts: a fresh ``RunState``, or the one its checkpoint saved (the model, optimizer,
    schedule and random generators restored with it); then its TensorBoard writer and progress bar. From
    here a signal stops the run after the step in progress."""
    state = RunState()
    if run.resume_from is not None:
        state, run.best_weights = restore_run(run.resume_from, run.model, run.optimizer, run.scheduler,
                                              run.generator)
        print(f"Resuming {run.resume_from}: epoch {state.epoch}, step {state.step}")
        run.saved_step = state.step
    run.written_best = state.best_epoch  # best.pt on disk holds this epoch (repaired when the folder was opened)
    run.writer = tensorboard_writer(run.output_dir, run.world.is_main,
                                    purge_step=state.step + 1 if run.resume_from else None)
    if run.resume_from is None and run.world.is_main:
        log_augmented_examples(run)
    cfg = run.cfg
    steps_per_epoch = len(run.world.batches(torch.arange(len(run.splits["train"])), cfg.trainer.batch_size))
    run.bar = tqdm(total=cfg.trainer.epochs * steps_per_epoch, initial=state.step, unit="step",
                   disable=not (cfg.trainer.progress and run.world.is_main))
    run.stop.defer()  # from here a signal stops the run after the step in progress
    return state


def log_augmented_examples(run: Run) -> None:
    """TensorBoard's ``train/augmented``: training slices as the run's augmentation draws them, each twice
    [input | augmented | its labels | augmented again | its labels], from a generator of their own (seeded by the
    run's seed): the run's own draws are untouched."""
    train_set = run.splits["train"]
    with_foreground = torch.nonzero(train_set.labels.flatten(1).any(1)).flatten().cpu()
    pool = with_foreground if len(with_foreground) else torch.arange(len(train_set))
    chosen = pool[torch.linspace(0, len(pool) - 1, min(run.cfg.trainer.num_panel_images, len(pool))).long()]
    images, labels = train_set.images[chosen.to(train_set.images.device)], train_set.labels[chosen.to(
        train_set.labels.device)]
    generator = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    draws = [augment_batch(images, labels, run.augmentation, generator=generator) for _ in range(2)]
    run.writer.add_image("train/augmented", augmentation_panel(images, draws, run.num_classes), 0)


# ---------------------------------------------------------------------------- an epoch


def train_epoch(run: Run, state: RunState) -> float | None:
    """The epoch ``state.epoch`` from its batch ``state.batch`` on: each batch augmented and one ``train_step``;
    the losses logged (and last.pt written every trainer.checkpoint_every_n_steps). Returns the loss if it
    became non-finite (the run diverged), else None."""
    cfg, world = run.cfg, run.world
    train_set = run.splits["train"]
    run.bar.set_description(f"epoch {state.epoch}/{cfg.trainer.epochs}")
    run.model.train()
    if state.order is None:
        state.order = epoch_order(len(train_set), run.generator, cfg.data.shuffle_buffer, run.device)
    batches = world.batches(state.order, cfg.trainer.batch_size)  # this rank's part of each global batch
    log_every, checkpoint_every = cfg.trainer.log_every_n_steps, cfg.trainer.checkpoint_every_n_steps
    epoch_start = time.perf_counter()
    while state.batch < len(batches):
        batch = batches[state.batch].to(run.device)
        images, labels = augment_batch(train_set.images[batch], train_set.labels[batch], run.augmentation,
                                       generator=run.generator, shard=(world.rank, world.size))
        run.pending_losses.append(train_step(run.step, images, labels, run.domain_of["train"][batch]))
        state.step += 1
        state.batch += 1
        run.bar.update()
        at_epoch_end = state.batch == len(batches)
        stopping = not at_epoch_end and world.any(run.stop.requested is not None)
        checkpoint_due = bool(checkpoint_every) and state.step % checkpoint_every == 0
        if state.step % log_every == 0 or at_epoch_end or stopping or checkpoint_due:
            diverged_loss = log_losses(run, state)
            if diverged_loss is not None:
                return diverged_loss
            if (stopping or checkpoint_due) and not at_epoch_end:
                state.train_time += time.perf_counter() - epoch_start
                epoch_start = time.perf_counter()
                save(run, state)
        if stopping:
            stop_if_requested(run, state, "mid-epoch")
    state.train_time += time.perf_counter() - epoch_start
    return None


def log_losses(run: Run, state: RunState) -> float | None:
    """The losses since the last log (``flush_losses``) and the learning rate, to TensorBoard and the progress bar;
    a non-finite loss is returned (the run diverged at ``state.step``). The stacked sweep logs with it too."""
    diverged_loss = flush_losses(run, state)
    if diverged_loss is not None:
        return diverged_loss
    run.writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], state.step)
    run.bar.set_postfix(loss=f"{state.epoch_losses[-1]:.4f}")
    return None


def flush_losses(run: Run, state: RunState) -> float | None:
    """Log the losses (mean over ranks) of the steps since the last flush (one device sync); a non-finite
    one is returned, and ``state.step`` set to its step."""
    losses = run.world.mean(torch.stack(run.pending_losses)).tolist() if run.pending_losses else []
    first = state.step - len(losses) + 1
    run.pending_losses.clear()
    for offset, value in enumerate(losses):
        if not math.isfinite(value):
            state.step = first + offset
            return value
        run.writer.add_scalar("train/loss", value, first + offset)
    state.epoch_losses.extend(losses)
    return None


def end_epoch(run: Run, state: RunState, lr: float) -> None:
    """The epoch ``state.epoch`` (trained at ``lr``) is recorded and validated; the best epoch's weights are
    kept; last.pt (and best.pt) written; a signal stops the run here."""
    epoch_seconds = state.train_time - state.train_time_before_epoch
    entry = {"epoch": state.epoch, "step": state.step, "lr": lr, "train_loss": float(np.mean(state.epoch_losses)),
             "images_per_s": len(run.splits["train"]) / max(epoch_seconds, 1e-9)}
    run.writer.add_scalar("perf/images_per_s", entry["images_per_s"], state.step)
    log_mixing_weights(run.writer, run.model, state.step)  # which normalization each layer chose
    score = float(state.epoch)  # without a validation set, the last epoch is the best
    if "val" in run.splits:
        run.world.sync_buffers(run.model)  # every rank evaluates (its share) with rank 0's running statistics
        val, prediction = evaluate_split(run, "val")
        entry.update({f"val_{k}": v for k, v in val.items()})
        for key, value in val.items():
            run.writer.add_scalar(f"val/{key}", value, state.step)
        run.writer.add_image("val/input_truth_prediction", image_panel(run.splits["val"], prediction, run.num_classes,
                                                                       run.cfg.trainer.num_panel_images), state.step)
        score = val["dice"] if not math.isnan(val["dice"]) else -math.inf
    state.history.append(entry)
    if score > state.best_dice or state.best_epoch is None:
        state.best_dice, state.best_epoch = score, state.epoch
        run.best_weights = copy.deepcopy(run.model.state_dict())
    state.next_epoch()
    save(run, state)
    stop_if_requested(run, state, "at the end of an epoch")


def evaluate_split(run: Run, name: str) -> tuple[dict, torch.Tensor]:
    """Dice of the split ``name`` (3D per volume, 2D per slice, per class) with the model as it is, and the
    predicted labels of its slices."""
    with run.autocast:
        return evaluate(run.fast_model, run.splits[name], run.num_classes, run.classes,
                        run.cfg.trainer.eval_batch_size, run.domain_of[name], world=run.world)


# ---------------------------------------------------------------------------- saving and stopping


def save(run: Run, state: RunState) -> None:
    """last.pt, then (when the best epoch changed) best.pt: last.pt alone is the truth at every instant."""
    if run.cfg.trainer.save_checkpoints and run.world.is_main:
        folder = run.output_dir / "checkpoints"
        save_checkpoint(folder / "last.pt", last_record(run.model, run.optimizer, run.scheduler, run.generator, state,
                                                        run.config, run.domains, run.best_weights, scheduler_job()))
        if run.best_weights is not None and state.best_epoch != run.written_best:
            save_checkpoint(folder / "best.pt", best_record(run.best_weights, run.config, run.domains, state))
            run.written_best = state.best_epoch
    run.saved_step = state.step


def stop_if_requested(run: Run, state: RunState, where: str) -> None:
    """A signal asked to stop (all ranks agree): save where the run stands, record it, raise Interrupted."""
    if not run.world.any(run.stop.requested is not None):
        return
    if run.saved_step != state.step:
        save(run, state)
    run.bar.close()
    save_checkpoints = run.cfg.trainer.save_checkpoints
    run.metrics.update(status="interrupted", signal=run.stop.requested, steps=state.step,
                       epochs_done=len(state.history), history=state.history,
                       checkpoint=str(run.output_dir / "checkpoints" / "last.pt") if save_checkpoints else None,
                       wall_time_s=time.perf_counter() - run.started)
    run.writer.close()
    write_metrics(run.output_dir, run.metrics)
    run.world.barrier()  # every rank leaves once rank 0 has written
    raise Interrupted(run.stop.requested or "a signal", saved=save_checkpoints,
                      where=f"at epoch {state.epoch}, step {state.step} ({where})")


@contextlib.contextmanager
def failures_in_one_line(run: Run, state: RunState):
    """Running out of memory or disk ends the run with one line (TrainingFailed, CheckpointError) that says
    what to try, or which checkpoint is intact."""
    try:
        with quiet_writer_thread_errors():
            yield
    except torch.OutOfMemoryError:
        raise TrainingFailed(f"out of memory on {run.device} at batch size {run.cfg.trainer.batch_size} "
                             f"(step {state.step}); try a smaller trainer.batch_size, trainer.precision=bf16 or a "
                             f"smaller data.image_size") from None
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise CheckpointError(f"could not write to the run folder {run.output_dir} ({err.strerror}); "
                              + (f"its last checkpoint (step {run.saved_step}) is intact" if run.saved_step is not None
                                 else "no checkpoint had been written yet")) from None


# ---------------------------------------------------------------------------- the end of a run


def finish(run: Run, state: RunState) -> None:
    """The test, with the weights of the best validation epoch; the run's metrics; TensorBoard's HParams row."""
    run.bar.close()
    stop_if_requested(run, state, "before the test")
    train_images = len(run.splits["train"]) * len(state.history)  # epochs completed
    run.model.load_state_dict(run.best_weights)
    test, test_prediction = evaluate_split(run, "test")
    for key, value in test.items():
        run.writer.add_scalar(f"test/{key}", value, state.step)
    best = state.best_dice if "val" in run.splits else None
    run.metrics.update(status="ok", **test, best_val_dice=nan_to_none(best), best_epoch=state.best_epoch,
                       steps=state.step, train_time_s=state.train_time,
                       images_per_s=train_images / max(state.train_time, 1e-9), history=state.history,
                       mixing_weights=mixing_weights(run.model),
                       resumed_from=str(run.resume_from) if run.resume_from else None,
                       wall_time_s=time.perf_counter() - run.started)
    if run.world.is_main:  # rank 0 alone writes metrics.json: the others skip the surface distances
        # per test volume: Dice, HD, HD95, ASSD, volumes, phase, vendor (for the paired tests of a study)
        rows = per_volume_figures(test_prediction, run.splits["test"], run.num_classes, run.classes)
        run.metrics.update(per_volume_summary(rows, run.classes), per_volume=rows)
    if run.cfg.trainer.compile:
        run.metrics["graph_breaks"] = graph_breaks()  # 0 for every norm (a test checks)
    log_hparams(run.writer, run.metrics)
    run.writer.close()


def report(run: Run) -> dict:
    """metrics.json and the printed summary of a finished run; its metrics."""
    write_metrics(run.output_dir, run.metrics)
    print_report(run.metrics, run.classes)
    return run.metrics


def finish_diverged(run: Run, state: RunState, loss: float) -> dict:
    """End a run whose loss became non-finite: status 'diverged', no Dice (not a zero)."""
    run.bar.close()
    metrics = run.metrics
    metrics.update(status="diverged", diverged_step=state.step, diverged_loss=str(loss), dice=None, dice_2d=None,
                   best_val_dice=None, steps=state.step, wall_time_s=time.perf_counter() - run.started)
    run.writer.add_text("status", f"diverged at step {state.step}: loss {loss}", state.step)
    log_hparams(run.writer, metrics)
    run.writer.close()
    write_metrics(run.output_dir, metrics)
    print(f"Run diverged: the loss became {loss} at step {state.step} (norm={metrics['norm']}, lr={metrics['lr']}); "
          f"metrics.json records status 'diverged'")
    return metrics


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


# the errors a user can fix: their message is the one line a failed run or sweep job prints
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingFailed, RunFolderError)


def sweep_job_error(err: BaseException, output_dir: Path) -> str:
    """The line a sweep job that failed prints (train.py, the stacked launcher): the message of an error a user
    can fix; for another error (a bug) its type and message, its traceback written to output_dir/traceback.txt."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    trace = Path(output_dir) / "traceback.txt"
    with contextlib.suppress(OSError):
        trace.write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return f"{type(err).__name__}: {' '.join(str(err).split())} (traceback in {trace})"


def one_line(err: BaseException) -> str:
    """An error as one line: its message, with the exception's type when that is not one of ours."""
    text = " ".join(str(err).split())
    ours = (ConfigError, CheckpointError, TrainingFailed, DataError)
    return text if isinstance(err, ours) else f"{type(err).__name__}: {text}"
