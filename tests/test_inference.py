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
from inference_runs import back_to_source_grid, checkpoint, script, script_ok, trained_run, write_reoriented
from seg.data.slices import prepare_volume
from seg.data.volumes import Volume
from seg.evaluation.files import evaluate_folders
from seg.inference.predict import to_input_grid


def run_script(tool, *arguments):
    result = subprocess.run([sys.executable, "-m", f"seg.tools.{tool}", *arguments], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"seg-{tool} failed:\n{result.stdout}\n{result.stderr}"
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


@pytest.mark.slow
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

    run_script("predict", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"input={inputs}",
               f"output={tmp_path / 'pred'}")
    predictions = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in predictions] == sorted(p.name for p in inputs.iterdir())
    for prediction in predictions:
        written, source = nib.load(str(prediction)), nib.load(str(inputs / prediction.name))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}  # ACDC's own values

    truths = tmp_path / "gt"  # the test patients' ground truths: each has a prediction
    truths.mkdir()
    for patient in metrics["split"]["test"]:
        for label in (acdc_root / "database" / "training" / patient).glob("*_gt.nii.gz"):
            (truths / label.name).symlink_to(label)
    printed = run_script("evaluate", f"pred={tmp_path / 'pred'}", f"gt={truths}")
    assert "| case | phase | dice_rv |" in printed
    evaluation = evaluate_folders(tmp_path / "pred", truths)
    assert evaluation.classes == ["rv", "myo", "lv"] and len(evaluation.cases) == metrics["num_test_volumes"]
    # predict.py batches one volume's slices, the trainer 16 slices across volumes: a different batch
    # changes the summation order inside the convolutions, which (with one thread, say) can flip a few
    # pixels whose two classes tie to float precision -- a 1e-4 change of Dice, not a wrong geometry
    assert evaluation.dice == pytest.approx(metrics["dice"], abs=1e-3)
    for name in ("rv", "myo", "lv"):
        assert evaluation.mean("dice", name) == pytest.approx(metrics[f"dice_{name}"], abs=1e-3, nan_ok=True)


@pytest.mark.slow
def test_predict_writes_task_labels_in_dataset_values(acdc_root, tmp_path):
    """A single volume with a one-class model: its class is written as the dataset's value (lv -> 3)."""
    run = tmp_path / "run"
    run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "data.task=lv", "trainer.progress=false",
              "trainer.epochs=1", f"hydra.run.dir={run}")
    volume = acdc_root / "database" / "training" / "patient001" / "patient001_frame01.nii.gz"
    run_script("predict", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"input={volume}",
               f"output={tmp_path / 'pred'}", "interpolation=linear")
    written = np.asarray(nib.load(str(tmp_path / "pred" / volume.name)).dataobj)
    assert written.shape == nib.load(str(volume)).shape and set(np.unique(written)) <= {0, 3}
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["labels"] == {"lv": 3}


# ---------------------------------------------------------------------------- orientation


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flipped_x", "slices_first", "swapped_flipped_y", "flipped_slices"])
def test_another_orientation_gives_the_same_labels_in_world_space(kind, acdc_root, tmp_path_factory, tmp_path):
    """A volume stored in another voxel order (its affine saying so) is the same image: predict.py
    reorients it to the training orientation, predicts, and maps the labels back onto its own grid --
    voxel for voxel the labels of the original at the same place in the world, and the same Dice
    against its ground truth stored the same way."""
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    patient = acdc_root / "database" / "training" / "patient001"
    inputs, truths = tmp_path / "inputs", tmp_path / "gt"
    inputs.mkdir()
    truths.mkdir()
    for name, source in (("original", patient / "patient001_frame01.nii.gz"),
                         ("original_gt", patient / "patient001_frame01_gt.nii.gz")):
        (inputs if name == "original" else truths).joinpath(f"{name}.nii.gz").symlink_to(source)
    write_reoriented(patient / "patient001_frame01.nii.gz", inputs / "moved.nii.gz", kind)
    write_reoriented(patient / "patient001_frame01_gt.nii.gz", truths / "moved_gt.nii.gz", kind)

    script_ok("predict", f"ckpt={checkpoint(run)}", f"input={inputs}", f"output={tmp_path / 'pred'}")
    original = np.asarray(nib.load(str(tmp_path / "pred" / "original.nii.gz")).dataobj)
    moved_image = nib.load(str(tmp_path / "pred" / "moved.nii.gz"))
    assert moved_image.shape == nib.load(str(inputs / "moved.nii.gz")).shape
    assert np.allclose(moved_image.affine, nib.load(str(inputs / "moved.nii.gz")).affine)
    assert (original > 0).sum() > 100  # the model finds the heart: the comparison below means something
    moved = back_to_source_grid(np.asarray(moved_image.dataobj), kind, original.shape)
    assert np.array_equal(moved, original)

    evaluation = evaluate_folders(tmp_path / "pred", truths)
    by_case = {case.case: case.dice for case in evaluation.cases}
    assert by_case["moved"] == pytest.approx(by_case["original"], nan_ok=True)


