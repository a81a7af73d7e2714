"""The estimate before a sweep: its number of runs and its wall time on this machine, printed before the first job.

``SweepEstimate`` is a Hydra callback (configs/train.yaml, ``hydra.callbacks.estimate``): when ``python train.py
-m ...`` starts, with any launcher, it expands the sweep as Hydra's basic sweeper does (the grid of
``hydra.sweeper.params`` and the command line), composes the **first job's** configuration, loads its data
(the phantom is generated here when it is not yet, once for the whole sweep) and times, on the device the
runs will use:

- a few training steps of the real model on real training slices, each batch augmented as the trainer's loop
  does (``augment_batch``, then ``seg.training.step.train_step``, the trainer's own step); under
  ``hydra/launcher=stacked`` a few stacked steps of as many runs as the first job's stack holds
  (``seg.training.stacked.Stack``, without the stack's augmentation), divided by their number;
- one evaluation of the validation and test slices (``seg.evaluation.dice.evaluate``).

A run's estimate is its steps (``ceil(train slices / batch size) x epochs``) times the step, plus one
validation per epoch and one test; the sweep's is the runs' sum (divided by ``n_jobs`` for a launcher that
runs jobs side by side). It **assumes every run costs what the first job does** (another norm, image size or
depth costs more or less; runs that diverge stop early), that the machine stays as loaded as it is while it
measures, and it leaves out each run's start, checkpoints and TensorBoard writing. It measures for about
``seconds`` (a few seconds) and never stops the sweep: a configuration it cannot build is left to the jobs,
which refuse it in their own words. ``hydra.callbacks.estimate.enabled=false`` skips it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ..config.schema import ConfigError
from ..data import class_names, load_splits
from ..evaluation.dice import evaluate
from ..model.build import build_model, norm_options
from ..norms import spec
from ..runtime.device import autocast_context, resolve_device, resolve_precision
from ..data.augmentations import augmentation_of
from .augment import augment_batch
from .checks import validate
from .losses import build_loss
from .optimizers import build_optimizer
from .stacked import SHARED_KEYS, Stack
from .step import TrainStep, train_step


def sweep_jobs(config) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper expands them (its ``params`` and the command line's task
    overrides); None for another sweeper (e.g. Optuna's, whose runs are its trials)."""
    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        return None
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create().parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def stack_size(jobs: list[list[str]], max_runs: int, groups: frozenset[str] = frozenset({"norm", "model"})) -> int:
    """How many runs the stacked launcher puts in the first job's stack: the jobs whose overrides agree with the
    first's in every key a stack shares (``SHARED_KEYS``, ``trainer.epochs``) and in every choice of a config
    group (``groups``, e.g. ``+claim=...``, which may set any of them), split into stacks of at most
    ``max_runs`` of even sizes (as the launcher's plan). Counting every group choice as shared can only make
    the stack smaller than the launcher's, and the estimate longer."""
    def shared(job: list[str]) -> tuple:
        pairs = (override.lstrip("+~").split("=", 1) for override in job)
        return tuple(sorted((key, value) for key, value in (p if len(p) == 2 else (p[0], "") for p in pairs)
                            if key in groups or key == "trainer.epochs" or any(
                                key == k.rstrip(".") or key.startswith(k if k.endswith(".") else k + ".")
                                or key == k for k in SHARED_KEYS)))

    group = sum(shared(job) == shared(jobs[0]) for job in jobs)
    return math.ceil(group / math.ceil(group / max_runs))


def config_groups() -> frozenset[str]:
    """The top-level config groups of the running application (norm, model, data, claim, experiment, ...)."""
    return frozenset(GlobalHydra.instance().config_loader().list_groups("")) - {"hydra"}


@dataclass
class Measured:
    """What the estimate measured on the first job: seconds per training step (per run, stacked or not), per
    validation and per test, the steps and epochs of a run, and how it was measured."""

    step_s: float
    val_s: float
    test_s: float
    steps: int
    epochs: int
    how: str
    data_s: float  # loading (or first preparing) the first job's data

    @property
    def run_s(self) -> float:
        return self.steps * self.step_s + self.epochs * self.val_s + self.test_s


