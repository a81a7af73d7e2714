"""The stacked launcher: a sweep's jobs grouped into stacks, each stack trained as one computation.

``python train.py -m lr=0.5,0.1 seed=0,1,2 hydra/launcher=stacked`` (configs/hydra/launcher/stacked.yaml,
docs/stacking.md). Like Hydra's basic launcher it runs the sweep in this process; unlike it, the jobs
whose configurations share ``seg.training.stacked.stack_key`` (architecture, norm and its options, loss,
optimizer, batch size, device, precision, image size, augmentation; and here also the number of
epochs, so that no run of a stack waits long for the others) are trained together, at most
``max_runs`` at a time, by ``seg.training.stacked.runs.train_stack``. Every job gets the folder Hydra gives it
with any launcher (``hydra.sweep.dir``/``hydra.sweep.subdir``, its ``.hydra/`` record and log file,
written by Hydra's own ``run_job``) and in it what ``python train.py`` writes: metrics.json,
TensorBoard events, checkpoints.

A job that cannot be stacked -- a norm without the ``can_stack`` capability, Adam, ``dice_ce``,
``trainer.compile``, a configuration refused by ``seg.training.checks.validate`` -- or that has no partner
in the sweep runs alone through ``train.py``'s own task function, in order, in this process: the
ordinary trainer, never silently another computation. The plan (which jobs run stacked, which alone
and why) is printed before the first job.

Hydra imports every module of ``hydra_plugins`` when a command starts (by file, without registering it
in sys.modules: no ``from __future__ import annotations`` here, dataclasses need the module); the
project (torch) is imported only when a sweep is launched.
"""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.seg_stacked_launcher.stacked_launcher.StackedLauncher"
    max_runs: int = 8  # the most runs in one stack (memory: about K times one run's activations)
    tune: bool = False  # time each stacked convolution's modes before training (the same results)


ConfigStore.instance().store(group="hydra/launcher", name="stacked_launcher", node=StackedLauncherConf,
                             provider="seg")


@dataclass
class Planned:
    """One job of the sweep: its number, overrides and composed configuration; ``why`` it runs alone (None:
    stackable, ``key`` its stack)."""

    num: int
    overrides: Sequence[str]
    config: DictConfig
    key: Any = None
    why: Optional[str] = None


def _prepared(cfg) -> None:
    """The task function of a stacked job's ``run_job``: Hydra makes the folder and its record; the stack trains."""
    return None


