"""The ACDC reader, preprocessing and splits on real NIfTI trees, and refusal of bad files."""

import gzip

import numpy as np
import pytest
import torch

from acdc_tree import make_acdc_tree, write_volume
from conftest import run_train
from seg.data.augmentations import Augmentation
from seg.training.augment import augment_batch
from seg.data import DataError, class_names, load_splits
from seg.data.acdc import read_acdc
from seg.data.slices import crop_or_pad, preprocess, split_patients


def test_reader_reads_ed_and_es_and_ignores_the_cine(acdc_root):
    volumes = read_acdc(acdc_root, progress=False)
    assert len(volumes) == 12 and {v.phase for v in volumes} == {"ED", "ES"}
    first = volumes[0]
    assert first.patient == "patient001" and first.case == "patient001_ED"
    assert first.image.shape == first.label.shape == (4, 48, 40)  # slices first
    assert first.spacing == pytest.approx((1.5, 1.5, 8.0))
    assert first.meta["group"] == "NOR" and first.meta["nbframe"] == "20"
    assert set(np.unique(first.label)) == {0, 1, 2, 3}
    assert all("_4d" not in v.source for v in volumes)
    assert read_acdc(acdc_root / "database" / "training", max_patients=2, progress=False)[-1].patient == "patient002"


def test_preprocessing_resamples_crops_and_maps_the_task(acdc_root):
    volume = read_acdc(acdc_root, max_patients=1, progress=False)[0]
    image, label = preprocess(volume, task="rv", image_size=32, spacing=3.0, clip_percentiles=[0.5, 99.5],
                              normalize="zscore")
    assert image.shape == (4, 1, 32, 32) and label.shape == (4, 32, 32) and label.dtype == torch.uint8
    assert set(label.unique().tolist()) == {0, 1}
    # 48 px * 1.5 mm -> 24 px at 3 mm: padded to 32, so the border is background
    assert label[:, :4].sum() == 0
    # the RV area in mm^2 is preserved by resampling (within partial-volume error)
    rv_mm2 = (volume.label == 1).sum() * 1.5 * 1.5
    assert (label == 1).sum().item() * 9.0 == pytest.approx(rv_mm2, rel=0.15)
    full, multi = preprocess(volume, task="multi", image_size=64, spacing=None, clip_percentiles=[],
                             normalize="zscore")
    assert set(multi.unique().tolist()) == {0, 1, 2, 3}
    assert full[:, :, 8:56, 12:52].mean().abs() < 1e-4  # z-scored inside the original field of view
    assert class_names("multi") == ["rv", "myo", "lv"] and class_names("lv") == ["lv"]


def test_crop_or_pad_keeps_the_centre():
    x = torch.arange(36.0).reshape(1, 6, 6)
    assert torch.equal(crop_or_pad(x, 2, 0.0), x[:, 2:4, 2:4])
    padded = crop_or_pad(x, 8, -1.0)
    assert torch.equal(padded[:, 1:7, 1:7], x) and padded[0, 0, 0] == -1