def timed(fn, seconds: float, most: int = 5) -> tuple[float, int]:
    """Seconds per call of ``fn`` after one call to warm up: at least 2 calls, at most ``most``, stopping once
    ``seconds`` have passed."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or (calls < most and time.perf_counter() - start < seconds):
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls, calls


def measure(cfg, stacked_runs: int, seconds: float = 2.0) -> Measured:
    """Time the configuration ``cfg`` (one job's): its training step (``stacked_runs`` > 1: a stacked step of
    that many runs, per run) and its evaluation, on its device and data."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    autocast = autocast_context(device, resolve_precision(cfg.trainer.precision, device))
    started = time.perf_counter()
    splits = load_splits(cfg.data, cfg.seed, False)
    data_s = time.perf_counter() - started
    train_set = splits["train"].to(device)
    batch = min(int(cfg.trainer.batch_size), len(train_set))
    images, labels = train_set.images[:batch], train_set.labels[:batch]
    key = cfg.data.domain_key
    domains = sorted({str(c[key]) for c in splits["train"].cases if c.get(key)})
    domain_ids = train_set.domain_ids(domains, key)[:batch] if domains else None
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format

    def one_model():
        return build_model(cfg, num_domains=max(len(domains), 1)).to(device).to(memory_format=memory_format)

    model = one_model()
    if stacked_runs > 1:
        models = [model] + [one_model() for _ in range(stacked_runs - 1)]
        stack = Stack(models, [build_optimizer(m, cfg.optim) for m in models], norm_options=norm_options(cfg),
                      grad_clip=[cfg.optim.grad_clip] * stacked_runs, autocast=autocast)
        stacked_images = images.repeat(1, stacked_runs, 1, 1)
        stacked_labels = labels.unsqueeze(1).expand(-1, stacked_runs, -1, -1)
        seconds_per, calls = timed(lambda: stack.step(stacked_images, stacked_labels), seconds)
        step_s, how = seconds_per / stacked_runs, f"{calls} stacked steps of {stacked_runs} runs"
    else:
        step = TrainStep.of(model, build_optimizer(model, cfg.optim), build_loss(cfg.loss), autocast=autocast,
                            memory_format=memory_format, aux_weight=cfg.model.aux_weight,
                            grad_clip=cfg.optim.grad_clip, conditioned=True)
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        augmentation = augmentation_of(cfg.data.augment)

        def one_step():  # as the trainer's loop: the batch augmented with the run's generator, then the step
            batch = augment_batch(images, labels, augmentation, generator=generator)
            return train_step(step, *batch, domain_ids)

        step_s, calls = timed(one_step, seconds)
        how = f"{calls} training steps (augmentation included)"
    classes = class_names(cfg.data.task)

    def evaluation(name: str) -> float:
        if name not in splits or not len(splits[name]):
            return 0.0
        data = splits[name].to(device)
        start = time.perf_counter()
        with autocast:
            evaluate(model, data, len(classes), classes, cfg.trainer.eval_batch_size,
                     data.domain_ids(domains, key) if domains else None)
        return time.perf_counter() - start

    epochs = int(cfg.trainer.epochs)
    steps = math.ceil(len(train_set) / int(cfg.trainer.batch_size)) * epochs
    return Measured(step_s, evaluation("val"), evaluation("test"), steps, epochs, how, data_s)


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def launcher_of(config) -> tuple[str, int, int]:
    """The launcher's short name, how many jobs it runs side by side, and the most runs in one stack (1: none)."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    name = target.rsplit(".", 1)[-1].replace("Launcher", "").lower() or "basic"
    parallel = launcher.get("n_jobs", 1) if "joblib" in target.lower() else 1
    try:
        parallel = max(1, int(parallel))
    except (TypeError, ValueError):
        parallel = 1
    stack = int(launcher.get("max_runs", 1)) if name == "stacked" else 1
    return name, parallel, stack


class SweepEstimate(Callback):
    """Hydra callback: print a sweep's number of runs and an estimate of its wall time before its first job."""

    def __init__(self, enabled: bool = True, seconds: float = 2.0) -> None:
        self.enabled, self.seconds = enabled, seconds

    def on_multirun_start(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        print(self.estimate(config, kwargs.get("config_name") or "train"), flush=True)

    def estimate(self, config, config_name: str) -> str:
        try:
            jobs = sweep_jobs(config)
        except Exception as err:  # the sweeper refuses it in its own words
            return f"Sweep: the number of runs is not known ({str(err).splitlines()[0]})"
        if jobs is None:
            return "Sweep: the runs are chosen by the sweeper as it goes; no estimate of its wall time"
        runs = len(jobs)
        launcher, parallel, max_runs = launcher_of(config)
        head = f"Sweep: {runs} run{'s' if runs != 1 else ''} (launcher {launcher})"
        if not runs:
            return head
        try:
            cfg = compose(config_name=config_name, overrides=list(jobs[0]))
            stacked = stack_size(jobs, max_runs, config_groups()) if max_runs > 1 and spec(cfg.norm.name).can_stack else 1
            if stacked > 1 and (cfg.optim.name != "sgd" or cfg.loss != "ce" or cfg.trainer.compile):
                stacked = 1
            started = time.perf_counter()
            measured = measure(cfg, stacked, self.seconds)
            took = time.perf_counter() - started
        except (ConfigError, Exception) as err:  # the jobs refuse a bad value in their own words
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            return f"{head}; no estimate of its wall time (the first job could not be measured: {reason})"
        total = measured.run_s * runs / parallel
        side = f", {parallel} side by side" if parallel > 1 else ""
        where = "on this machine" if "submitit" not in str(config.hydra.launcher.get("_target_", "")) else \
            "if they ran one after another on this machine (the cluster runs them as its jobs)"
        return (f"{head}: estimated wall time about {duration(total)} {where}{side}.\n"
                f"  An estimate, measured in {took - measured.data_s:.0f} s on the first job ({' '.join(jobs[0]) or 'defaults'}): "
                f"{measured.how} at {measured.step_s * 1000:.0f} ms per run's step x {measured.steps} steps a run, "
                f"+ validation {measured.val_s:.1f} s x {measured.epochs} epochs + test {measured.test_s:.1f} s "
                f"= {duration(measured.run_s)} a run (its data: {measured.data_s:.0f} s, once). It assumes every run costs what the first does and that the "
                f"machine stays as loaded as now; runs' start-up and checkpoints are not counted. "
                f"(hydra.callbacks.estimate.enabled=false skips this.)")
