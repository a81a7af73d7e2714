"""Train the U-Net with a chosen normalization: ``python train.py norm=iln lr=0.5`` (see README).

On several GPUs: ``torchrun --nproc_per_node=N train.py ...`` (data parallel: seg/config/launch.py joins the
processes, seg/runtime/distributed.py is what they do together). The loop itself is seg/training/loop.py.

Exit codes (docs/reliability.md):

* 0: the run finished (status ``ok``, or ``diverged``: a result, not an error); a signal after that, while the
  process exits, changes nothing;
* 1: an error a user can fix (a bad option, a bad data file, a checkpoint that does not fit, a
  folder that holds another run, a full disk), in one line; the run's metrics.json says ``failed``;
* 75 (EX_TEMPFAIL): stopped by SIGTERM or SIGINT (Ctrl-C) -- the step in progress finished, last.pt
  and metrics.json (status ``interrupted``) written; ``trainer.resume=true`` continues it exactly;
* a sweep (``-m``) runs every job whatever happens to the others, then exits with the number of its
  failed jobs (at most 74), or 75 when a signal stopped it.
"""

import sys
from pathlib import Path

from seg.runtime.stopping import EXIT_INTERRUPTED, quiet_startup_exit

quiet_startup_exit()  # Ctrl-C or SIGTERM while Python imports torch: one line and exit 75, no traceback

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from seg.runtime.checkpoint import CheckpointError  # noqa: E402
from seg.data import DataError  # noqa: E402
from seg.config.launch import processes, register_configs  # noqa: E402
from seg.runtime.runs import RunFolderError, unlock_run  # noqa: E402
from seg.config.schema import ConfigError  # noqa: E402
from seg.runtime.stopping import Interrupted, StopSignals, between_runs, finished  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> float | None:
    from seg.training.loop import TrainingFailed, sweep_job_error, train

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    job = f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname or 'defaults'}): " if in_sweep else ""

    def failed(message: str) -> None:
        """One line (the run's metrics.json says failed: seg.training.loop.record_end); a single run exits 1, a sweep
        goes on with its next job."""
        print(f"error: {job}{message}", file=sys.stderr, flush=True)
        if not in_sweep:
            sys.exit(1)

    stop = StopSignals()
    try:
        with stop:
            # the return value is a search's objective (hparams_search=lr_optuna): the best validation Dice, never
            # the test Dice (which stays in the run's metrics.json)
            objective = train(cfg, output_dir, job_num=hydra_cfg.job.num if in_sweep else None,
                              stop=stop).get("best_val_dice")
        if not in_sweep:  # a sweep's work is done after its last job (seg.runtime.runs.RunFolders.on_multirun_end)
            finished()  # a signal from here on finds the run complete: exit code 0 all the same
        return objective
    except Interrupted as interrupted:
        print(f"{job}{interrupted}", file=sys.stderr, flush=True)
        requeue = stop.requeue_handler()
        if requeue is not None:  # submitit's preemption signal: it requeues the job, which resumes by itself
            requeue()
        sys.exit(EXIT_INTERRUPTED)
    except (ConfigError, DataError, CheckpointError, TrainingFailed, RunFolderError) as err:
        failed(str(err))
    except Exception as err:  # a bug: a single run shows its traceback; a sweep records it and goes on
        if not in_sweep:
            raise
        failed(sweep_job_error(err, output_dir))
    finally:
        unlock_run(output_dir)
        between_runs()  # a signal from here on finds no run to save
    return None


if __name__ == "__main__":
    with processes():  # under torchrun: join the other ranks (seg/config/launch.py); otherwise nothing
        main()
