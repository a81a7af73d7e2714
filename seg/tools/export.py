"""seg-export: a trained run's checkpoint as ONNX (opset 18 unless opset= says otherwise), checked against PyTorch.

The graph is the network: input ``image`` (N, 1, size, size) float32 (and ``domain`` (N,) int64 for
norm=cin), output ``logits`` (N, 1 + classes, size, size), the batch size free. The preprocessing,
label values and training orientation that seg-predict applies around it are written into the
model's metadata (``seg.*`` keys; docs/inference.md). With check=true (default) onnxruntime runs the
exported model on a random batch and the file is written only if its logits match PyTorch's to
1e-4 (relative); the difference is printed. Needs the onnx extra: pip install -e '.[onnx]'.

Every option is checked at start; a bad one ends the tool with one line naming it, exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..runtime.checkpoint import CheckpointError
from ..data.slices import TASKS, class_names
from ..inference.export import (EXTRA, MAX_OPSET, OPSET, ExportError, checkpoint_metadata, missing_packages,
                                takes_domain, write_export)
from ..config.options import OptionError, check_new_file, parse_bool, parse_key_values
from ..inference.predict import dataset_label_values, read_checkpoint, trained_model, training_orientation
from . import arguments

USAGE = "usage: seg-export ckpt=<best.pt> output=<model.onnx> [opset=18] [check=true] [overwrite=true]"
DEFAULTS = {"ckpt": None, "output": None, "opset": "18", "check": "true", "overwrite": "false"}


def main(argv: list[str] | None = None) -> int:
    """seg-export with ``argv`` (default: the command line's arguments); returns the exit code."""
    args = parse_key_values(arguments(argv), DEFAULTS, USAGE)
    try:
        check, overwrite = parse_bool("check", args["check"]), parse_bool("overwrite", args["overwrite"])
        opset = int(args["opset"]) if args["opset"].isdigit() else 0
        if not OPSET <= opset <= MAX_OPSET:
            raise OptionError(f"opset={args['opset']}: choose an integer from {OPSET} to {MAX_OPSET}")
        output = Path(args["output"])
        check_new_file("output", args["output"], output, ".onnx", overwrite)
        if not Path(args["ckpt"]).is_file():
            raise OptionError(f"ckpt={args['ckpt']}: no such file")
        state = read_checkpoint(args["ckpt"])  # refuses non-finite weights; warns of a run that diverged
        missing = missing_packages(check)
        if missing:
            raise OptionError(f"export needs the onnx extra ({EXTRA}); missing: {', '.join(missing)}"
                              + (" (or pass check=false)" if missing == ["onnxruntime"] else ""))
        data = state["config"]["data"]
        values = dataset_label_values(data)
        labels = dict(zip(class_names(data["task"]), [values[project] for project in TASKS[data["task"]]]))
        orientation = training_orientation(state)
        metadata = checkpoint_metadata(state, labels, orientation and orientation[0], args["ckpt"])
        model = trained_model(state)
        difference = write_export(model, output, image_size=data["image_size"],
                                  in_channels=state["config"]["model"]["in_channels"], opset=opset,
                                  metadata=metadata, check=check)
    except (OptionError, CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = data["image_size"]
    inputs = f"image (N, 1, {size}, {size}) float32" + (", domain (N,) int64" if takes_domain(model) else "")
    print(f"Written: {output} (ONNX opset {opset}; {inputs} -> logits (N, {len(labels) + 1}, {size}, {size}); "
          f"norm={metadata['seg.norm']}, task {data['task']})")
    print(f"Parity with PyTorch on a random batch: max |difference| {difference:.1e} of the largest logit"
          if difference is not None else "Parity not checked (check=false)")
    if orientation is None:
        print("note: the training orientation is unknown (not in the checkpoint, training data not found): "
              "seg.inference.orientation is not set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
