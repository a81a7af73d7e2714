"""The ACDC reader, preprocessing and splits on real NIfTI trees, and refusal of bad files."""

import gzip

import numpy as np
import pytest
import torch

from acdc_tree import make_acdc_tree, write_volume
from seg.augment import augment_batch
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
    out_images, out_labels = augment_batch(images, labels, rotate_deg=90, flip=True, generator=g)
    assert out_labels.dtype == torch.uint8 and set(out_labels.unique().tolist()) <= {0, 1}
    assert not torch.equal(out_labels, labels)
    assert torch.equal(out_images[:, 0] > 2.5, out_labels == 1) or (
        ((out_images[:, 0] > 2.5) != (out_labels == 1)).float().mean() < 0.02)
    same_images, same_labels = augment_batch(images, labels, rotate_deg=0, flip=False, generator=g)
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
