"""Test-time mirroring (tta=true) and ensembles of checkpoints (ckpt=[a,b]): what they average, that
mirroring makes the prediction commute with mirroring the input, and which ensembles are refused."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from inference_runs import checkpoint, script, script_ok, trained_run
from seg.data.volumes import read_nifti
from seg.inference.predict import MIRRORINGS, load_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def runs(acdc_root, tmp_path_factory):
    """Two runs of one configuration that differ in their seed (two 'folds'), and a run of another task."""
    return {"a": trained_run(tmp_path_factory, acdc_root, "data.task=multi"),
            "b": trained_run(tmp_path_factory, acdc_root, "data.task=multi", "seed=1"),
            "lv": trained_run(tmp_path_factory, acdc_root, "data.task=lv")}


def network_input(segmenter, acdc_root, patient="patient002"):
    image, spacing, _ = read_nifti(acdc_root / "database" / "training" / patient / f"{patient}_frame01.nii.gz")
    return segmenter.prepare(image, spacing)


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_tta_is_the_mean_softmax_over_the_four_in_plane_mirrorings(memory_format, runs, acdc_root, tmp_path):
    """nnU-Net's 2D test-time mirroring: no flip, flip x, flip y, flip both; each output flipped back;
    the softmax probabilities averaged with equal weights. In both memory formats a run may have
    trained in (predict.py runs a model in its run's format)."""
    assert MIRRORINGS == ((), (2,), (3,), (2, 3))
    state = torch.load(checkpoint(runs["a"]), weights_only=True)
    state["config"]["trainer"]["channels_last"] = memory_format == "channels_last"
    path = tmp_path / f"{memory_format}.pt"
    torch.save(state, path)
    plain = load_segmenter(path, device="cpu")
    tta = load_segmenter(path, device="cpu", tta=True)
    assert tta.members[0].memory_format == getattr(torch, "channels_last" if memory_format == "channels_last"
                                                   else "contiguous_format")
    x = network_input(plain, acdc_root)
    explicit = torch.stack([plain.probabilities(x.flip(dims)).flip(dims) if dims else plain.probabilities(x)
                            for dims in MIRRORINGS]).mean(0)
    assert torch.allclose(tta.probabilities(x), explicit, atol=1e-6)
    assert not torch.allclose(tta.probabilities(x), plain.probabilities(x), atol=1e-3)  # mirroring does something
    assert torch.allclose(tta.probabilities(x).sum(1), torch.ones(1), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [(2,), (3,), (2, 3)], ids=["x", "y", "both"])
def test_with_tta_a_mirrored_input_gives_the_mirrored_probabilities(dims, runs, acdc_root):
    tta = load_segmenter(checkpoint(runs["a"]), device="cpu", tta=True)
    plain = load_segmenter(checkpoint(runs["a"]), device="cpu")
    x = network_input(tta, acdc_root)
    assert torch.allclose(tta.probabilities(x.flip(dims)), tta.probabilities(x).flip(dims), atol=1e-5)
    assert not torch.allclose(plain.probabilities(x.flip(dims)), plain.probabilities(x).flip(dims), atol=1e-3)


@pytest.mark.slow
def test_predict_tta_labels_a_mirrored_volume_as_the_mirrored_labels(runs, acdc_root, tmp_path):
    """predict.py tta=true on a volume and on its mirror image (the array mirrored in-plane, the same
    affine: another image, not another orientation): the labels are mirrored, voxel for voxel."""
    source = acdc_root / "database" / "training" / "patient002" / "patient002_frame01.nii.gz"
    image = nib.load(str(source))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "original.nii.gz").symlink_to(source)
    mirrored = np.ascontiguousarray(np.asarray(image.dataobj)[::-1, :, :])
    nib.save(nib.Nifti1Image(mirrored, image.affine, image.header), str(inputs / "mirrored.nii.gz"))
    script_ok("predict", f"ckpt={checkpoint(runs['a'])}", f"input={inputs}", f"output={tmp_path / 'pred'}",
              "tta=true")
    original = np.asarray(nib.load(str(tmp_path / "pred" / "original.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(tmp_path / "pred" / "mirrored.nii.gz")).dataobj)
    assert (original > 0).sum() > 100
    assert np.array_equal(labels, original[::-1, :, :])
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["tta"] is True


@pytest.mark.slow
def test_an_ensemble_averages_the_softmax_of_its_checkpoints(runs, acdc_root):
    a = load_segmenter(checkpoint(runs["a"]), device="cpu")
    b = load_segmenter(checkpoint(runs["b"]), device="cpu")
    both = load_segmenter([checkpoint(runs["a"]), checkpoint(runs["b"])], device="cpu")
    x = network_input(a, acdc_root)
    pa, pb = a.probabilities(x), b.probabilities(x)
    assert not torch.allclose(pa, pb, atol=1e-3)  # two different models
    assert torch.allclose(both.probabilities(x), (pa + pb) / 2, atol=1e-6)
    # with mirroring: the mean over models of each model's mirrored mean
    a_tta, b_tta = (load_segmenter(checkpoint(runs[k]), device="cpu", tta=True) for k in "ab")
    both_tta = load_segmenter([checkpoint(runs["a"]), checkpoint(runs["b"])], device="cpu", tta=True)
    assert torch.allclose(both_tta.probabilities(x), (a_tta.probabilities(x) + b_tta.probabilities(x)) / 2, atol=1e-6)


@pytest.mark.slow
def test_predict_with_an_ensemble_writes_the_ensembles_labels(runs, acdc_root, tmp_path):
    volume = acdc_root / "database" / "training" / "patient003" / "patient003_frame01.nii.gz"
    pair = [checkpoint(runs["a"]), checkpoint(runs["b"])]
    printed = script_ok("predict", f"ckpt=[{pair[0]},{pair[1]}]", f"input={volume}", f"output={tmp_path}/pred")
    assert "ensemble of 2" in printed
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["checkpoints"] == [str(p) for p in pair]
    image, spacing, affine = read_nifti(volume)
    expected = load_segmenter(pair, device="cpu").segment(image, spacing, affine)
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "pred" / volume.name)).dataobj), expected)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["data.task", "data.spacing", "data.image_size", "data.clip_percentiles",
                                    "data.normalize", "data.format"])
