"""Run folders: which folder a run writes, claimed so that no two runs ever share one.

* A run's folder is Hydra's ``hydra.run.dir`` (by default ``outputs/<date>/<time>_<norm>_lr<lr>_seed<seed>``)
  or a sweep's job folder. A folder Hydra names for a run is created exclusively before Hydra
  writes anything into it (``claim_new``): a second run started in the same second with the same
  settings gets ``..._2``. The same holds for a sweep's default folder.
* While a run works in its folder it holds an exclusive lock on ``<folder>/.run.lock``; another
  process that tries to run there is refused ("in use by pid N on host H"). With the lock held,
  every temporary file left in the folder belongs to a process that is gone and is removed.
* A folder that already holds a run (a checkpoint, or metrics.json of a run that did not fail at
  start) is only ever continued (``trainer.resume``), never trained over.
* ``trainer.resume=<run folder A, or a checkpoint in A>`` continues run A in A's folder; a
  ``hydra.run.dir`` naming another folder is refused, and so is a checkpoint of A other than its
  ``last.pt`` (continuing from ``best.pt`` would rewind A). A checkpoint file outside any run
  folder starts this run's own folder from it.
* A job of a scheduler that is started again under the same job id (a Slurm requeue, submitit's
  requeue on preemption) resumes its run's ``last.pt`` by itself.

``RunFolders`` is the Hydra callback (configs/train.yaml) that applies these rules before Hydra
writes ``.hydra/`` into a folder; ``open_run`` applies them again in the training process (sweep
jobs, torchrun ranks), and ``SweepOutcome`` turns a sweep's failed jobs into its exit code.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

from .checkpoint import (CheckpointError, check_compatible, holds_run_state, load_checkpoint, repair_best,
                         resume_request, run_folder_of)
from ..config.identity import identity_differences
from .stopping import finished
from .temporaries import remove_stale

try:
    import fcntl
except ImportError:  # Windows: no locks; the folder claims still hold
    fcntl = None

LOCK_NAME = ".run.lock"
REQUEUE_LOCK_WAIT_S = 180.0  # a requeued job on another node waits this long for its old node's lock to lapse (NFS)
MAX_FAILED_EXIT = 74  # a sweep's exit code is its number of failed jobs, at most this (75 means interrupted)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used (in use, holding another run, under a file); the message says which."""


# ---------------------------------------------------------------------------- folders


def check_folder_path(path: Path, key: str) -> None:
    """Refuse a folder path that goes through a file (e.g. hydra.run.dir=<a file>/run)."""
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise RunFolderError(f"{key}={path}: {part} is a file, not a folder")


def claim_new(base: Path) -> Path:
    """Create, exclusively, ``base`` or else the first free ``base_2``, ``base_3``, ...: two processes
    never get the same folder (mkdir succeeds for exactly one of them)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        path = base if number == 1 else base.with_name(f"{base.name}_{number}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def holds_run(run_dir: Path) -> str | None:
    """What run the folder holds ('a checkpoint', 'a finished run (status ok)'), or None if none worth keeping
    (no checkpoint, and no metrics.json or one of a run that failed at start)."""
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "a run's checkpoint (checkpoints/last.pt)"
    try:
        status = json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return None if status == "failed" else f"a run with status {status!r} (metrics.json)"


def scheduler_job() -> str | None:
    """The id of the scheduler job this process runs in, which a requeued job keeps: Slurm's job id
    (one per array task), or that of a submitit job on this machine."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or None


def restarted_job() -> str | None:
    """This process's scheduler job id if the process may be that job started again: a Slurm job that
    was requeued (SLURM_RESTART_COUNT >= 1), or a submitit job on this machine (one run per job, whose
    task starts again only when requeued)."""
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"] if int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= 1 else None
    return os.environ.get("SUBMITIT_LOCAL_JOB_ID") or None


def remove_stale_temporaries(run_dir: Path, locked: bool) -> list[Path]:
    """Remove the temporary files that processes left in a run folder and its checkpoints/ when they died
    (seg.runtime.temporaries). With the folder's lock held, all are stale; without (no file locks here), those
    of dead processes."""
    return [path for folder in (run_dir, run_dir / "checkpoints")
            for path in remove_stale(folder, writers_gone=locked)]


# ---------------------------------------------------------------------------- the lock

_locks: dict[Path, object] = {}  # run folder -> its open, locked .run.lock (held until released or exit)


def lock_run(run_dir: Path, sign: bool = True) -> bool:
    """Hold ``run_dir``'s lock for this process (idempotent); refuse a folder that another live run holds.
    ``sign``: write this process's pid, host and scheduler job into the lock file (for the message another
    process gets); the Hydra callback locks without signing, so that a refused command changes nothing.

    Returns False where the file system has no locks (the claims and refusals still hold)."""
    key = run_dir.resolve()
    if key in _locks:
        if sign:
            sign_lock(_locks[key])
        return True
    if fcntl is None:
        return False
    handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115  (kept open: the lock)
    deadline = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = read_holder(handle)
            ours = scheduler_job()
            if ours is not None and holder.get("job") == ours:  # our own job before a requeue: its lock lapses
                deadline = deadline or time.monotonic() + REQUEUE_LOCK_WAIT_S
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
            handle.close()
            raise RunFolderError(f"run folder {run_dir} is in use by another run (pid {holder.get('pid', '?')} on "
                                 f"{holder.get('host', '?')}); wait for it to end, or choose another folder") from None
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                handle.close()
                print(f"warning: no file locks on the file system of {run_dir}; runs in one folder are not detected")
                return False
            raise
    _locks[key] = handle
    if sign:
        sign_lock(handle)
    return True


