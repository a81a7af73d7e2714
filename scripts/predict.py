"""Segment NIfTI volumes with a trained run's checkpoint, writing label volumes on the input's grid.

    python scripts/predict.py ckpt=outputs/<run>/checkpoints/best.pt input=patient001_frame01.nii.gz output=pred/
    python scripts/predict.py ckpt=<run>/checkpoints/best.pt input=/path/to/ACDC/database/testing output=pred/

input: one 3D volume, or a folder searched recursively (``*_gt`` label files are left out, 4D
files skipped with a notice). Each output ``<name>.nii.gz`` has the input's affine and header
and the dataset's own label values (ACDC: rv 1, myo 2, lv 3); preprocessing is the training
run's own (from the checkpoint). Options: device=auto|cpu|cuda, batch_size=16,
interpolation=nearest|linear (how class scores return to the input grid; see seg/inference.py),
domain=<vendor> (for norm=cin: the vendor of the inputs; unset or unseen in training: the mean of
the learned per-vendor (gamma, beta)).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USAGE = "usage: python scripts/predict.py ckpt=<best.pt> input=<volume.nii.gz or folder> output=<folder>"


def main(argv: list[str]) -> int:
    from seg.checkpoint import CheckpointError
    from seg.data import DataError
    from seg.inference import load_segmenter, parse_key_values, predict_files

    args = parse_key_values(argv, {"ckpt": None, "input": None, "output": None, "device": "auto",
                                   "batch_size": "16", "interpolation": "nearest", "domain": ""}, USAGE)
    try:
        segmenter = load_segmenter(args["ckpt"], device=args["device"], interpolation=args["interpolation"],
                                   batch_size=int(args["batch_size"]), domain=args["domain"] or None)
        written = predict_files(segmenter, args["input"], args["output"])
    except (CheckpointError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{len(written)} label volume(s) written to {args['output']} (task {segmenter.data['task']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
