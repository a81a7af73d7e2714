"""Stopping a run cleanly on a signal, so that ``trainer.resume=true`` continues it exactly.

SIGTERM (Slurm preemption, ``scancel``, a cloud spot reclaim), SIGINT (Ctrl-C) and, inside a
submitit job, submitit's preemption signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
ask the run to stop. Once training has started, the step in progress is finished; the trainer then
writes ``last.pt`` and metrics.json (status ``interrupted``), prints one line and exits with
``EXIT_INTERRUPTED`` (75, EX_TEMPFAIL: "try again later"), which a Slurm cluster can requeue on
(``RequeueExit=75`` in slurm.conf). Inside a submitit job, after saving, submitit's own handler of its
preemption signal is called: it requeues the job (hydra/launcher=slurm), and the requeued job
resumes by itself (seg/runtime/runs.py). Before training has started there is nothing to save: the signal
stops the run at once, with the same line and exit code. A second Ctrl-C does not wait for the step.
Once the work is done (``finished``), SIGINT and SIGTERM no longer stop anything: the process exits as it
would have.

This module imports nothing from the project (train.py installs ``quiet_startup_exit`` before it
imports torch).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL of sysexits.h


class Interrupted(BaseException):
    """A signal stopped the run; ``saved`` says whether last.pt holds where it stopped. Like
    KeyboardInterrupt, not an Exception: no ``except Exception`` on the way mistakes it for an error."""

    def __init__(self, signal_name: str, saved: bool = False, where: str = "") -> None:
        self.signal_name, self.saved, self.where = signal_name, saved, where
        super().__init__(message(signal_name, saved, where))


_outside = "before training started"  # where a signal finds the process when no run is training


def between_runs() -> None:
    """Note that a run has ended in this process (a sweep runs the next; a single run exits)."""
    global _outside
    _outside = "between runs"


def finished(what: str = "run", exit_code: int = 0) -> None:
    """Note that the process's work is done (``what``: a single run, or a sweep with its last job and summary), and
    the exit code it ends with: from here until the process exits, SIGINT and SIGTERM do not stop it, so that a
    signal during the teardown (Hydra's cleanup, the interpreter's exit) neither turns a complete run into exit code 75
    nor kills the process by the signal. The first such signal says so in one line, and the process exits as it
    would have; a second one ends a slow teardown at once, with ``exit_code`` (the work's files are complete). Once
    the exit handlers run, the signals are ignored outright: as the interpreter ends, Python gives every signal that
    it handles its default action back (which ends the process), but leaves an ignored one ignored."""
    noted = False

    def ignore(*_) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)

    def note(signum, frame) -> None:
        nonlocal noted
        if noted:  # a second signal: the teardown is not waited for
            sys.stderr.flush()
            os._exit(exit_code)
        noted = True
        print(f"{signal.Signals(signum).name} after the {what} had finished: nothing to stop; it exits as it would "
              f"have (a second one: at once)", file=sys.stderr, flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note)
    atexit.register(ignore)


def message(signal_name: str, saved: bool, where: str = "") -> str:
    """The one line printed when a run stops on a signal."""
    if where == "forced":
        return (f"Interrupted by {signal_name}: stopped without finishing the step; trainer.resume=true continues "
                f"from the last checkpoint (exit code {EXIT_INTERRUPTED})")
    if saved:
        return (f"Interrupted by {signal_name} {where}: saved; continue it with trainer.resume=true "
                f"(exit code {EXIT_INTERRUPTED})")
    return (f"Interrupted by {signal_name} {where or _outside}; nothing to save, run the same command again "
            f"(exit code {EXIT_INTERRUPTED})")


def quiet_startup_exit() -> None:
    """Until the trainer takes over the signals: SIGINT and SIGTERM end the process with one line and
    ``EXIT_INTERRUPTED`` instead of a KeyboardInterrupt traceback or a silent death."""

    def leave(signum, frame):
        print(message(signal.Signals(signum).name, saved=False), file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave)


def preemption_signal() -> signal.Signals:
    """The signal submitit sends a job before its time limit or on preemption."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


class StopSignals:
    """While entered, the stop signals ask the run to stop (see the module docstring).

    ``defer()`` marks the start of training: from then on a signal is only recorded, and the loop
    asks ``requested`` (agreed over the ranks by the caller) after each step.
    """

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self.deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        signals = [signal.SIGINT, signal.SIGTERM]
        preempt = preemption_signal()
        if callable(signal.getsignal(preempt)):  # a job manager (submitit) handles preemption: stop first
            signals.append(preempt)
        for signum in signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        forced = self.requested is not None and signum == signal.SIGINT
        if self.requested is None:
            self.requested = name
        if forced:  # a second Ctrl-C: do not wait for the step
            raise Interrupted("a second SIGINT", where="forced")
        if not self.deferred:  # training has not started: nothing to finish or save
            raise Interrupted(name, where="before training started")

    def defer(self) -> None:
        self.deferred = True

    def requeue_handler(self):
        """submitit's handler of its preemption signal, when it is the signal that stopped the run: call it
        (after saving) to requeue the job; None otherwise."""
        preempt = preemption_signal()
        handler = self._previous.get(preempt)
        if self.requested == preempt.name and callable(handler):
            return lambda: handler(preempt, None)
        return None
