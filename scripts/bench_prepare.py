"""Benchmark: the first start on an ACDC-size dataset (prepare + cache) vs the second, cached start.

    python scripts/bench_prepare.py                       # 100-patient phantom, ED+ES, training defaults
    python scripts/bench_prepare.py --patients 20 --root /tmp/seg-bench

Generates the built-in phantom once (timed apart: it is not data preparation), then times
``load_splits`` -- everything a training run does before its first step -- twice: with the cache
removed (read every NIfTI, preprocess to 256x256 at 1.5 mm, write the cache) and again (cache
hit). Prints both, their ratio and the cache file's size.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100, help="phantom patients (ACDC's training set: 100)")
    parser.add_argument("--root", type=Path, default=None, help="where the phantom goes (default: a temporary folder)")
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "float16"))
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from seg.config import register_configs
    from seg.data import clear_cache, load_splits, with_defaults

    register_configs()
    data_dir = args.root or Path(tempfile.mkdtemp(prefix="seg-bench-"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=[f"paths.data_dir={data_dir}",
                                                      f"data.phantom.num_patients={args.patients}",
                                                      f"data.cache_dtype={args.cache_dtype}"])
    root = Path(cfg.data.root)
    from seg.data import ensure_phantom

    started = time.perf_counter()
    ensure_phantom(root, cfg.data.phantom.num_patients, cfg.data.phantom.seed, progress=True)
    generation = time.perf_counter() - started
    clear_cache(with_defaults(cfg.data), root)

    timings = {}
    for name in ("first start (prepare + write cache)", "second start (cached)"):
        started = time.perf_counter()
        splits = load_splits(cfg.data, cfg.seed, progress=True)
        timings[name] = time.perf_counter() - started
    cache = Path(splits.cache["path"])
    slices = sum(len(s) for s in splits.values())

    print(f"\n{args.patients}-patient phantom (ED+ES: {2 * args.patients} volumes, {slices} slices of "
          f"{cfg.data.image_size}x{cfg.data.image_size} at {cfg.data.spacing} mm) in {root}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; phantom generation (not timed below) {generation:.1f} s\n")
    print("| start | time (s) |\n|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} |")
    first, second = timings.values()
    print(f"\ncached start is {first / second:.1f}x faster; cache file {cache.name}: "
          f"{cache.stat().st_size / 2**20:.0f} MiB ({args.cache_dtype})")


if __name__ == "__main__":
    main()
