"""Train the U-Net with a chosen normalization: ``python train.py norm=iln lr=0.5`` (see README)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from seg.config import ConfigError, register_configs
from seg.data import DataError

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg) -> float | None:
    from seg.train import train, write_metrics

    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, output_dir)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        write_metrics_safely(write_metrics, output_dir, {"status": "failed", "error": str(err)})
        sys.exit(1)
    except Exception as err:
        write_metrics_safely(write_metrics, output_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        raise
    return metrics.get("dice")


def write_metrics_safely(write_metrics, output_dir, metrics) -> None:
    from pathlib import Path

    try:
        write_metrics(Path(output_dir), metrics)
    except OSError:
        pass  # the folder itself is unwritable: the console message is all we can give


if __name__ == "__main__":
    main()
