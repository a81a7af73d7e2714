"""Prepare a dataset once -- read, preprocess, write the cache -- so that every training run starts in seconds.

    python scripts/prepare_data.py data=acdc data.root=/path/to/ACDC/database
    python scripts/prepare_data.py data=mnms data.root=/path/to/OpenDataset --clear   # rebuild its cache

Takes the same overrides as train.py; the data settings that shape the tensors (image_size,
spacing, clip_percentiles, normalize, cache_dtype, max_patients, on_error) select the cache file,
so prepare with the settings you will train with. train.py prepares automatically on first use;
this script only does it ahead of time (and reports bad files before a long run is queued).
See data/README.md for the cache file and how to clear it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py, e.g. data=acdc data.root=...")
    parser.add_argument("--clear", action="store_true", help="delete this dataset's cache files first")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from seg.config import ConfigError, register_configs, validate
    from seg.data import DataError, clear_cache, prepare, with_defaults

    register_configs()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
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