class StackedLauncher(Launcher):
    def __init__(self, max_runs: int = 8, tune: bool = False) -> None:
        self.max_runs, self.tune = max_runs, tune
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    # ---------------------------------------------------------------- the plan

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        if not isinstance(self.max_runs, int) or isinstance(self.max_runs, bool) or self.max_runs < 1:
            print(f"error: hydra.launcher.max_runs={self.max_runs} is out of range: it must be an integer of at "
                  f"least 1", file=sys.stderr, flush=True)
            sys.exit(1)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self.compose(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        groups = self.plan(jobs)
        returns: dict[int, JobReturn] = {}
        for group in groups:
            if len(group) == 1:
                returns[group[0].num] = self.run_alone(group[0])
            else:
                returns.update(self.run_stack(group))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[job.num] for job in jobs]

    def compose(self, num: int, overrides: Sequence[str]) -> Planned:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        return Planned(num, overrides, config)

    def plan(self, jobs: list[Planned]) -> list[list[Planned]]:
        """Stacks (jobs with one key, in sweep order, at most max_runs each, as even as possible) and the jobs that
        run alone, in the order of their first job; printed."""
        from seg.training.checks import validate
        from seg.config.schema import ConfigError
        from seg.training.stacked import StackError, stack_key
        from seg.training.stacked.runs import check_stack

        previous = HydraConfig.instance().cfg
        checked = set()
        for job in jobs:
            HydraConfig.instance().set_config(job.config)  # for interpolations that read hydra.*
            try:
                task = OmegaConf.masked_copy(job.config, [key for key in job.config if key != "hydra"])
                validate(task)
                job.key = (stack_key(task), task.trainer.epochs)
                if job.key not in checked:  # once per kind of stack
                    check_stack(task)
                    checked.add(job.key)
            except (ConfigError, StackError) as err:
                job.why = str(err)
            except Exception as err:  # noqa: BLE001  (the trainer reports it in the job's folder)
                job.why = f"{type(err).__name__}: {err}"
            finally:
                HydraConfig.instance().cfg = previous
        kinds: dict[Any, list[Planned]] = {}
        groups: list[list[Planned]] = []
        for job in jobs:
            if job.why is not None:
                groups.append([job])
            else:
                kinds.setdefault(job.key, []).append(job)
        for members in kinds.values():  # as few stacks as max_runs allows, of sizes that differ by one at most
            count = -(-len(members) // self.max_runs)
            size, extra = divmod(len(members), count)
            for index in range(count):
                first = index * size + min(index, extra)
                groups.append(members[first:first + size + (index < extra)])
                if len(groups[-1]) == 1 and len(members) > 1:  # it could share a stack: max_runs keeps it alone
                    groups[-1][0].why = (f"hydra.launcher.max_runs={self.max_runs}: {len(members)} jobs could share a "
                                         f"stack, at most {self.max_runs} at a time")
        groups.sort(key=lambda group: group[0].num)
        for group in groups:
            if len(group) == 1 and group[0].why is None:
                group[0].why = "no other job of the sweep can share its stack"
        stacked = sum(len(g) for g in groups if len(g) > 1)
        print(f"Stacked launcher: {len(jobs)} jobs, {stacked} in {sum(len(g) > 1 for g in groups)} stack(s) of at "
              f"most {self.max_runs} (hydra.launcher.max_runs), {len(jobs) - stacked} alone", flush=True)
        for group in groups:
            names = ", ".join(f"#{job.num} {' '.join(filter_overrides(job.overrides)) or 'defaults'}" for job in group)
            if len(group) > 1:
                print(f"  stack of {len(group)}: {names}", flush=True)
            else:
                print(f"  alone (the trainer): {names}: {group[0].why}", flush=True)
        return groups

    # ---------------------------------------------------------------- running

    def run_alone(self, job: Planned) -> JobReturn:
        """The job through train.py's task function, as Hydra's basic launcher runs it."""
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=job.config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def run_stack(self, group: list[Planned]) -> dict[int, JobReturn]:
        """Each job's folder and record made by Hydra's ``run_job``, then the jobs trained as one stack; a job's
        error is reported as train.py reports it in a sweep (one line; the sweep goes on), a signal ends the
        sweep with exit code 75 once every run of the stack is saved."""
        from seg.runtime.runs import unlock_run
        from seg.runtime.stopping import EXIT_INTERRUPTED, Interrupted, StopSignals, between_runs
        from seg.training.stacked.runs import Job, train_stack

        returns, jobs = {}, []
        for planned in group:
            ret = run_job(hydra_context=self.hydra_context, task_function=_prepared, config=planned.config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            hydra_job = ret.hydra_cfg.hydra.job
            returns[planned.num] = ret
            jobs.append(Job(ret.cfg, Path(ret.hydra_cfg.hydra.runtime.output_dir), planned.num,
                            f"job {planned.num} ({hydra_job.override_dirname or 'defaults'}): "))
        print(f"Training a stack of {len(jobs)} runs: jobs {', '.join(str(job.job_num) for job in jobs)}", flush=True)
        stop = StopSignals()
        try:
            with stop:
                outcomes = train_stack(jobs, stop, tune=self.tune)
        except Interrupted as interrupted:
            for job in jobs:
                if job.outcome is None:
                    print(f"{job.label}{interrupted}", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            for job in jobs:
                unlock_run(job.output_dir)
            between_runs()
        for job, outcome in zip(jobs, outcomes):
            ret = returns[job.job_num]
            if isinstance(outcome, dict):
                ret.return_value = outcome.get("best_val_dice")  # a search's objective: validation, never test
            else:
                report_failure(job, outcome)
                ret.return_value = None
        return returns


def report_failure(job, err: BaseException) -> None:
    """One line on standard error, as train.py prints a failed sweep job (a bug's traceback in the run folder)."""
    from seg.training.loop import sweep_job_error

    print(f"error: {job.label}{sweep_job_error(err, job.output_dir)}", file=sys.stderr, flush=True)