@pytest.mark.slow
def test_orientation_is_refused_when_unknown_and_can_be_given(acdc_root, tmp_path_factory, tmp_path):
    """A checkpoint whose training data is gone and that does not record its orientation: refused
    at start, naming orientation=; given explicitly, it is used."""
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    state = torch.load(checkpoint(run), weights_only=True)
    state.pop("orientation", None)
    state["config"]["data"]["root"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    volume = acdc_root / "database" / "training" / "patient002" / "patient002_frame01.nii.gz"
    result = script("predict", f"ckpt={moved}", f"input={volume}", f"output={tmp_path / 'pred'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: orientation=auto:" in result.stderr and "orientation=RAS" in result.stderr
    assert not (tmp_path / "pred").exists()
    script_ok("predict", f"ckpt={moved}", f"input={volume}", f"output={tmp_path / 'pred'}", "orientation=RAS")
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["orientation"] == "RAS"


# ---------------------------------------------------------------------------- never overwrite an input


def digest(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["the input folder", "inside the input folder", "above the input folder",
                                   "the folder of the input file", "the folder the inputs link to"])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(where, acdc_root, tmp_path_factory,
                                                                        tmp_path):
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    data = tmp_path / "data" / "images"
    data.mkdir(parents=True)
    for image in (acdc_root / "database" / "training" / "patient003").glob("patient003_frame??.nii.gz"):
        (data / image.name).write_bytes(image.read_bytes())
    links = tmp_path / "links"
    links.mkdir()
    for image in data.iterdir():
        (links / image.name).symlink_to(image)
    source, output = {
        "the input folder": (data, data),
        "inside the input folder": (data, data / "pred"),
        "above the input folder": (data, tmp_path / "data"),
        "the folder of the input file": (data / "patient003_frame01.nii.gz", data),
        "the folder the inputs link to": (links, data),
    }[where]
    before = digest(tmp_path / "data")
    result = script("predict", f"ckpt={checkpoint(run)}", f"input={source}", f"output={output}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: output={output}:") and len(result.stderr.splitlines()) == 1
    assert digest(tmp_path / "data") == before  # nothing written, nothing overwritten


@pytest.mark.slow
def test_existing_files_are_kept_unless_overwrite_true(acdc_root, tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    volume = acdc_root / "database" / "training" / "patient004" / "patient004_frame01.nii.gz"
    output = tmp_path / "pred"
    output.mkdir()
    (output / volume.name).write_bytes(b"someone's earlier result")
    result = script("predict", f"ckpt={checkpoint(run)}", f"input={volume}", f"output={output}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: output={output}: would overwrite 1 existing file(s): {volume.name}" in result.stderr
    assert "overwrite=true" in result.stderr
    assert (output / volume.name).read_bytes() == b"someone's earlier result"
    assert not (output / "predictions.json").exists()

    script_ok("predict", f"ckpt={checkpoint(run)}", f"input={volume}", f"output={output}", "overwrite=true")
    assert nib.load(str(output / volume.name)).shape == nib.load(str(volume)).shape


# ---------------------------------------------------------------------------- nothing drops out silently


@pytest.mark.slow
def test_a_skipped_input_makes_predict_fail_and_evaluate_refuse_its_missing_prediction(acdc_root, tmp_path_factory,
                                                                                        tmp_path):
    """predict.py over a folder with an unreadable file: the others are written, the bad one named on
    one line, exit code 2. evaluate.py then refuses the ground truth without prediction, naming it;
    with missing=zero it scores it as Dice 0 (an empty prediction) and lists it."""
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    patient = acdc_root / "database" / "training" / "patient005"
    inputs, truths = tmp_path / "inputs", tmp_path / "gt"
    inputs.mkdir()
    truths.mkdir()
    (inputs / "patient005_frame01.nii.gz").symlink_to(patient / "patient005_frame01.nii.gz")
    (inputs / "patient005_frame10.nii.gz").write_bytes((patient / "patient005_frame10.nii.gz").read_bytes()[:300])
    for label in patient.glob("*_gt.nii.gz"):
        (truths / label.name).symlink_to(label)

    result = script("predict", f"ckpt={checkpoint(run)}", f"input={inputs}", f"output={tmp_path / 'pred'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and str(inputs / "patient005_frame10.nii.gz") in skipped[0]
    assert "error: 1 of 2 input(s) skipped" in result.stderr
    assert (tmp_path / "pred" / "patient005_frame01.nii.gz").is_file()
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [entry["input"] for entry in record["skipped"]] == [str(inputs / "patient005_frame10.nii.gz")]

    result = script("evaluate", f"pred={tmp_path / 'pred'}", f"gt={truths}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: no prediction for 1 ground truth(s): patient005_frame10" in result.stderr
    assert "missing=zero" in result.stderr

    printed = script_ok("evaluate", f"pred={tmp_path / 'pred'}", f"gt={truths}", "missing=zero")
    assert "Missing predictions, counted as Dice 0: patient005_frame10" in printed
    evaluation = evaluate_folders(tmp_path / "pred", truths, missing="zero")
    missing = next(case for case in evaluation.cases if case.case == "patient005_frame10")
    assert missing.missing and all(missing.dice[name] == 0.0 for name in ("rv", "myo", "lv"))
    found = next(case for case in evaluation.cases if case.case == "patient005_frame01")
    assert evaluation.mean("dice", "lv") == pytest.approx(found.dice["lv"] / 2)


@pytest.mark.slow
def test_acdc_cine_and_label_files_are_left_out_of_a_folder_by_name(acdc_root, tmp_path_factory, tmp_path):
    """An ACDC patient folder: the _gt label maps and the _4d cine are not inputs (exit 0), the frames are."""
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    patient = acdc_root / "database" / "training" / "patient006"
    printed = script_ok("predict", f"ckpt={checkpoint(run)}", f"input={patient}", f"output={tmp_path / 'pred'}")
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == sorted(
        p.name for p in patient.glob("patient006_frame??.nii.gz"))
    assert "left out by name: 2 label map(s) (*_gt), 1 cine series (*_4d)" in printed
