"""ONNX export: every layer of the registry exports and runs in onnxruntime with PyTorch's logits, and
seg-export writes a trained checkpoint that segments like predict.py, with its metadata.

Needs the onnx extra (onnx, onnxscript, onnxruntime); without it these tests are skipped, saying so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inference_runs import checkpoint, script_ok, trained_run
from seg.data.volumes import read_nifti
from seg.inference.export import OPSET, PARITY_TOLERANCE, export_onnx, onnx_logits, parity, takes_domain
from seg.inference.predict import load_segmenter
from seg.norms import NORMS
from seg.model.unet import UNet

REASON = "the onnx extra is not installed (pip install -e '.[onnx]'): onnx export is not tested"
onnx = pytest.importorskip("onnx", reason=REASON)
pytest.importorskip("onnxscript", reason=REASON)
pytest.importorskip("onnxruntime", reason=REASON)

pytestmark = pytest.mark.usefixtures("one_thread")

# options that make a layer fit a U-Net of width 8 or keep it small (the registry's defaults otherwise)
SMALL = {"gn": {"groups": 4}, "iln": {"groups": 4}, "spade": {"hidden": 8}, "sean": {"hidden": 8},
         "lcn": {"window": 7}}


def small_unet(name: str) -> UNet:
    """A small U-Net of the layer in eval mode, every parameter and running statistic non-trivial."""
    torch.manual_seed(0)
    model = UNet(norm=name, depth=2, base_channels=8, num_classes=4, norm_options=SMALL.get(name), num_domains=2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for key, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in key else torch.randn_like(buffer) * 0.1)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_layer_exports_with_the_logits_of_pytorch(name, tmp_path):
    """Exported with a batch of 2, run by onnxruntime on a batch of 3 (the batch size is free), with a
    training domain and an unseen one (-1) for a domain-conditioned layer: PyTorch's logits."""
    model = small_unet(name)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, image_size=32)
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    assert [i.name for i in graph.graph.input] == (["image", "domain"] if takes_domain(model) else ["image"])
    image = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    domain = torch.tensor([1, 0, -1]) if takes_domain(model) else None
    assert parity(model, path, image, domain) < PARITY_TOLERANCE
    assert onnx_logits(path, image.numpy(), None if domain is None else domain.numpy()).shape == (3, 4, 32, 32)


@pytest.mark.slow
def test_export_script_writes_a_model_that_segments_like_predict(acdc_root, tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    printed = script_ok("export", f"ckpt={checkpoint(run)}", f"output={tmp_path / 'model.onnx'}")
    assert f"ONNX opset {OPSET}" in printed and "image (N, 1, 64, 64) float32 -> logits (N, 4, 64, 64)" in printed
    assert "Parity with PyTorch" in printed

    graph = onnx.load(str(tmp_path / "model.onnx"))
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert metadata["seg.task"] == "multi" and json.loads(metadata["seg.labels"]) == {"rv": 1, "myo": 2, "lv": 3}
    assert json.loads(metadata["seg.preprocessing"])["image_size"] == 64 and metadata["seg.inference.orientation"] == "RAS"

    segmenter = load_segmenter(checkpoint(run), device="cpu")
    image, spacing, _ = read_nifti(acdc_root / "database" / "training" / "patient002" / "patient002_frame01.nii.gz")
    x = segmenter.prepare(image, spacing)
    logits = torch.from_numpy(onnx_logits(tmp_path / "model.onnx", x.numpy()))
    torch.testing.assert_close(torch.softmax(logits, 1), segmenter.probabilities(x), atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left
