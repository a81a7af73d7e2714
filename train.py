"""Train the U-Net with a chosen normalization: ``python train.py norm=iln lr=0.5`` (see README).

On several GPUs: ``torchrun --nproc_per_node=N train.py ...`` (data parallel, seg/distributed.py).

Errors a user can fix (a bad option, a bad data file, a checkpoint that does not fit) end with
one clear message and exit code 1. A run that cannot go on (out of memory) is recorded as
``failed`` in its metrics.json; inside a multirun the sweep then continues with the next job.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from seg.checkpoint import CheckpointError
from seg.config import ConfigError, register_configs
from seg.data import DataError
from seg.distributed import processes

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> float | None:
    from seg.train import TrainingFailed, train, write_metrics

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN

    def fail(message: str) -> None:
        try:
            write_metrics(output_dir, {"status": "failed", "error": message, "norm": cfg.norm.get("name"),
                                       "lr": cfg.lr, "batch_size": cfg.trainer.batch_size, "seed": cfg.seed})
        except OSError:
            pass  # the folder itself is unwritable: the console message is all we can give

    try:
        return train(cfg, output_dir, job_num=hydra_cfg.job.num if in_sweep else None).get("dice")
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        fail(str(err))
        sys.exit(1)
    except TrainingFailed as err:
        print(f"error: {err}", file=sys.stderr)
        fail(str(err))
        if not in_sweep:
            sys.exit(1)
        return None  # the sweep goes on; the summary shows this job as failed
    except Exception as err:
        fail(f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    with processes():  # under torchrun: join the other ranks (seg/distributed.py); otherwise nothing
        main()
