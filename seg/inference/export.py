"""ONNX export of a trained U-Net: the network as a graph any ONNX runtime can run, with what it expects.

The graph is the network alone -- ``image`` (N, C, size, size) float32, and for a layer conditioned on
the domain (cin) ``domain`` (N,) int64 (-1: a domain not seen in training) -> ``logits`` (N, classes,
size, size); the batch size is free. What surrounds the network in ``predict.py`` is not in the graph:
the reorientation, the preprocessing (clip, z-score, resample, crop/pad), the softmax and arg-max, the
way back onto the input grid and the label values. Their settings are written into the model's
metadata (``metadata_props``, keys ``seg.*``) so that a user of the ONNX file can reproduce them.

Exporter: torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, which needs
onnxscript), at ONNX opset ``OPSET`` (18) unless asked otherwise. It exports every layer of the registry
(tests/test_export.py checks each against PyTorch through onnxruntime). The older TorchScript exporter
(``dynamo=False``) fails on several of them; it is not used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..norms import spec
from ..runtime.temporaries import temporary_path

OPSET = 18  # the first opset of the exporter, and the one the widest range of runtimes reads
MAX_OPSET = 23  # the newest opset torch 2.13's exporter writes
PARITY_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference accepted, relative to the largest |logit|
EXTRA = "pip install -e '.[onnx]'"


class ExportError(RuntimeError):
    """An export that failed or that does not match PyTorch; the message says which."""


def missing_packages(check: bool = True) -> list[str]:
    """The packages of the onnx extra that this environment lacks (onnxruntime only when checking)."""
    import importlib.util

    names = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    return [name for name in names if importlib.util.find_spec(name) is None]


def takes_domain(model: torch.nn.Module) -> bool:
    """Whether the model's normalization reads the domain id of each image (an ONNX input then)."""
    return spec(model.norm).needs_domain


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notices (skipped torchvision ops, deprecations) are not the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, image_size: int, in_channels: int = 1,
                opset: int = OPSET, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` (eval mode, on the CPU) as ONNX to ``path``: inputs ``image`` (and ``domain``),
    output ``logits``, the batch dimension free; ``metadata`` goes into the model's metadata_props."""
    import onnx

    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    example = torch.randn(2, in_channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    if takes_domain(model):
        args, names, dynamic = (example, torch.tensor([0, -1])), ["image", "domain"], ({0: batch}, {0: batch})
    else:
        args, names, dynamic = (example,), ["image"], ({0: batch},)
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset, external_data=False,
                          input_names=names, output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
    if metadata:
        graph = onnx.load(str(path))
        for key, value in metadata.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(path))


def onnx_logits(path: str | os.PathLike, image: np.ndarray, domain: np.ndarray | None = None) -> np.ndarray:
    """The logits onnxruntime computes from the ONNX file (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": image.astype(np.float32)}
    if "domain" in {i.name for i in session.get_inputs()}:
        feeds["domain"] = (np.zeros(len(image)) if domain is None else domain).astype(np.int64)
    return session.run(["logits"], feeds)[0]


@torch.no_grad()
def parity(model: torch.nn.Module, path: str | os.PathLike, image: torch.Tensor,
           domain: torch.Tensor | None = None) -> float:
    """max |ONNX logits - PyTorch logits| / max |PyTorch logits| on ``image`` (N, C, H, W)."""
    model = model.eval().cpu()
    if domain is None and takes_domain(model):
        domain = torch.zeros(len(image), dtype=torch.int64)
    reference = model(image, domain).numpy() if domain is not None else model(image).numpy()
    exported = onnx_logits(path, image.numpy(), None if domain is None else domain.numpy())
    return float(np.abs(exported - reference).max() / max(np.abs(reference).max(), 1e-12))


def checkpoint_metadata(state: dict, label_values: dict[str, int], orientation: str | None,
                        source: str | os.PathLike) -> dict[str, str]:
    """The ``seg.*`` metadata of a checkpoint's export: what predict.py does around the network."""
    data = state["config"]["data"]
    metadata = {
        "seg.runtime.checkpoint": str(source),
        "seg.norm": str(state["config"]["norm"]["name"]),
        "seg.task": str(data["task"]),
        "seg.labels": json.dumps(label_values),
        "seg.preprocessing": json.dumps({key: data.get(key) for key in
                                         ("image_size", "spacing", "clip_percentiles", "normalize")}),
        "seg.domains": json.dumps(list(state.get("domains", []))),
        "seg.output": "logits (N, 1 + classes, H, W); softmax over dim 1, arg-max: class k is seg.labels' k-th "
                      "value (0 background); inputs: image z-scored as seg.preprocessing, slices of a volume "
                      "in seg.inference.orientation, x and y as the NIfTI array's first two axes",
    }
    if orientation:
        metadata["seg.inference.orientation"] = orientation
    return metadata


def write_export(model: torch.nn.Module, path: Path, *, image_size: int, in_channels: int, opset: int,
                 metadata: dict[str, str], check: bool, seed: int = 0) -> float | None:
    """Export to a temporary file beside ``path``, check parity (``check``), then rename it into place;
    returns the relative difference (None unchecked). A failed check leaves nothing behind."""
    temporary = temporary_path(path, hidden=True, keep_suffix=".onnx")
    try:
        try:
            export_onnx(model, temporary, image_size=image_size, in_channels=in_channels, opset=opset,
                        metadata=metadata)
        except Exception as err:  # the exporter raises many types; the first line says what failed
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"the ONNX exporter failed for norm={model.norm}: {type(err).__name__}: "
                              f"{first}") from None
        difference = None
        if check:
            generator = torch.Generator().manual_seed(seed)
            image = torch.randn(3, in_channels, image_size, image_size, generator=generator)
            domain = torch.tensor([0, -1, 0]) if takes_domain(model) else None  # a training domain, an unseen one
            difference = parity(model, temporary, image, domain)
            if not difference <= PARITY_TOLERANCE:
                raise ExportError(f"the exported model differs from PyTorch by {difference:.2e} (relative; "
                                 f"accepted {PARITY_TOLERANCE:.0e}); nothing written")
        os.replace(temporary, path)
        return difference
    finally:
        temporary.unlink(missing_ok=True)
