"""The runs of a stacked sweep (``hydra/launcher=stacked``): K runs trained as one computation, each
written exactly as ``seg.training.loop.train`` writes a run.

``train_stack(jobs, stop)`` is the launcher's (hydra_plugins/seg_stacked_launcher) one call per stack.
Every run goes through the trainer's own phases (seg/training/loop.py), one run at a time, around a shared
loop of ``seg.training.stacked.Stack`` steps:

    first_metrics, validate, open_run_folder   per run: its metrics.json in the making, its config
                                               checked, its folder taken (lock, resume)
    set_up, starting_state                     per run: seeds, data, model, optimizer, schedule,
                                               generator; a checkpoint restored; TensorBoard, bar
    Stack(models, optimizers)                  the runs that still train, as one computation
    the loop                                   one stacked step of every active run; per run, as
                                               ``train_epoch`` does after a step: ``log_losses``
                                               (the trainer's flush: a non-finite loss ends the
                                               run with ``finish_diverged`` and it is frozen in the
                                               stack), last.pt every checkpoint_every_n_steps;
                                               at the run's epoch end its schedule steps and
                                               ``end_epoch`` validates and saves it (written back
                                               from the stack); after its last epoch ``finish``
                                               and ``report`` test it and write metrics.json
    a signal                                   every unfinished run saved where it stands (status
                                               ``interrupted``, as ``stop_if_requested``), then
                                               ``Interrupted`` for the launcher (exit code 75)
    an error                                   ``record_end`` in the run's folder: one run's error
                                               ends that run; an error of the stacked step (out of
                                               memory) ends every unfinished run of the stack

A run's training time (``images_per_s``) is the wall time of the stacked steps it took part in: the
sweep as a whole trains K runs in that time.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ...runtime.checkpoint import RunState
from ..checks import validate
from ...runtime.distributed import World
from ...model.build import build_model, norm_options
from ...runtime.runs import open_run_folder, unlock_run
from . import RunFeed, Stack, StackedUNet, StackError, check_stackable
from ...runtime.stopping import Interrupted, StopSignals
from ..loop import (Run, TrainingFailed, end_epoch, failures_in_one_line, finish, finish_diverged, first_metrics,
                    load_data, log_losses, record_end, report, save, set_up, starting_state, stop_if_requested)


@dataclass
class Job:
    """One run of a stack: its configuration and folder, as the launcher prepared them."""

    cfg: Any
    output_dir: Path
    job_num: int | None = None
    label: str = ""  # "job 3 (lr=0.1,seed=1): ", the prefix of its one-line messages
    # filled in while it trains
    metrics: dict = field(default_factory=dict)
    started: float = 0.0
    opened: bool = False
    run: Run | None = None
    state: RunState | None = None
    feed: RunFeed | None = None
    outcome: dict | BaseException | None = None  # its metrics, or what ended it

    @property
    def done(self) -> bool:
        return self.outcome is not None


def train_stack(jobs: list[Job], stop: StopSignals, tune: bool = False) -> list[dict | BaseException]:
    """Train ``jobs`` (runs whose configurations share ``seg.training.stacked.stack_key``) as one stack; returns, per
    job, its metrics (status ok or diverged) or the exception that ended it (its metrics.json says failed).
    A signal saves every unfinished run and raises ``Interrupted``. ``stop``: the entered StopSignals.
    ``tune``: choose how each stacked convolution runs by timing it first (``Stack.tune``; the same results)."""
    world = World.current()
    load = SharedData()
    for job in jobs:
        start(job, world, stop, load)
    training = [job for job in jobs if not job.done and not finished_epochs(job)]
    make_feeds(training)
    if training:
        train_together(training, stop, tune)
    for job in jobs:
        if not job.done:  # a resumed run whose epochs were all done: tested again, as the trainer does
            run_phase(job, lambda: end_run(job))
    return [job.outcome for job in jobs]


def check_stack(cfg) -> None:
    """Refuse (StackError, naming why) a configuration whose runs cannot share a stack: ``check_stackable``'s keys,
    then a stack of two of its models built for real (e.g. lcn's channel groups must lie inside each run)."""
    check_stackable([cfg])
    try:
        StackedUNet([build_model(cfg), build_model(cfg)], norm_options(cfg))
    except (ValueError, TypeError) as err:
        if isinstance(err, StackError):
            raise
        raise StackError(f"norm={cfg.norm.name} with {norm_options(cfg)} cannot be stacked: {err}") from None


class SharedData:
    """``load_data`` for the runs of a stack: the slices of one data configuration and seed (one split) are loaded
    once, on the device, and shared by every run that reads them (one copy in memory, one gather per step);
    each run's metrics.json gets the same data entries as if it had loaded them itself."""

    def __init__(self) -> None:
        self.loaded: dict[tuple, tuple] = {}

    def __call__(self, cfg, world: World, device: torch.device, metrics: dict):
        key = (repr(OmegaConf.to_container(cfg.data, resolve=True)), cfg.seed, str(device))
        if key not in self.loaded:
            before = dict(metrics)
            data = load_data(cfg, world, device, metrics)
            entries = {k: v for k, v in metrics.items() if k not in before or before[k] != v}
            self.loaded[key] = data, entries
        data, entries = self.loaded[key]
        metrics.update(copy.deepcopy(entries))
        return data


def start(job: Job, world: World, stop: StopSignals, load: SharedData) -> None:
    """The trainer's first phases for one run: metrics.json's first keys, the config checked, the folder taken,
    the run set up and where it stands (``train`` up to its loop)."""
    job.started = time.perf_counter()
    job.metrics = first_metrics(job.cfg, job.output_dir)
    try:
        validate(job.cfg)
        resume_from = open_run_folder(job.cfg, job.output_dir)
        job.opened = True
        job.run = set_up(job.cfg, job.output_dir, resume_from, world, job.job_num, stop, job.metrics, job.started,
                         load=load)
        job.state = starting_state(job.run)
    except (Exception, Interrupted) as err:
        fail(job, err)


def one_bar(jobs: list[Job]):
    """One progress bar for the stack (the steps of its longest run) in place of the runs' own bars."""
    for job in jobs:
        job.run.bar.leave = False  # cleared, not left on the terminal
        job.run.bar.close()
        job.run.bar = tqdm(disable=True)
    total = max((job.feed.epochs - job.feed.epoch + 1) * job.feed.batches_per_epoch - job.feed.batch for job in jobs)
    return tqdm(total=total, unit="step", desc=f"stack of {len(jobs)} runs",
                disable=not (jobs[0].cfg.trainer.progress and jobs[0].run.world.is_main))


def make_feeds(jobs: list[Job]) -> None:
    """Each run's ``RunFeed`` over its training slices (shared by the runs of one split), from where it stands."""
    for job in jobs:
        cfg, state, train_set = job.cfg, job.state, job.run.splits["train"]
        job.feed = RunFeed(train_set.images, train_set.labels, batch_size=cfg.trainer.batch_size,
                           epochs=cfg.trainer.epochs, generator=job.run.generator,
                           shuffle_buffer=cfg.data.shuffle_buffer, augmentation=job.run.augmentation,
                           epoch=state.epoch, batch=state.batch, order=state.order)


def finished_epochs(job: Job) -> bool:
    return job.state.epoch > job.cfg.trainer.epochs


def fail(job: Job, err: BaseException) -> None:
    """The run ends with ``err``: metrics.json as ``seg.training.loop.train`` records it, its folder released (a signal
    before training started: recorded, and raised on)."""
    record_end(job.output_dir, job.metrics, err, job.opened, job.started)
    if job.run is not None and job.run.bar is not None:
        job.run.bar.close()
    job.outcome = err
    unlock_run(job.output_dir)
    if isinstance(err, Interrupted):
        raise err


def run_phase(job: Job, phase) -> bool:
    """Run one of the trainer's phases for ``job``, with the trainer's one-line failures (out of memory, a full
    disk); an error ends this run only. Returns whether the run goes on."""
    try:
        with failures_in_one_line(job.run, job.state):
            phase()
        return not job.done
    except Exception as err:
        fail(job, err)
        return False


def end_run(job: Job) -> None:
    """The test with the best epoch's weights, metrics.json and the report (``finish``, ``report``)."""
    finish(job.run, job.state)
    job.outcome = report(job.run)
    unlock_run(job.output_dir)


# ---------------------------------------------------------------------------- the shared loop


def train_together(jobs: list[Job], stop: StopSignals, tune: bool) -> None:
    """The loop: one stacked step of every active run, then each run's bookkeeping as ``train_epoch`` does."""
    first = jobs[0]
    feeds = [job.feed for job in jobs]
    bar = one_bar(jobs)
    try:
        stack = Stack([job.run.model for job in jobs], [job.run.optimizer for job in jobs],
                      norm_options=norm_options(first.cfg), grad_clip=[job.cfg.optim.grad_clip for job in jobs],
                      autocast=first.run.autocast)
        if tune:
            size, channels = first.cfg.data.image_size, first.cfg.model.in_channels
            stack.tune(torch.zeros(first.cfg.trainer.batch_size, len(jobs) * channels, size, size,
                                   device=stack.device))
        while not stack.done(feeds):
            stepped = time.perf_counter()
            result = stack.train_step(feeds)
            seconds = time.perf_counter() - stepped
            bar.update()
            stopping = stop.requested is not None
            for k in result.runs:
                after_step(stack, jobs, k, result, seconds, stopping)
            if stopping:
                stop_all(stack, jobs)
        bar.close()
    except torch.OutOfMemoryError:
        device = first.run.device
        for k, job in enumerate(jobs):
            if not job.done:
                fail(job, TrainingFailed(f"out of memory on {device} in a stack of {len(jobs)} runs at batch size "
                                         f"{job.cfg.trainer.batch_size} (step {job.state.step}); try a smaller "
                                         f"hydra.launcher.max_runs, trainer.precision=bf16 or a smaller "
                                         f"data.image_size"))
    except Exception as err:  # a failure of the stacked step itself: every run that was still training
        for job in jobs:
            if not job.done:
                fail(job, err)


def after_step(stack: Stack, jobs: list[Job], k: int, result, seconds: float, stopping: bool) -> None:
    """Run k took a step: what ``train_epoch`` does after each step, then at its epoch end ``end_epoch`` (and after
    its last epoch ``finish``)."""
    job = jobs[k]
    if job.done:
        return
    run, state, cfg = job.run, job.state, job.cfg
    run.pending_losses.append(result.losses[k])
    state.step += 1
    state.train_time += seconds
    run.bar.update()
    at_epoch_end = k in result.epoch_ended
    checkpoint_every = cfg.trainer.checkpoint_every_n_steps
    checkpoint_due = bool(checkpoint_every) and state.step % checkpoint_every == 0
    if not (state.step % cfg.trainer.log_every_n_steps == 0 or at_epoch_end or stopping or checkpoint_due):
        return
    diverged = []
    if not run_phase(job, lambda: diverged.append(log_losses(run, state))):
        stack.freeze(k)
        return
    if diverged[0] is not None:
        stack.freeze(k)
        job.outcome = finish_diverged(run, state, diverged[0])
        unlock_run(job.output_dir)
        return
    if checkpoint_due and not at_epoch_end and not stopping:
        if not run_phase(job, lambda: save(run, where_it_stands(stack, job, k))):
            stack.freeze(k)
        return
    if at_epoch_end:
        lr = run.optimizer.param_groups[0]["lr"]  # the rate of the epoch that ended
        run.scheduler.step()  # the learning rate changes here, at the run's own epoch end
        stack.write_back(k)
        try:
            if not run_phase(job, lambda: end_epoch(run, state, lr)):
                stack.freeze(k)
                return
        except Interrupted as interrupted:  # a signal: end_epoch saved the run and recorded it
            stopped(stack, job, k, interrupted)
            return
        if job.feed.finished:
            stack.freeze(k)  # out of the following steps
            run_phase(job, lambda: end_run(job))


def where_it_stands(stack: Stack, job: Job, k: int) -> RunState:
    """Run k's weights and momentum written back from the stack, its RunState at the feed's position (mid-epoch)."""
    stack.write_back(k)
    job.state.batch, job.state.order = job.feed.batch, job.feed.order
    return job.state


def stopped(stack: Stack, job: Job, k: int, interrupted: Interrupted) -> None:
    """Run k was saved and recorded ``interrupted``: one line, as train.py prints it, and out of the stack."""
    print(f"{job.label}{interrupted}", file=sys.stderr, flush=True)
    stack.freeze(k)
    job.outcome = interrupted
    unlock_run(job.output_dir)


def stop_all(stack: Stack, jobs: list[Job]) -> None:
    """A signal asked to stop: every run still training is saved where it stands and recorded ``interrupted``
    (``stop_if_requested``); then ``Interrupted`` ends the sweep."""
    first = None
    for k, job in enumerate(jobs):
        if job.done:
            continue
        try:
            where_it_stands(stack, job, k)
            run_phase(job, lambda: stop_if_requested(job.run, job.state, "mid-epoch"))
        except Interrupted as interrupted:
            stopped(stack, job, k, interrupted)
            first = first or interrupted
    for job in jobs:
        if isinstance(job.outcome, Interrupted):
            first = first or job.outcome
    if first is not None:
        raise first
