"""seg-prepare-data: read, preprocess and cache a dataset once, so that every training run starts in seconds.

Takes the same overrides as train.py; the data settings that shape the tensors (image_size,
spacing, clip_percentiles, normalize, cache_dtype, max_patients, on_error) select the cache file,
so prepare with the settings you will train with. train.py prepares automatically on first use;
this tool only does it ahead of time (and reports bad files before a long run is queued).
See data/README.md for the cache file and how to clear it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ..training.checks import validate
from ..data import DataError, clear_cache, prepare, with_defaults
from ..config.launch import register_configs
from ..config.schema import ConfigError
from . import arguments

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the project's Hydra configs (train.py's)


def main(argv: list[str] | None = None) -> int:
    """seg-prepare-data with ``argv`` (default: the command line's arguments); returns the exit code."""
    parser = argparse.ArgumentParser(prog="seg-prepare-data", description=__doc__.splitlines()[0].partition(": ")[2])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py, e.g. data=acdc data.root=...")
    parser.add_argument("--clear", action="store_true", help="delete this dataset's cache files first")
    args = parser.parse_args(arguments(argv))
    register_configs()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            cfg = compose(config_name="train", overrides=args.overrides)
        validate(cfg)
        if args.clear:
            for path in clear_cache(with_defaults(cfg.data), Path(cfg.data.root).expanduser()):
                print(f"Removed {path}")
        started = time.perf_counter()
        prepared = prepare(cfg.data, progress=True)
    except (ConfigError, DataError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    slices = sum(volume.image.shape[0] for volume in prepared.volumes)
    state = "loaded from" if prepared.from_cache else "written to"
    print(f"{len(prepared.volumes)} volumes ({slices} slices) of {len(prepared.patients)} patients in "
          f"{time.perf_counter() - started:.1f} s; cache {state} {prepared.cache_path or '(none)'}")
    for entry in prepared.skipped:
        print(f"  skipped {entry['patient']}: {entry['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
