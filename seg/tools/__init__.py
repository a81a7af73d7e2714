"""The user tools, as console commands (pyproject.toml's [project.scripts], installed by ``pip install -e .``).

    seg-predict ckpt=<best.pt or [a.pt,b.pt]> input=<volume or folder> output=<folder> [tta=true] ...
    seg-evaluate pred=<folder> gt=<folder> [labels=rv:1,myo:2,lv:3] [out=scores.csv] ...
    seg-export ckpt=<best.pt> output=<model.onnx> [opset=18] [check=true] [overwrite=true]
    seg-summarize <sweep folder> [--metric dice_2d] [--no-plots]
    seg-prepare-data <train.py overrides> [--clear]

One module per tool, each with ``main(argv=None) -> exit code``; without installing, ``python -m
seg.tools.<module> ...`` (predict, evaluate, export, summarize, prepare_data) is the same command.
Training stays ``python train.py``. Every option of predict, evaluate and export is checked at start: a
bad one ends the tool with one line naming it and exit code 1, nothing written. The work itself is in
seg/inference, seg/evaluation, seg/study and seg/data (the tools are the top layer and may import any of
them); a tool imports only what it runs (seg-summarize needs no torch).
"""

from __future__ import annotations

import sys


def arguments(argv: list[str] | None) -> list[str]:
    """The tool's arguments: ``argv``, or the command line's."""
    return sys.argv[1:] if argv is None else list(argv)