def test_split_is_by_patient_and_deterministic():
    patients = [f"p{i:02d}" for i in range(20)]
    split = split_patients(patients, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert set().union(*split.values()) == set(patients)
    assert split == split_patients(list(reversed(patients)), seed=3, val_fraction=0.1, test_fraction=0.2)
    assert split != split_patients(patients, seed=4, val_fraction=0.1, test_fraction=0.2)
    with pytest.raises(DataError, match="only 2 patients"):
        split_patients(["a", "b"], seed=0, val_fraction=0.3, test_fraction=0.3)


def test_load_splits_keeps_both_frames_of_a_patient_together(acdc_root):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"root": str(acdc_root), "format": "acdc", "phantom": None, "max_patients": None,
                            "val_fraction": 0.2, "test_fraction": 0.2, "task": "lv", "image_size": 32,
                            "spacing": 3.0, "clip_percentiles": [0.5, 99.5], "normalize": "zscore",
                            "max_slices_per_volume": 2})
    splits = load_splits(cfg, seed=0, progress=False)
    patients = {name: {c["patient"] for c in s.cases} for name, s in splits.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    for s in splits.values():
        assert len(s) == 2 * len(s.cases)  # 2 central slices per volume
        assert {c["phase"] for c in s.cases} == {"ED", "ES"}
        assert s.volume_index.max().item() == len(s.cases) - 1


def test_augmentation_rotates_images_and_labels_together():
    labels = torch.zeros(4, 32, 32, dtype=torch.uint8)
    labels[:, 4:12, 14:18] = 1
    images = labels.float().unsqueeze(1) * 5
    g = torch.Generator().manual_seed(0)
    out_images, out_labels = augment_batch(images, labels, Augmentation(90.0, True), generator=g)
    assert out_labels.dtype == torch.uint8 and set(out_labels.unique().tolist()) <= {0, 1}
    assert not torch.equal(out_labels, labels)
    assert torch.equal(out_images[:, 0] > 2.5, out_labels == 1) or (
        ((out_images[:, 0] > 2.5) != (out_labels == 1)).float().mean() < 0.02)
    same_images, same_labels = augment_batch(images, labels, Augmentation(0.0, False), generator=g)
    assert same_images is images and same_labels is labels


# ---- bad input: a clear message naming the file and the problem


@pytest.fixture
def tree(tmp_path):
    return make_acdc_tree(tmp_path / "acdc", num_patients=2, shape=(16, 16, 2))


def frame(tree, gt=False):
    return tree / "database" / "training" / "patient001" / f"patient001_frame01{'_gt' if gt else ''}.nii.gz"


def expect_error(tree, match):
    with pytest.raises(DataError, match=match):
        read_acdc(tree, progress=False)


def test_truncated_file_is_refused(tree):
    path = frame(tree)
    path.write_bytes(path.read_bytes()[:200])
    expect_error(tree, r"patient001_frame01.nii.gz: not a readable NIfTI file")


def test_non_nifti_file_is_refused(tree):
    with gzip.open(frame(tree), "wb") as handle:
        handle.write(b"this is not an image")
    expect_error(tree, r"patient001_frame01.nii.gz: not a readable NIfTI file")


def test_shape_mismatch_is_refused(tree):
    write_volume(frame(tree, gt=True), np.zeros((16, 12, 2)), dtype=np.uint8)
    expect_error(tree, r"frame01_gt.nii.gz: label shape \(16, 12, 2\) does not match")


def test_affine_mismatch_is_refused(tree):
    write_volume(frame(tree, gt=True), np.zeros((16, 16, 2)), spacing=(2.0, 2.0, 8.0), dtype=np.uint8)
    expect_error(tree, r"frame01_gt.nii.gz: affine differs")


def test_labels_outside_the_set_are_refused(tree):
    write_volume(frame(tree, gt=True), np.full((16, 16, 2), 7), dtype=np.uint8)
    expect_error(tree, r"frame01_gt.nii.gz: label values \[7\] are outside")


def test_nan_voxels_are_refused(tree):
    data = np.ones((16, 16, 2), np.float32)
    data[3, 3, 1] = np.nan
    write_volume(frame(tree), data)
    expect_error(tree, r"patient001_frame01.nii.gz: contains 1 NaN or infinite")


def test_4d_where_3d_is_expected_is_refused(tree):
    write_volume(frame(tree), np.ones((16, 16, 2, 3)))
    expect_error(tree, r"patient001_frame01.nii.gz: expected a 3D volume, found 4D")


def test_missing_frame_and_bad_info_are_refused(tree):
    frame(tree).unlink()
    expect_error(tree, r"patient001_frame01.nii.gz: file not found")
    (tree / "database" / "training" / "patient002" / "Info.cfg").write_text("ED 1\n")
    with pytest.raises(DataError, match=r"patient002/Info.cfg: line 1 is not 'key: value'"):
        read_acdc(tree / "database" / "training" / "patient002", progress=False)


def test_empty_or_wrong_root_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no patient folders found \(expected the ACDC layout"):
        read_acdc(tmp_path / "empty", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        read_acdc(tmp_path / "nowhere", progress=False)


# ---- issue 13: a run refuses, at start and in one line naming the key, what would mean nothing


def run_refused(*overrides, cwd=None):
    """``python train.py`` that must end at start: exit code 1, one ``error:`` line, no traceback."""
    result = run_train(*overrides, "trainer.progress=false", check=False, **({"cwd": cwd} if cwd else {}))
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def compose_train(*overrides):
    from conftest import compose_train

    return compose_train(*overrides)


# (overrides, the message's start): every data value is range-checked by validate() before any work
BAD_DATA_VALUES = [
    (["data.max_patients=-1"], "data.max_patients=-1 must be at least 1 (null: all)"),
    (["data.max_slices_per_volume=0"], "data.max_slices_per_volume=0 must be at least 1"),
    (["data.spacing=-1"], "data.spacing=-1.0 must be a positive size in mm"),
    (["data.spacing=0"], "data.spacing=0.0 must be a positive size in mm"),
    (["data.clip_percentiles=[99,1]"], "data.clip_percentiles=[99, 1] must satisfy 0 <= low < high <= 100"),
    (["data.clip_percentiles=[0.5,150]"], "data.clip_percentiles=[0.5, 150] must satisfy"),
    (["data.clip_percentiles=[1]"], "data.clip_percentiles=[1.0] must be two numbers"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0 must be at least 0 and below 1"),
    (["data.test_fraction=-0.1"], "data.test_fraction=-0.1 must be at least 0 and below 1"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.val_fraction + data.test_fraction = 1 leaves no"),
    (["data.phantom.num_patients=0"], "data.phantom.num_patients=0 must be at least 1"),
    (["data.phantom.seed=-2"], "data.phantom.seed=-2 must be a non-negative integer"),
    (["data.split_seed=-1"], "data.split_seed=-1 must be between 0 and 2**32-1"),
    (["data.augment.rotate_deg=-5"], "data.augment.rotate_deg=-5.0 must be between 0 and 180"),
    (["data=acdc", "data.root=/nowhere", "data.phantom.num_patients=3"],
     "data.phantom.num_patients=3 is set, but data=acdc reads /nowhere: data.phantom.* applies to the built-in "
     "phantom (data=phantom) only"),
    (["data=nnunet", "data.root=/nowhere", "data.patient_regex='(\\w+)_t'"],
     "data.patient_regex='(\\\\w+)_t' has no (?P<patient>...) group"),
    (["data=acdc", "data.root=/nowhere", "data.patient_regex='(?P<patient>x)'"],
     "data.patient_regex applies to data.format=nnunet"),
]


@pytest.mark.parametrize("overrides, message", BAD_DATA_VALUES, ids=[" ".join(o) for o, _ in BAD_DATA_VALUES])
def test_bad_data_values_are_refused_by_validate(overrides, message):
    from seg.training.checks import ConfigError, validate

    with pytest.raises(ConfigError) as refused:
        validate(compose_train(*overrides))
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [case for case in BAD_DATA_VALUES if case[0] in (
    ["data.val_fraction=1.0"], ["data.test_fraction=-0.1"], ["data.phantom.num_patients=0"],
    ["data.max_slices_per_volume=0"], ["data.max_patients=-1"], ["data=acdc", "data.root=/nowhere",
                                                                 "data.phantom.num_patients=3"])])
def test_bad_data_values_end_a_real_run_with_one_line(overrides, message, tmp_path):
    line = run_refused("experiment=smoke", *overrides, f"paths.data_dir={tmp_path / 'data'}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert line == f"error: {message}" or line.startswith(f"error: {message}"), line
    assert not (tmp_path / "data").exists()  # refused before any phantom was generated


@pytest.mark.slow
def test_a_phantom_where_it_cannot_be_written_is_refused_naming_paths_data_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = run_refused("experiment=smoke", f"paths.data_dir={blocker / 'data'}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert line.startswith(f"error: paths.data_dir={blocker / 'data'}: {blocker} is a file, not a folder"), line
    line = run_refused("experiment=smoke", "paths.data_dir=/proc/seg-data", f"hydra.run.dir={tmp_path / 'r2'}")
    assert line.startswith("error: paths.data_dir=/proc/seg-data: cannot generate the built-in phantom in "), line
    assert "set paths.data_dir to a writable folder" in line


def acdc_run(root, tmp_path, *overrides, name="run"):
    return ["experiment=smoke", "data=acdc", f"data.root={root}", "data.image_size=48", "data.spacing=null",
            "data.max_patients=null",
            f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / name}", *overrides]


@pytest.mark.slow
def test_a_patient_folder_without_info_cfg_is_an_error_or_skipped_and_listed(tmp_path):
    import json

    root = make_acdc_tree(tmp_path / "acdc", num_patients=6, shape=(48, 40, 3))
    (root / "database" / "training" / "patient003" / "Info.cfg").unlink()
    line = run_refused(*acdc_run(root, tmp_path, name="raise"))
    assert line.startswith("error: ") and "patient003: no Info.cfg (it names the ED and ES frames)" in line, line
    result = run_train(*acdc_run(root, tmp_path, "data.on_error=skip", "trainer.progress=false", name="skip"))
    assert "warning: skipping patient patient003 (data.on_error=skip): " in result.stderr
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert [case["patient"] for case in metrics["skipped_cases"]] == ["patient003"]
    assert "no Info.cfg" in metrics["skipped_cases"][0]["error"]
    assert metrics["data_summary"] == [{"subset": "database/training", "read": 5, "unlabeled": 0, "bad": 1,
                                        "unread": 0, "unlabeled_because": []}]
    assert "Data subset database/training: 5 patients read, 0 skipped as unlabeled, 1 skipped as bad" in result.stdout


@pytest.mark.slow
def test_a_task_whose_class_no_training_slice_holds_is_refused(tmp_path):
    import nibabel as nib

    root = make_acdc_tree(tmp_path / "acdc", num_patients=6, shape=(48, 40, 3))
    for path in root.rglob("*_gt.nii.gz"):  # a dataset whose experts never drew the RV
        image = nib.load(str(path))
        label = np.asarray(image.dataobj)
        write_volume(path, np.where(label == 1, 0, label), (1.5, 1.5, 8.0), np.uint8)
    line = run_refused(*acdc_run(root, tmp_path, "data.task=rv"))
    assert line == "error: data.task=rv: no training slice contains class rv", line
    line = run_refused(*acdc_run(root, tmp_path, "data.task=multi", name="multi"))
    assert line == "error: data.task=multi: no training slice contains class rv", line