def sign_lock(handle) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "job": scheduler_job()}
    if read_holder(handle) != holder:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder))
        handle.flush()


def read_holder(handle) -> dict:
    try:
        handle.seek(0)
        return json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}


def unlock_run(run_dir: Path) -> None:
    """Release the folder's lock (a sweep running jobs in one process releases each job's folder)."""
    handle = _locks.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()


# ---------------------------------------------------------------------------- which checkpoint continues


def resume_source(resume, run_dir: Path) -> Path | None:
    """The checkpoint this run continues, by the rules of the module docstring; None: a fresh run.

    ``run_dir`` is this run's folder (locked by the caller). Raises RunFolderError or CheckpointError
    with the reason when the request cannot be honoured.
    """
    request = resume_request(resume)
    own = run_dir / "checkpoints" / "last.pt"
    if isinstance(request, Path):
        owner = run_folder_of(request)
        if owner is not None:
            check_continues_in_place(resume, request, owner, run_dir)
        elif holds_run(run_dir):
            raise RunFolderError(f"trainer.resume={resume} would start a run in {run_dir}, which already holds "
                                 f"{holds_run(run_dir)}")
        return request
    if request is True:
        if own.is_file():
            return own
        print(f"trainer.resume=true: no checkpoint of this run yet in {run_dir}; starting fresh")
        return None
    if own.is_file() and requeued(own):
        print(f"Requeued job {restarted_job()}: continuing its run from {own}")
        return own
    if holds_run(run_dir):
        raise RunFolderError(f"{run_dir} already holds {holds_run(run_dir)}; continue it with trainer.resume=true, "
                             f"or choose another folder (a new run never overwrites one)")
    return None


def check_continues_in_place(resume, checkpoint: Path, owner: Path, run_dir: Path) -> None:
    """A checkpoint of run A continues A, in A's folder, from A's last.pt only."""
    if owner.resolve() != run_dir.resolve():
        raise RunFolderError(f"trainer.resume={resume} continues the run in {owner}, in its own folder, but this run's "
                             f"folder is {run_dir}; leave hydra.run.dir out to continue it there, or start a new run "
                             f"from its weights with model.init_from={checkpoint}")
    if checkpoint.name != "last.pt":
        raise RunFolderError(f"trainer.resume={resume} would rewind the run in {owner} to that checkpoint and "
                             f"overwrite its last.pt and metrics.json; continue it from its last.pt "
                             f"(trainer.resume={owner}), or start a new run from these weights with "
                             f"model.init_from={checkpoint}")


def requeued(last: Path) -> bool:
    """Whether this process is the same scheduler job, started again, that wrote ``last``."""
    ours = restarted_job()
    if ours is None:
        return False
    try:
        return load_checkpoint(last).get("scheduler_job") == ours
    except CheckpointError:
        return False


def recorded_config(run_dir: Path) -> dict | None:
    """A run folder's configuration as Hydra recorded it (.hydra/config.yaml, interpolations kept)."""
    try:
        return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None


def earlier_run(base: Path, config: dict, same_job: bool = False) -> Path | None:
    """The most recent run folder beside ``base`` whose recorded configuration defines the same run as
    ``config`` (seg/config/identity.py) and that holds a checkpoint; with ``same_job``, only one whose last.pt
    this scheduler job wrote before it was requeued."""
    candidates = []
    for last in base.parent.glob("*/checkpoints/last.pt"):
        recorded = recorded_config(last.parents[1])
        if recorded is not None and not identity_differences(recorded, config) and (not same_job or requeued(last)):
            candidates.append(last.parents[1])
    return max(candidates, key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime, default=None)


# ---------------------------------------------------------------------------- the training process


def open_run(resume, run_dir: Path) -> Path | None:
    """Take ``run_dir`` for this process: its lock, the removal of stale temporaries, and the checkpoint
    the run continues (``resume_source``)."""
    locked = lock_run(run_dir)
    remove_stale_temporaries(run_dir, locked)  # each removal printed
    return resume_source(resume, run_dir)


