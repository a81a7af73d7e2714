"""seg-predict: segment NIfTI volumes with a trained run's checkpoint (or an ensemble), on the input's grid.

input: one 3D volume, or a folder searched recursively (ACDC's ``*_gt`` label maps and ``*_4d`` cine
series are left out by name). Each output ``<name>.nii.gz`` has the input's affine and header and the
dataset's own label values (ACDC: rv 1, myo 2, lv 3); preprocessing is the training run's own (from
the checkpoint), and every input is first reoriented by its affine to the orientation of the training
images, the labels mapped back. Options (docs/inference.md)::

    ckpt=<best.pt> or [a.pt,b.pt]     one checkpoint, or an ensemble (softmax averaged); must fit together
    device=auto|cpu|cuda|cuda:<n>     batch_size=16
    interpolation=nearest|linear      how class scores return to the input grid (seg/inference/predict.py)
    tta=false|true                    nnU-Net's test-time mirroring over the in-plane axes
    orientation=auto|<axis codes>     the training orientation (auto: from the checkpoint or its data)
    domain=<vendor>                   for norm=cin: the vendor of the inputs (unset or unseen: mean row)
    overwrite=false|true              replace existing files in output

Refused at start, one line, exit code 1: a bad option value, an output folder that is, contains or
lies inside an input, an existing file in output (without overwrite=true), checkpoints that do not
fit together. An input of a folder that cannot be read is skipped and named on one line; the others
are written and the exit code is 2.
"""

from __future__ import annotations

import sys

from ..runtime.checkpoint import CheckpointError
from ..data import DataError
from ..config.options import OptionError, parse_bool, parse_key_values, parse_positive_int
from ..inference.files import plan_outputs, predict_files
from ..inference.predict import check_orientation, load_segmenter, parse_checkpoints
from ..runtime.device import DeviceError, resolve_device
from . import arguments

SKIPPED_EXIT_CODE = 2  # some inputs of a folder could not be read (the others were written)

USAGE = ("usage: seg-predict ckpt=<best.pt or [a.pt,b.pt]> input=<volume.nii.gz or folder> output=<folder> "
         "[tta=true] [overwrite=true] ...")
DEFAULTS = {"ckpt": None, "input": None, "output": None, "device": "auto", "batch_size": "16",
            "interpolation": "nearest", "tta": "false", "orientation": "auto", "domain": "", "overwrite": "false"}


def main(argv: list[str] | None = None) -> int:
    """seg-predict with ``argv`` (default: the command line's arguments); returns the exit code."""
    args = parse_key_values(arguments(argv), DEFAULTS, USAGE)
    try:
        batch_size = parse_positive_int("batch_size", args["batch_size"])
        tta, overwrite = parse_bool("tta", args["tta"]), parse_bool("overwrite", args["overwrite"])
        checkpoints = parse_checkpoints(args["ckpt"])
        if args["interpolation"] not in ("nearest", "linear"):
            raise OptionError(f"interpolation={args['interpolation']}: choose nearest or linear")
        check_orientation(args["orientation"])
        resolve_device(args["device"], key="device")
        plan = plan_outputs(args["input"], args["output"], overwrite)
        segmenter = load_segmenter(checkpoints, device=args["device"], interpolation=args["interpolation"],
                                   batch_size=batch_size, domain=args["domain"] or None, tta=tta,
                                   orientation=args["orientation"])
        if segmenter.domain and not any(segmenter.domain in m.domains for m in segmenter.members):
            print(f"note: domain={segmenter.domain} was not a training domain ({', '.join(segmenter.domains)}); "
                  f"cin uses the mean of its per-domain (gamma, beta)")
        prediction = predict_files(segmenter, plan)
    except (OptionError, DeviceError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    written, skipped = prediction.written, prediction.skipped
    print(f"{len(written)} label volume(s) written to {args['output']} (task {segmenter.data['task']}"
          f"{', ensemble of ' + str(len(segmenter.members)) if len(segmenter.members) > 1 else ''}"
          f"{', test-time mirroring' if tta else ''})")
    if skipped:
        print(f"error: {len(skipped)} of {len(written) + len(skipped)} input(s) skipped (listed above, and in "
              f"{prediction.plan.record})", file=sys.stderr)
        return SKIPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
