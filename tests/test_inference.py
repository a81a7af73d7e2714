"""Inference and evaluation: the geometry back to the input grid, the metrics' conventions, and the
predict -> evaluate round trip that must return the trainer's own test Dice."""

import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from acdc_tree import disk_labels, write_volume
from conftest import ROOT, run_train
from seg.data.slices import prepare_volume
from seg.data.volumes import Volume
from seg.evaluation import evaluate_folders
from seg.inference import to_input_grid


def run_script(name, *arguments):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *arguments], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("spacing", [None, 1.5])
def test_training_grid_maps_back_onto_the_input_grid(spacing):
    """Labels through the training preprocessing (resample, crop one side, pad the other) and back."""
    shape = (70, 44)  # at 1.2 mm -> 56 x 35 px at 1.5 mm: cropped to 48 along x, padded along y
    label = np.stack([disk_labels(shape, (35 + s, 22), rv_radius=7, myo_radius=11, lv_radius=7) for s in range(3)])
    label[:, :3, :3] = 1  # a blob that the centre crop cuts away (5 px are cut at 1.5 mm, 11 without resampling)
    volume = Volume(image=label.astype(np.float32), label=label, spacing=(1.2, 1.2, 8.0), patient="p")
    prepared = prepare_volume(volume, image_size=48, spacing=spacing, clip_percentiles=None, normalize="none")
    scores = torch.nn.functional.one_hot(prepared.label.long(), 4).permute(0, 3, 1, 2).float()
    back = to_input_grid(scores, shape, volume.spacing, spacing).argmax(1).numpy()

    assert back.shape == label.shape
    assert not back[:, :3, :3].any()  # outside the network's field of view: background
    for value in (1, 2, 3):
        p, g = back[:, 8:] == value, label[:, 8:] == value
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        assert dice == 1.0 if spacing is None else dice > 0.9


# ---------------------------------------------------------------------------- evaluation


def test_evaluation_conventions(tmp_path):
    """Identical masks: Dice 1, HD95 0; a class in neither: undefined; a class only predicted: Dice 0;
    a shift of one voxel along x: HD95 = the x spacing of the header, in mm."""
    truth = np.zeros((20, 20, 3), np.uint8)
    truth[5:12, 5:12, :] = 3  # lv
    pred = truth.copy()
    pred[2:4, 2:4, 1] = 1  # rv predicted, absent from the truth
    shifted = np.zeros_like(truth)
    shifted[6:13, 5:12, :] = 3
    (tmp_path / "pred").mkdir()
    for name, array in (("a", pred), ("b", shifted)):
        write_volume(tmp_path / "pred" / f"{name}.nii.gz", array, spacing=(1.5, 1.5, 10.0), dtype=np.uint8)
        (tmp_path / "gt" / name).mkdir(parents=True)
        write_volume(tmp_path / "gt" / name / f"{name}_gt.nii.gz", truth, spacing=(1.5, 1.5, 10.0), dtype=np.uint8)
        write_volume(tmp_path / "gt" / name / f"{name}.nii.gz", truth * 100.0)  # the image, not the truth

    evaluation = evaluate_folders(tmp_path / "pred", tmp_path / "gt", {"rv": 1, "myo": 2, "lv": 3})
    a, b = evaluation.cases
    assert a.dice["lv"] == 1.0 and a.dice["rv"] == 0.0 and math.isnan(a.dice["myo"])
    assert b.dice["lv"] == pytest.approx(2 * 42 / 98)
    assert evaluation.mean("dice", "lv") == pytest.approx((1 + 2 * 42 / 98) / 2)
    assert evaluation.dice == pytest.approx((0.0 + (1 + 2 * 42 / 98) / 2) / 2)  # mean of rv and lv; myo undefined
    pytest.importorskip("scipy")  # MONAI's Hausdorff distance needs it
    assert a.hd95["lv"] == 0.0 and math.isnan(a.hd95["rv"]) and math.isnan(a.hd95["myo"])
    assert b.hd95["lv"] == pytest.approx(1.5)


# ---------------------------------------------------------------------------- predict -> evaluate


def test_predict_then_evaluate_returns_the_trainers_test_dice(acdc_root, tmp_path):
    """Train on the ACDC-layout tree at its own spacing (1.5 mm: the input grid is the training grid,
    padded), predict the test patients' volumes, evaluate against their _gt files: the same Dice."""
    run = tmp_path / "run"
    run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "data.task=multi", "data.spacing=1.5",
              "data.max_slices_per_volume=null", "trainer.progress=false", f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for patient in metrics["split"]["test"]:
        for image in (acdc_root / "database" / "training" / patient).glob(f"{patient}_frame??.nii.gz"):
            (inputs / image.name).symlink_to(image)

    run_script("predict.py", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"input={inputs}",
               f"output={tmp_path / 'pred'}")
    predictions = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in predictions] == sorted(p.name for p in inputs.iterdir())
    for prediction in predictions:
        written, source = nib.load(str(prediction)), nib.load(str(inputs / prediction.name))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}  # ACDC's own values

    printed = run_script("evaluate.py", f"pred={tmp_path / 'pred'}", f"gt={acdc_root}")
    assert "| case | dice_rv |" in printed
    evaluation = evaluate_folders(tmp_path / "pred", acdc_root)
    assert evaluation.classes == ["rv", "myo", "lv"] and len(evaluation.cases) == metrics["num_test_volumes"]
    # predict.py batches one volume's slices, the trainer 16 slices across volumes: a different batch
    # changes the summation order inside the convolutions, which (with one thread, say) can flip a few
    # pixels whose two classes tie to float precision -- a 1e-4 change of Dice, not a wrong geometry
    assert evaluation.dice == pytest.approx(metrics["dice"], abs=1e-3)
    for name in ("rv", "myo", "lv"):
        assert evaluation.mean("dice", name) == pytest.approx(metrics[f"dice_{name}"], abs=1e-3, nan_ok=True)


def test_predict_writes_task_labels_in_dataset_values(acdc_root, tmp_path):
    """A single volume with a one-class model: its class is written as the dataset's value (lv -> 3)."""
    run = tmp_path / "run"
    run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "data.task=lv", "trainer.progress=false",
              "trainer.epochs=1", f"hydra.run.dir={run}")
    volume = acdc_root / "database" / "training" / "patient001" / "patient001_frame01.nii.gz"
    run_script("predict.py", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"input={volume}",
               f"output={tmp_path / 'pred'}", "interpolation=linear")
    written = np.asarray(nib.load(str(tmp_path / "pred" / volume.name)).dataobj)
    assert written.shape == nib.load(str(volume)).shape and set(np.unique(written)) <= {0, 3}
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["labels"] == {"lv": 3}