def check_writable(output_dir: Path) -> None:
    """Fail before any work if the run folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test.{os.getpid()}"  # one per process: ranks may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"cannot write to the output folder {output_dir}: {err}") from None


def open_run_folder(cfg, output_dir: Path) -> Path | None:
    """This run's folder, taken (``open_run``): writable, locked, without stale temporaries; returns the
    checkpoint the run continues, checked to be of this very run (only the keys of seg/config/identity.py may
    differ), after rebuilding its best.pt if a kill or a user removed it."""
    check_writable(output_dir)
    resume_from = open_run(cfg.trainer.resume, output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        if not holds_run_state(state):
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


# ---------------------------------------------------------------------------- Hydra callbacks


def _fail_at_start(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _main_decides(decide):
    """Under torchrun: rank 0 decides (a folder), every rank gets it; otherwise just decide."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    holder = [None]
    if dist.get_rank() == 0:
        try:
            holder = [("ok", decide())]
        except RunFolderError as err:
            holder = [("error", str(err))]
    dist.broadcast_object_list(holder, src=0)
    kind, value = holder[0]
    if kind == "error":
        if dist.get_rank() == 0:
            _fail_at_start(value)
        sys.exit(1)
    return value


def run_folder(config) -> Path:
    """The folder of a single run (see the module docstring); claimed or locked before Hydra writes in it."""
    named = any(str(o).startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
    resume = OmegaConf.select(config, "trainer.resume")
    request = resume_request(resume, must_exist=False)
    base = Path(str(config.hydra.run.dir))
    if isinstance(request, Path) and request.is_file() and run_folder_of(request) is not None:
        owner = run_folder_of(request)
        check_continues_in_place(resume, request, owner, base if named else owner)
        target = owner
    elif named:
        target = base
    else:
        task_config = OmegaConf.to_container(config, resolve=False)
        task_config.pop("hydra", None)
        earlier = None
        if request is True:
            earlier = earlier_run(base, task_config)
        elif request is False and restarted_job():
            earlier = earlier_run(base, task_config, same_job=True)
        if earlier is not None:
            print(f"Continuing the run in {earlier} (the same command's last run)")
            target = earlier
        else:
            check_folder_path(base, "hydra.run.dir")
            target = claim_new(base)
    check_folder_path(target, "hydra.run.dir")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"hydra.run.dir={target}: cannot create the folder ({err.strerror or err})") from None
    lock_run(target, sign=False)
    last = target / "checkpoints" / "last.pt"
    if request is False and holds_run(target) and not (last.is_file() and requeued(last)):
        raise RunFolderError(f"hydra.run.dir={target} already holds {holds_run(target)}; continue it with "
                             f"trainer.resume=true, or choose another folder (a new run never overwrites one)")
    continues = request if isinstance(request, Path) else last
    if continues.is_file() and (request is not False or requeued(last)):
        check_same_run(continues, config)  # before Hydra records this command's configuration in the folder
    return target


def check_same_run(checkpoint: Path, config) -> None:
    """Refuse to continue a checkpoint of a different run (seg/config/identity.py), before anything is written."""
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    try:
        state = load_checkpoint(checkpoint)
        if isinstance(state, dict) and "config" in state:
            check_compatible(state["config"], OmegaConf.to_container(task, resolve=True), checkpoint)
    except CheckpointError as err:
        raise RunFolderError(str(err)) from None


class RunFolders(Callback):
    """Hydra callback: give a single run its folder, and a sweep its folder, by the rules above, before
    Hydra writes there; a sweep ends with the number of its failed jobs as exit code (called last when a sweep
    ends, after its summary: from then on a signal finds the sweep finished)."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            target = _main_decides(lambda: run_folder(config))
        except RunFolderError as err:
            _fail_at_start(str(err))
        with read_write(config.hydra.run), open_dict(config.hydra.run):
            config.hydra.run.dir = str(target)

    def on_multirun_start(self, config, **kwargs) -> None:
        named = any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            check_folder_path(sweep_dir, "hydra.sweep.dir")
            if not named:
                sweep_dir = claim_new(sweep_dir)
                with read_write(config.hydra), open_dict(config.hydra):
                    config.hydra.sweep.dir = str(sweep_dir)
                    config.hydra.overrides.hydra.append(f"hydra.sweep.dir={sweep_dir}")  # each job's config
            resume = resume_request(OmegaConf.select(config, "trainer.resume"), must_exist=False)
            held = sorted(p.name for p in sweep_dir.glob("*") if p.is_dir() and holds_run(p)) if sweep_dir.is_dir() else []
            if resume is False and held:
                raise RunFolderError(f"hydra.sweep.dir={sweep_dir} already holds the runs of a sweep ({len(held)} job "
                                     f"folders, e.g. {held[0]}); continue it with trainer.resume=true, or choose "
                                     f"another hydra.sweep.dir")
        except RunFolderError as err:
            _fail_at_start(str(err))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(sweep_dir.glob("*/metrics.json")):
            try:
                metrics = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(metrics, dict) and metrics.get("status") == "failed":
                failed.append(f"{path.parent.name}: {metrics.get('error', '?')}")
        # its jobs and summary are done: a signal from here on leaves the exit code as it is
        finished("sweep", exit_code=min(len(failed), MAX_FAILED_EXIT))
        if failed:
            print(f"{len(failed)} job(s) of the sweep failed (exit code {min(len(failed), MAX_FAILED_EXIT)}):",
                  file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(min(len(failed), MAX_FAILED_EXIT))
