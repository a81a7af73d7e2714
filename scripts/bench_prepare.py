"""Benchmark: the first start on an ACDC-size dataset (prepare + cache) vs the second, cached start.

    python scripts/bench_prepare.py                       # 100-patient phantom, ED+ES, training defaults
    python scripts/bench_prepare.py --patients 20 --root /tmp/seg-bench

Generates the built-in phantom once (timed apart: it is not data preparation), then times
``load_splits`` -- everything a training run does before its first step -- twice: with the cache
removed (read every NIfTI, preprocess to 256x256 at 1.5 mm, write the cache) and again (cache
hit). Writes both, their ratio and the cache file's size to docs/results/bench_prepare.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness import ROOT, markdown_table, write_result
from seg.data import clear_cache, ensure_phantom, load_splits, with_defaults
from seg.config.launch import register_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100, help="phantom patients (ACDC's training set: 100)")
    parser.add_argument("--root", type=Path, default=None, help="where the phantom goes (default: a temporary folder)")
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    args = parser.parse_args()

    register_configs()
    data_dir = args.root or Path(tempfile.mkdtemp(prefix="seg-bench-"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=[f"paths.data_dir={data_dir}",
                                                      f"data.phantom.num_patients={args.patients}",
                                                      f"data.cache_dtype={args.cache_dtype}"])
    root = Path(cfg.data.root)
    started = time.perf_counter()
    ensure_phantom(root, cfg.data.phantom.num_patients, cfg.data.phantom.seed, progress=True)
    generation = time.perf_counter() - started
    clear_cache(with_defaults(cfg.data), root)

    timings = {}
    for name in ("first start: read + preprocess + write cache", "second start: from the cache"):
        started = time.perf_counter()
        splits = load_splits(cfg.data, cfg.seed, progress=True)
        timings[name] = time.perf_counter() - started
    cache = Path(splits.cache["path"])
    slices = sum(len(s) for s in splits.values())
    first, second = timings.values()
    about = (f"`load_splits` (everything a training run does before its first step) on the {args.patients}-patient "
             f"phantom (ED+ES: {2 * args.patients} volumes, {slices} slices of {cfg.data.image_size}x"
             f"{cfg.data.image_size} at {cfg.data.spacing} mm), first with its cache removed, then again. Generating "
             f"the phantom itself took {generation:.1f} s and is not included.")
    body = (markdown_table(["start", "time (s)"], [[name, f"{seconds:.2f}"] for name, seconds in timings.items()])
            + f"\nThe cached start is {first / second:.1f}x faster; the cache file ({args.cache_dtype}) is "
              f"{cache.stat().st_size / 2**20:.0f} MiB.")
    print("\n" + body)
    write_result("bench_prepare", "Data preparation: the first start and the cached one", body, about, args.out)


if __name__ == "__main__":
    main()