def test_checkpoints_that_do_not_fit_together_are_refused(change, runs, acdc_root, tmp_path):
    """An ensemble needs one task (classes), one set of label values and one preprocessing: a model
    trained otherwise is refused at start, naming both checkpoints and the key."""
    first = checkpoint(runs["a"])
    if change == "data.task":
        other = checkpoint(runs["lv"])
        there, here = "multi", "lv"
    else:  # the same weights, under a run configuration that preprocessed (or labelled) differently
        state = torch.load(first, weights_only=True)
        section, key = change.split(".")
        there = state["config"][section][key]
        here = {"data.spacing": 2.0, "data.image_size": 96, "data.clip_percentiles": [1.0, 99.0],
                "data.normalize": "none", "data.format": "mnms"}[change]
        state["config"][section][key] = here
        other = tmp_path / "other.pt"
        torch.save(state, other)
        if change == "data.format":  # M&Ms writes lv 1, myo 2, rv 3
            change, there, here = "labels", "{0: 0, 1: 1, 2: 2, 3: 3}", "{0: 0, 1: 3, 2: 2, 3: 1}"
    volume = acdc_root / "database" / "training" / "patient003" / "patient003_frame01.nii.gz"
    result = script("predict", f"ckpt=[{first},{other}]", f"input={volume}", f"output={tmp_path}/pred")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: ckpt: {other} does not fit {first} in one ensemble: {change} is {there} there, {here} here "
        f"(the models of an ensemble share task, label values and preprocessing)"), result.stderr
    assert not (tmp_path / "pred").exists()
