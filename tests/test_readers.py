"""The real-dataset readers on small trees of each exact layout, the cache, the splits, and bad input.

Each tree is written by ``dataset_trees`` (NIfTI, DICOM, contour files, CSV tables as shipped);
every check reads real files through the real code.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from acdc_tree import make_acdc_2017_tree, make_acdc_tree, write_volume
from conftest import run_train
from dataset_trees import (MNMS1_CASES, MNMS_CSV, RVSC_STEP, make_mnms1_2020_tree, make_mnms1_tree, make_mnms2_tree,
                           make_nnunet_mnms_tree, make_nnunet_tree, make_rvsc_tree, make_sunnybrook_tree, write_contour)
from seg.data import DataError, load_splits
from seg.data.contours import polygon_mask, read_contour
from seg.data.mnms import read_mnms
from seg.data.nnunet import project_label, read_nnunet
from seg.data.rvsc import read_rvsc
from seg.data.splits import kfold_split
from seg.data.sunnybrook import read_sunnybrook

SMALL = {"image_size": 32, "spacing": 3.0, "val_fraction": 0.2, "test_fraction": 0.2, "phantom": None}


def data_cfg(data_format, root, **overrides):
    """A data config as train.py gets it (schema defaults for every key not given), tiny images."""
    return {"format": data_format, "root": str(root), "task": "multi", **SMALL, **overrides}


def tiny_acdc(root, **overrides):
    """``data_cfg`` for the tiny ACDC trees of the cache tests, whose RV disk lies outside 16x16 images: task lv."""
    return data_cfg("acdc", root, **{"task": "lv", **overrides})


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {"mnms1": make_mnms1_tree(base / "mnms1"), "mnms2": make_mnms2_tree(base / "mnms2"),
            "nnunet": make_nnunet_tree(base / "nnunet"), "sunnybrook": make_sunnybrook_tree(base / "sunnybrook"),
            "sunnybrook_cap": make_sunnybrook_tree(base / "cap", layout="cap"), "rvsc": make_rvsc_tree(base / "rvsc")}


# ---------------------------------------------------------------------------- what each reader produces


def test_mnms1_reads_the_csv_frames_and_swaps_lv_and_rv(trees):
    volumes = read_mnms(trees["mnms1"], progress=False)
    assert len(volumes) == 2 * len(MNMS1_CASES)  # the Unlabeled cases are left out
    by_case = {v.case: v for v in volumes}
    ed, es = by_case["C2L5P7_ED"], by_case["C2L5P7_ES"]  # the CSV says ED frame 2, ES frame 0
    assert ed.image.shape == ed.label.shape == (3, 32, 28) and ed.spacing == pytest.approx((1.4, 1.4, 9.0))
    assert ed.meta == {"vendor": "C", "centre": "4", "subset": "validation", "vendor_name": "VendorC", "group": "NOR"}
    # the LV disk sits at the image centre: M&Ms value 1 there must have become the project's LV (3)
    centre_column = ed.label[:, 15:18, 12].ravel()
    assert set(centre_column.tolist()) == {3}
    assert set(np.unique(ed.label).tolist()) == {0, 1, 2, 3}
    assert (ed.label == 3).sum() > (es.label == 3).sum()  # ES frame has the smaller cavity
    assert (ed.image[ed.label == 3].mean() > ed.image[ed.label == 2].mean() + 200)  # bright blood pool under LV


def test_mnms2_layout_is_detected(trees):
    volumes = read_mnms(trees["mnms2"], progress=False)
    assert [v.case for v in volumes[:6]] == ["001_ED", "001_ES", "002_ED", "002_ES", "003_ED", "003_ES"]
    assert volumes[0].meta["vendor"] == "SIEMENS" and volumes[2].meta["vendor"] == "Philips Medical Systems"
    assert set(volumes[0].label[:, 15, 12].tolist()) == {3}  # LV at the centre, swapped like M&Ms-1


def test_nnunet_maps_label_names_and_groups_frames_by_patient(trees, tmp_path):
    volumes = read_nnunet(trees["nnunet"].parent, progress=False)  # the nnUNet_raw folder holding one dataset
    assert [(v.patient, v.phase) for v in volumes[:2]] == [("patient001", "frame01"), ("patient001", "frame09")]
    assert volumes[0].case == "patient001_frame01" and len(volumes) == 6  # imagesTs not read
    assert set(volumes[0].label[:, 16, 13].tolist()) == {3}
    # another numbering with other names: still mapped by name
    other = make_nnunet_tree(tmp_path, num_patients=1, labels={"background": 0, "left ventricle": 1,
                                                                "Myocardium": 2, "RV_cavity": 3})
    assert set(read_nnunet(other, progress=False)[0].label[:, 16, 13].tolist()) == {3}
    assert [project_label(n) for n in ("LVC", "MLV", "RV", "LV wall", "RV wall", "Right Ventricle", "aorta")] == \
        ["lv", "myo", "rv", "myo", None, "rv", None]


def test_nnunet_unknown_label_names_ask_for_a_label_map(tmp_path):
    root = make_nnunet_tree(tmp_path, num_patients=1, labels={"background": 0, "blood": 1, "MYO": 2, "RV": 3},
                            label_map={"blood": "lv"})
    with pytest.raises(DataError, match=r"dataset.json: cannot tell .* \['blood'\] stand for; map them, e.g. "
                                        r"'data.label_map=\{blood: lv\}'"):
        read_nnunet(root, progress=False)
    volume = read_nnunet(root, label_map={"blood": "lv"}, progress=False)[0]
    assert set(np.unique(volume.label).tolist()) == {0, 1, 2, 3}
    with pytest.raises(DataError, match=r"data.label_map names \['aorta'\], which .*dataset.json does not define"):
        read_nnunet(root, label_map={"aorta": "lv"}, progress=False)


def test_sunnybrook_challenge_release_uses_the_case_series_table(trees):
    volumes = read_sunnybrook(trees["sunnybrook"], progress=False)
    assert [v.case for v in volumes[:2]] == ["SC-HF-I-01_ED", "SC-HF-I-01_ES"] and len(volumes) == 6
    ed, es = volumes[0], volumes[1]
    assert ed.image.shape == (2, 40, 36) and ed.spacing == pytest.approx((1.25, 1.25, 8.0))
    assert ed.image.max() > 900  # the table's series (IM-0004), not the all-zero decoy IM-0001
    assert ed.meta["group"] == "HF-I" and ed.meta["vendor"] == "GE MEDICAL SYSTEMS"
    # the cavity inside the endocardium (radius 8 px): about pi r^2 pixels on each slice
    assert (ed.label[0] == 3).sum() == pytest.approx(np.pi * 8 ** 2, rel=0.1)
    assert (ed.label[0] == 2).sum() == pytest.approx(np.pi * (11 ** 2 - 8 ** 2), rel=0.1)
    # epicardium drawn at ED only: the ES slices are annotated for the LV alone, and hold no myocardium
    assert ed.annotated.tolist() == [0b110, 0b110] and es.annotated.tolist() == [0b100, 0b100]
    assert not (es.label == 2).any() and (es.label == 3).sum() < (ed.label == 3).sum()


def test_sunnybrook_cardiac_atlas_release_matches_instance_numbers(trees):
    volumes = read_sunnybrook(trees["sunnybrook_cap"], progress=False)
    assert len(volumes) == 6 and volumes[0].image.max() > 900  # CINESAX, not the zero CINELAX series
    assert volumes[0].meta["age"] == "60" and volumes[0].patient == "SC-HF-I-01"


def test_rvsc_reads_the_list_and_pairs_test_set_folders(trees):
    volumes = read_rvsc(trees["rvsc"], progress=False)
    assert sorted({v.patient for v in volumes}) == ["P01", "P02", "P03", "P17"]  # P17: Test1Set + Test1SetContours
    ed = volumes[0]
    assert ed.case == "P01_ED" and ed.image.shape == (2, 36, 40) and ed.spacing[:2] == (1.5, 1.5)
    assert set(np.unique(ed.label).tolist()) == {0, 1} and ed.annotated.tolist() == [0b001, 0b001]
    assert (ed.label[0] == 1).sum() == pytest.approx(np.pi * 7 ** 2, rel=0.1)
    assert ed.meta["vendor"] == "SIEMENS"


def test_polygon_mask_fills_pixel_centres_inside():
    square = np.array([[1.5, 0.5], [4.5, 0.5], [4.5, 2.5], [1.5, 2.5]])  # x = columns 2..4, y = rows 1..2
    mask = polygon_mask(square, (4, 6), path="square")
    assert mask.astype(int).tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0] * 6]


# ---------------------------------------------------------------------------- bad input


def test_bad_mnms_files_are_refused_naming_them(tmp_path):
    root = make_mnms1_tree(tmp_path, cases=MNMS1_CASES[:2])
    csv = root / MNMS_CSV
    csv.write_text(csv.read_text().replace("A1D0Q7,VendorA,A,1,1,4", "A1D0Q7,VendorA,A,1,1,9"))
    with pytest.raises(DataError, match=r"case A1D0Q7: ES frame 9 is outside the 5 time frames of A1D0Q7_sa.nii.gz"):
        read_mnms(root, progress=False)
    csv.write_text(csv.read_text().replace("A1D0Q7,VendorA,A,1,1,9", "A1D0Q7,VendorA,A,1,1,2"))
    with pytest.raises(DataError, match=r"A1D0Q7_sa_gt.nii.gz: the ES frame 2 given by the CSV holds no labels"):
        read_mnms(root, progress=False)
    csv.write_text("\n".join(line for line in csv.read_text().splitlines() if "A1D0Q7" not in line))
    with pytest.raises(DataError, match=r"A1D0Q7_sa_gt.nii.gz: case A1D0Q7 has no row in the dataset information "
                                        r"table"):
        read_mnms(root, progress=False)
    csv.unlink()
    with pytest.raises(DataError, match=r"no M&Ms dataset information table found .* External code, ED, ES"):
        read_mnms(root, progress=False)


def test_mnms_3d_file_where_4d_is_expected_and_wrong_root(tmp_path):
    root = make_mnms1_tree(tmp_path, cases=MNMS1_CASES[:1])
    write_volume(root / "Training" / "Labeled" / "A0S9V9" / "A0S9V9_sa.nii.gz", np.ones((32, 28, 3)))
    with pytest.raises(DataError, match=r"A0S9V9_sa.nii.gz: expected a 4D volume, found 3D"):
        read_mnms(root, progress=False)
    with pytest.raises(DataError, match=r"Unlabeled: no labelled patient \(2 found without ground truth: the "
                                        r"Unlabeled subset of M&Ms-1"):
        read_mnms(tmp_path / "OpenDataset" / "Training" / "Unlabeled", progress=False)


def test_bad_nnunet_files_are_refused_naming_them(tmp_path):
    root = make_nnunet_tree(tmp_path, num_patients=1)
    with pytest.raises(DataError, match=r"no dataset.json found \(expected the nnU-Net raw layout"):
        read_nnunet(root / "imagesTr", progress=False)
    (root / "imagesTr" / "patient001_frame09_0000.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient001_frame09.nii.gz: its image patient001_frame09_0000.nii.gz is "
                                        r"missing from imagesTr"):
        read_nnunet(root, progress=False)
    write_volume(root / "labelsTr" / "patient001_frame01.nii.gz", np.full((32, 32, 3), 5), (1.5, 1.5, 5.0), np.uint8)
    with pytest.raises(DataError, match=r"patient001_frame01.nii.gz: label values \[5\] are outside"):
        read_nnunet(root, progress=False)


def test_bad_contours_and_dicom_are_refused_naming_them(tmp_path):
    root = make_rvsc_tree(tmp_path, patients=(1,), test_patients=())
    contour = root / "TrainingSet" / "patient01" / "P01contours-manual" / "P01-0008-icontour-manual.txt"
    lines = contour.read_text().splitlines()
    contour.write_text("\n".join([*lines[:3], "12.5 oops", *lines[3:]]))
    with pytest.raises(DataError, match=r"P01-0008-icontour-manual.txt: line 4 is not an 'x y' pair of numbers: "
                                        r"'12.5 oops'"):
        read_rvsc(root, progress=False)
    write_contour(contour, np.array([[1.0, 1.0], [300.0, 2.0], [2.0, 9.0]]))
    with pytest.raises(DataError, match=r"P01-0008-icontour-manual.txt: contour points reach x 1.0..300.0"):
        read_rvsc(root, progress=False)
    contour.unlink()
    with pytest.raises(DataError, match=r"P01list.txt: line 3 lists P01-0008-icontour-manual.txt, which is not in"):
        read_rvsc(root, progress=False)
    (root / "TrainingSet" / "patient01" / "P01list.txt").unlink()
    image = root / "TrainingSet" / "patient01" / "P01dicom" / "P01-0000.dcm"
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(DataError, match=r"P01-0000.dcm: not a readable DICOM image"):
        read_rvsc(root, progress=False)
    with pytest.raises(DataError, match=r"no PNNcontours-manual or PNNdicom folders found \(expected the RVSC "
                                        r"layout"):
        read_rvsc(root / "TrainingSet" / "patient01" / "P01dicom", progress=False)


def test_sunnybrook_without_the_series_table_entry_is_refused(tmp_path):
    root = make_sunnybrook_tree(tmp_path, cases=("SC-HF-I-1",))
    for path in (root / "challenge_training" / "SC-HF-I-1").glob("IM-0004-*.dcm"):
        path.rename(path.with_name(path.name.replace("IM-0004", "IM-0999")))
    with pytest.raises(DataError, match=r"SC-HF-I-01: DICOM series \['0001', '0999'\] found .* the table's series "
                                        r"0004 is not among them; cannot tell which series"):
        read_sunnybrook(root, progress=False)
    assert read_contour(next(root.rglob("*-icontour-manual.txt"))).shape[1] == 2


def test_a_task_the_dataset_never_delineates_is_refused(trees, tmp_path):
    with pytest.raises(DataError, match=r"data.task=rv: no slice of this sunnybrook data is annotated for it "
                                        r"\(it delineates myo, lv\); use data.task=lv or myo"):
        load_splits(data_cfg("sunnybrook", trees["sunnybrook"], task="rv", cache_dir=str(tmp_path)), seed=0,
                    progress=False)
    # myocardium: only the slices with an epicardial contour (the ED frames) are training slices
    splits = load_splits(data_cfg("sunnybrook", trees["sunnybrook"], task="myo", cache_dir=str(tmp_path)), seed=0,
                         progress=False)
    assert all(case["phase"] == "ED" for split in splits.values() for case in split.cases)


def test_on_error_skip_leaves_out_the_bad_patient_and_lists_it(tmp_path, capsys):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=4, shape=(16, 16, 2))
    bad = root / "database" / "training" / "patient002" / "patient002_frame01.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match="patient002_frame01.nii.gz: not a readable NIfTI file"):
        load_splits(tiny_acdc(root), seed=0, progress=False)
    for attempt in range(2):  # prepared, then from the cache: the skipped patient is reported both times
        splits = load_splits(tiny_acdc(root, on_error="skip"), seed=0, progress=False)
        assert splits.cache["hit"] == bool(attempt)
        assert [s["patient"] for s in splits.skipped] == ["patient002"]
        assert "not a readable NIfTI" in splits.skipped[0]["error"]
        assert "patient002" not in {c["patient"] for split in splits.values() for c in split.cases}
        assert "warning: skipping patient patient002" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the cache


def test_second_load_comes_from_the_cache_without_opening_an_image(tmp_path):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=5, shape=(20, 18, 2))
    first = load_splits(tiny_acdc(root), seed=0, progress=False)
    assert not first.cache["hit"] and (root / ".seg-cache").is_dir()
    # damage every image but keep its size and mtime: only a cache hit can still load the data
    for path in root.rglob("*.nii.gz"):
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_splits(tiny_acdc(root), seed=0, progress=False)
    assert second.cache["hit"] and second.cache["path"] == first.cache["path"]
    for name in first:
        assert torch.equal(first[name].images, second[name].images)
        assert torch.equal(first[name].labels, second[name].labels) and first[name].cases == second[name].cases
    # task, fold and seed are applied after the cache: still a hit
    again = load_splits(tiny_acdc(root, task="lv", fold=1, num_folds=2, split_seed=3), seed=1, progress=False)
    assert again.cache["hit"]
    # a changed preprocessing setting or a changed file prepares again (and here meets the damaged files)
    with pytest.raises(DataError, match="not a readable NIfTI file"):
        load_splits(tiny_acdc(root, image_size=48), seed=0, progress=False)
    touched = next(root.rglob("*_gt.nii.gz"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="not a readable NIfTI file"):
        load_splits(tiny_acdc(root), seed=0, progress=False)


def test_a_subset_is_served_by_the_cache_of_the_whole_dataset(tmp_path):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=5, shape=(16, 16, 2))
    load_splits(tiny_acdc(root), seed=0, progress=False)
    subset = load_splits(tiny_acdc(root, max_patients=3, val_fraction=0.0, test_fraction=0.3), seed=0,
                         progress=False)
    assert subset.cache["hit"] and len(list((root / ".seg-cache").glob("*.pt"))) == 1
    assert {c["patient"] for s in subset.values() for c in s.cases} == {"patient001", "patient002", "patient003"}


def test_an_unwritable_cache_folder_warns_and_runs_without_cache(tmp_path, capsys):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=3, shape=(16, 16, 2))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    splits = load_splits(tiny_acdc(root, cache_dir=str(blocker / "cache")), seed=0, progress=False)
    assert splits.cache == {"path": None, "hit": False} and len(splits["train"]) > 0
    assert "warning: cannot write the data cache in" in capsys.readouterr().err
    assert not (root / ".seg-cache").exists()



def test_a_shared_cache_folder_keeps_one_cache_per_dataset(tmp_path):
    first = make_acdc_tree(tmp_path / "one", num_patients=3, shape=(16, 16, 2))
    second = make_acdc_tree(tmp_path / "two", num_patients=3, shape=(16, 16, 2), seed=1)
    shared = str(tmp_path / "cache")
    for root in (first, second, first):
        splits = load_splits(tiny_acdc(root, cache_dir=shared), seed=0, progress=False)
    assert splits.cache["hit"] and len(list((tmp_path / "cache").glob("*.pt"))) == 2


# ---------------------------------------------------------------------------- splits


def test_kfold_test_folds_partition_the_patients_deterministically():
    patients = [f"p{i:02d}" for i in range(11)]
    folds = [kfold_split(patients, fold=k, num_folds=3, seed=5, val_fraction=0.1) for k in range(3)]
    tests = [set(f["test"]) for f in folds]
    assert sorted(len(t) for t in tests) == [3, 4, 4] and set().union(*tests) == set(patients)
    for split in folds:
        assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
        assert set(split["train"]) | set(split["val"]) | set(split["test"]) == set(patients) and len(split["val"]) == 1
    assert folds[0] == kfold_split(list(reversed(patients)), fold=0, num_folds=3, seed=5, val_fraction=0.1)
    with pytest.raises(DataError, match=r"data.fold=3 must be between 0 and data.num_folds-1 = 2"):
        kfold_split(patients, fold=3, num_folds=3, seed=0, val_fraction=0.1)


def test_kfold_through_load_splits_records_the_split(trees, tmp_path):
    cfg = data_cfg("mnms", trees["mnms1"], fold=0, num_folds=3, split_seed=7, val_fraction=0.0,
                   cache_dir=str(tmp_path))
    tested = set()
    for fold in range(3):
        splits = load_splits({**cfg, "fold": fold}, seed=fold, progress=False)  # the run seed does not matter
        assert splits.split["mode"] == "kfold" and splits.split["seed"] == 7 and splits.split["fold"] == fold
        assert {c["patient"] for c in splits["test"].cases} == set(splits.split["test"])
        tested |= set(splits.split["test"])
    assert tested == {code for code, *_ in MNMS1_CASES}


def test_split_files_json_csv_nnunet_and_metrics(trees, tmp_path):
    root, cache = trees["mnms1"], str(tmp_path / "cache")
    fixed = {"train": ["A0S9V9", "A1D0Q7", "B3D0N1"], "val": ["B5L2T1"], "test": ["C2L5P7", "C7T2V4_ED"]}
    (tmp_path / "split.json").write_text(json.dumps(fixed))
    splits = load_splits(data_cfg("mnms", root, split_file=str(tmp_path / "split.json"), cache_dir=cache), seed=0,
                         progress=False)
    assert splits.split["test"] == ["C2L5P7", "C7T2V4"] and splits.split["mode"] == "file"
    assert [c["case"] for c in splits["test"].cases] == ["C2L5P7_ED", "C2L5P7_ES", "C7T2V4_ED"]  # a case id: one frame
    # the same split from a run's metrics.json, a CSV and an nnU-Net splits_final.json
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", "split": splits.split}))
    (tmp_path / "split.csv").write_text("patient,split\n" + "".join(f"{p},{name}\n" for name in ("train", "val", "test")
                                                                   for p in splits.split[name]))
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": [], "val": []},
                                                            {"train": fixed["train"], "val": ["C2L5P7", "C7T2V4"]}]))
    for name, extra in (("metrics.json", {}), ("split.csv", {}), ("splits_final.json", {"fold": 1})):
        again = load_splits(data_cfg("mnms", root, split_file=str(tmp_path / name), cache_dir=cache, **extra),
                            seed=9, progress=False)
        assert again.split["test"] == ["C2L5P7", "C7T2V4"] and again.split["train"] == fixed["train"]
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["A0S9V9", "Z9Z9Z9"], "test": ["C2L5P7"]}))
    with pytest.raises(DataError, match=r"bad.json: names 1 patient\(s\) or case\(s\) not in the dataset: Z9Z9Z9"):
        load_splits(data_cfg("mnms", root, split_file=str(tmp_path / "bad.json"), cache_dir=cache), seed=0,
                    progress=False)
    (tmp_path / "twice.json").write_text(json.dumps({"train": ["A0S9V9"], "test": ["A0S9V9", "C2L5P7"]}))
    with pytest.raises(DataError, match=r"twice.json: A0S9V9 \(in test\) is in test, but A0S9V9 \(in train\) put"):
        load_splits(data_cfg("mnms", root, split_file=str(tmp_path / "twice.json"), cache_dir=cache), seed=0,
                    progress=False)


def test_vendor_split_trains_on_some_vendors_and_tests_on_another(trees, tmp_path):
    cfg = data_cfg("mnms", trees["mnms1"], train_vendors=["A", "B"], test_vendors=["C"], cache_dir=str(tmp_path))
    splits = load_splits(cfg, seed=0, progress=False)
    assert {c["vendor"] for c in splits["test"].cases} == {"C"}
    assert {c["vendor"] for name in ("train", "val") for c in splits[name].cases} == {"A", "B"}
    assert splits.split["test_vendors"] == ["C"] and len(splits.split["val"]) == 1
    centres = load_splits(data_cfg("mnms", trees["mnms1"], test_centres=["4"], cache_dir=str(tmp_path)), seed=0,
                          progress=False)
    assert {c["centre"] for c in centres["test"].cases} == {"4"} and centres.split["train_centres"] == ["1", "2", "3"]
    with pytest.raises(DataError, match=r"name \['E'\], which this dataset does not have; its vendors: "
                                        r"\['A', 'B', 'C'\]"):
        load_splits({**cfg, "test_vendors": ["E"]}, seed=0, progress=False)
    with pytest.raises(DataError, match="this dataset records no vendor per patient"):
        load_splits(data_cfg("nnunet", trees["nnunet"], train_vendors=["A"], cache_dir=str(tmp_path)), seed=0,
                    progress=False)


def test_conflicting_split_options_are_refused_by_the_config():
    from conftest import compose_train
    from seg.training.checks import ConfigError, validate

    cfg = compose_train("data=mnms", "data.root=/x", "data.fold=0", "data.train_vendors=[A,B]")
    with pytest.raises(ConfigError, match="choose one way to split, not kfold and vendor"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"data.fold=2 must be between 0 and data.num_folds-1 = 1"):
        validate(compose_train("data.fold=2"))
    validate(compose_train("data=sunnybrook", "data.root=/x", "data.on_error=skip"))


# ---------------------------------------------------------------------------- end to end: train.py on each format


@pytest.mark.slow
def test_train_on_mnms_by_vendor_skipping_a_bad_case(tmp_path):
    root = make_mnms1_tree(tmp_path / "data")
    bad = root / "Training" / "Labeled" / "B3D0N1" / "B3D0N1_sa_gt.nii.gz"
    bad.write_bytes(bad.read_bytes()[:150])
    run_train("experiment=smoke", "data=mnms", f"data.root={root}", "data.max_patients=null", "data.task=multi",
              "data.train_vendors=[A,B]", "data.test_vendors=[C]", "data.on_error=skip", "trainer.progress=false",
              f"hydra.run.dir={tmp_path / 'run'}")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and {"dice_rv", "dice_myo", "dice_lv"} <= set(metrics)
    assert [s["patient"] for s in metrics["skipped_cases"]] == ["B3D0N1"]
    assert metrics["split"]["mode"] == "vendor" and metrics["split"]["test"] == ["C2L5P7", "C7T2V4"]


@pytest.mark.slow
@pytest.mark.parametrize("data_format", ["nnunet", "sunnybrook", "rvsc"])
def test_train_on_each_format(data_format, trees, tmp_path):
    root = {"nnunet": trees["nnunet"], "sunnybrook": trees["sunnybrook"], "rvsc": trees["rvsc"]}[data_format]
    run_train("experiment=smoke", f"data={data_format}", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
              "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and 0 <= metrics["dice"] <= 1
    assert metrics["data_cache"]["path"].startswith(str(tmp_path / "cache"))



# ---------------------------------------------------------------------------- each release as it is distributed


def summary(splits) -> dict[str, tuple[int, int, int]]:
    """{subset: (patients read, skipped as unlabeled, skipped as bad)} from what a run records."""
    return {entry["subset"]: (entry["read"], entry["unlabeled"], entry["bad"])
            for entry in splits.record()["data_summary"]}


def test_mnms1_opendataset_leaves_out_the_unlabeled_subset_by_its_folder(tmp_path, capsys):
    root = make_mnms1_tree(tmp_path)  # Training/Unlabeled holds _sa_gt files; the CSV says ED = ES = 0 for them
    splits = load_splits(data_cfg("mnms", root, val_fraction=0.0, test_fraction=0.3), seed=0, progress=False)
    assert summary(splits) == {"Training/Labeled": (4, 0, 0), "Training/Unlabeled": (0, 2, 0), "Validation": (1, 0, 0),
                               "Testing": (1, 0, 0)}
    patients = {c["patient"] for split in splits.values() for c in split.cases}
    assert patients == {code for code, *_ in MNMS1_CASES}
    out = capsys.readouterr().out
    assert "Data subset Training/Unlabeled: 0 patients read, 2 skipped as unlabeled (" in out
    assert "Data subset Training/Labeled: 4 patients read, 0 skipped as unlabeled, 0 skipped as bad" in out


def test_mnms1_2020_release_reads_the_excel_information_sheet(tmp_path):
    pytest.importorskip("openpyxl")
    root = make_mnms1_2020_tree(tmp_path)  # Training-corrected/{Labeled,Unlabeled} and M&Ms Dataset Information.xlsx
    for data_root in (root, root / "Training-corrected"):
        volumes = read_mnms(data_root, progress=False)
        assert sorted({v.patient for v in volumes}) == sorted(code for code, *_ in MNMS1_CASES[:4])
        by_case = {v.case: v for v in volumes}
        assert by_case["B3D0N1_ED"].meta["vendor"] == "B" and by_case["B3D0N1_ED"].meta["centre"] == "2"
        assert by_case["B3D0N1_ED"].meta["subset"] == "training"
        # ED frame 0, ES frame 2 (from the sheet): the ES cavity is the smaller one
        assert (by_case["B3D0N1_ES"].label == 3).sum() < (by_case["B3D0N1_ED"].label == 3).sum()
    splits = load_splits(data_cfg("mnms", root, val_fraction=0.0, test_fraction=0.25), seed=0, progress=False)
    assert summary(splits) == {"Training-corrected/Labeled": (4, 0, 0), "Training-corrected/Unlabeled": (0, 1, 0)}


def test_the_excel_sheet_without_openpyxl_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("openpyxl")
    root = make_mnms1_2020_tree(tmp_path)
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as if the optional extra were not installed
    with pytest.raises(DataError, match=r"M&Ms Dataset Information.xlsx: reading an Excel sheet needs openpyxl: "
                                        r"pip install openpyxl"):
        read_mnms(root, progress=False)


def test_mnms2_matches_unpadded_codes_and_splits_by_manufacturer(tmp_path):
    root = make_mnms2_tree(tmp_path)  # SUBJECT_CODE 1, 41 ... for folders 001, 041; padding rows at the end
    volumes = {v.case: v for v in read_mnms(root, progress=False)}
    assert volumes["001_ED"].meta["vendor"] == "SIEMENS"
    assert volumes["042_ES"].meta["vendor"] == "Philips Medical Systems"
    assert volumes["160_ED"].meta == {"vendor": "GE MEDICAL SYSTEMS", "scanner": "Signa", "field": "1.5",
                                      "group": "NOR"}
    splits = load_splits(data_cfg("mnms", root, test_vendors=["philips medical systems"], val_fraction=0.0),
                         seed=0, progress=False)
    assert splits.split["test"] == ["002", "042"] and splits.split["test_vendors"] == ["Philips Medical Systems"]
    assert splits.split["train"] == ["001", "003", "041", "160"]
    csv = root / "dataset_information.csv"
    csv.write_text("SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD\n901,NOR,SIEMENS,Avanto,1.5\n,,,,\n")
    with pytest.raises(DataError, match=r"dataset_information.csv: its SUBJECT_CODEs \(901\) match none of the "
                                        r"6 cases"):
        read_mnms(root, progress=False)


def test_acdc_2017_release_skips_the_testing_patients_as_unlabeled(tmp_path):
    root = make_acdc_2017_tree(tmp_path)  # ACDC/training and ACDC/testing/testing (no _gt)
    splits = load_splits(data_cfg("acdc", root, val_fraction=0.0, test_fraction=0.25), seed=0, progress=False)
    assert summary(splits) == {"training": (4, 0, 0), "testing/testing": (0, 2, 0)}
    assert {c["patient"] for s in splits.values() for c in s.cases} == {f"patient{i:03d}" for i in range(1, 5)}
    # a labelled folder missing one of its two _gt files is still an error, naming the file
    next((root / "training" / "patient002").glob("*_frame*_gt.nii.gz")).unlink()
    with pytest.raises(DataError, match=r"patient002_frame\d\d_gt.nii.gz: file not found \(patient002 has ground "
                                        r"truth for one of its two frames\)"):
        load_splits(data_cfg("acdc", root, cache=False), seed=0, progress=False)


def test_nnunet_v1_and_v2_mnms_conversions_group_cases_into_patients(tmp_path):
    # as nnU-Net v1 keeps it: nnUNet_raw_data_base/nnUNet_raw_data/Task114_heart_mnms (modality, inverted labels)
    base = tmp_path / "nnUNet_raw_data_base"
    v1 = make_nnunet_mnms_tree(base / "nnUNet_raw_data", version=1)  # A0S9V9_0000_A_1 ...
    assert len(read_nnunet(base, progress=False)) == 2 * len(MNMS1_CASES)  # data.root may be the base folder
    volumes = read_nnunet(v1, progress=False)
    assert sorted({v.patient for v in volumes}) == sorted(code for code, *_ in MNMS1_CASES)
    first = volumes[0]
    assert (first.patient, first.case, first.meta) == ("A0S9V9", "A0S9V9_0000_A_1", {"vendor": "A", "centre": "1"})
    assert set(first.label[:, 16, 13].tolist()) == {3}  # LVBP (1) -> the project's LV (3)
    v2 = make_nnunet_mnms_tree(tmp_path / "v2", version=2)  # A0S9V9_frame00 ...
    assert sorted({v.patient for v in read_nnunet(v2, progress=False)}) == sorted(code for code, *_ in MNMS1_CASES)


def test_patient_regex_groups_cases_by_the_users_rule(tmp_path):
    root = make_nnunet_mnms_tree(tmp_path, version=1)
    for path in root.rglob("*.nii.gz"):  # a naming no conversion script uses
        code, time, vendor, centre, *channel = path.name[: -len(".nii.gz")].split("_")
        path.rename(path.with_name(f"case-{code}-t{time}.{vendor}{centre}{''.join('_' + c for c in channel)}.nii.gz"))
    ids = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir())
    assert ids[0] == "case-A0S9V9-t0000.A1"
    assert len({v.patient for v in read_nnunet(root, progress=False)}) == 12  # not grouped by any known scheme
    regex = r"case-(?P<patient>[A-Z0-9]+)-t(?P<phase>\d+)\.(?P<vendor>[A-Z])\d"
    volumes = read_nnunet(root, patient_regex=regex, progress=False)
    assert sorted({v.patient for v in volumes}) == sorted(code for code, *_ in MNMS1_CASES)
    assert volumes[0].meta == {"vendor": "A"} and volumes[0].case == "case-A0S9V9-t0000.A1"
    with pytest.raises(DataError, match=r"data.patient_regex='case-\(\?P<patient>\[0-9\]\+\)': case "
                                        r"case-A0S9V9-t0000.A1 does not match it"):
        read_nnunet(root, patient_regex=r"case-(?P<patient>[0-9]+)", progress=False)


SPLIT_MODES = {"random": {}, "kfold0": {"fold": 0, "num_folds": 3}, "kfold1": {"fold": 1, "num_folds": 3},
               "kfold2": {"fold": 2, "num_folds": 3}, "vendor": {"test_vendors": ["C"]},
               "centre": {"train_centres": ["1", "2", "3"]}, "file": {"split_file": "splits_final.json", "fold": 0}}


@pytest.mark.parametrize("mode, version", [(mode, version) for version in (1, 2) for mode in SPLIT_MODES
                                           if version == 1 or mode not in ("vendor", "centre")])  # v2 ids: no vendor
def test_no_patient_is_on_two_sides_of_any_split(mode, version, tmp_path):
    root = make_nnunet_mnms_tree(tmp_path, version=version)
    options = dict(SPLIT_MODES[mode])
    if mode == "file":  # nnU-Net's splits_final.json: case ids, each patient's frames on one side
        ids = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir())
        test = [i for i in ids if i[:6] in ("C2L5P7", "B5L2T1")]
        (tmp_path / "splits_final.json").write_text(json.dumps([{"train": [i for i in ids if i not in test],
                                                                  "val": test}]))
        options["split_file"] = str(tmp_path / "splits_final.json")
    splits = load_splits(data_cfg("nnunet", root, val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c"),
                                  **options), seed=3, progress=False)
    sides = {name: {case["case"][:6] for case in split.cases} for name, split in splits.items()}  # the M&Ms code
    assert sum(len(s) for s in sides.values()) == len(set().union(*sides.values())) == len(MNMS1_CASES), sides
    assert set(splits.split["train"]) == sides["train"]


def test_a_split_file_that_separates_a_patients_frames_is_refused(tmp_path):
    root = make_nnunet_mnms_tree(tmp_path, version=1)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir())
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ids[1:], "val": ids[:1]}]))  # nnU-Net's own
    with pytest.raises(DataError, match=r"splits_final.json: the cases of 1 patient\(s\) lie in different splits "
                                        r"\(A0S9V9: train, test\)"):
        load_splits(data_cfg("nnunet", root, split_file=str(tmp_path / "splits_final.json")), seed=0, progress=False)


def test_sunnybrook_sc_n_06_is_read_from_series_0984(tmp_path):
    root = make_sunnybrook_tree(tmp_path, cases=("SC-N-6",))  # series 0981 (another cine) and 0984 side by side
    volumes = read_sunnybrook(root, progress=False)
    assert [v.case for v in volumes] == ["SC-N-06_ED", "SC-N-06_ES"]
    assert all(v.image.max() > 900 for v in volumes)  # the contoured cine, not the all-zero 0981
    assert "IM-0984-" in volumes[0].source


def test_sunnybrook_cardiac_atlas_prefers_the_cinesax_series_description(tmp_path, capsys):
    # SC-HF-I-01's CINELAX series is named IM-0004-NNNN, the challenge table's prefix for that case;
    # SC-HF-I-02 has two CINESAX series, one of them a short repeat without the contoured images
    root = make_sunnybrook_tree(tmp_path, layout="cap", second_cinesax=("SC-HF-I-2",))
    volumes = read_sunnybrook(root, progress=False)
    assert len(volumes) == 6 and all(v.image.max() > 900 for v in volumes)
    assert all(f"{os.sep}CINESAX_300{os.sep}" in v.source for v in volumes)
    out = capsys.readouterr().out
    assert "SC-HF-I-02: two CINESAX series; using CINESAX_300 (it holds every contoured image" in out


def test_rvsc_slice_step_comes_from_slice_location_and_test_sets_are_unlabeled(tmp_path):
    root = make_rvsc_tree(tmp_path)  # SliceThickness 7 mm, SliceLocation 8.4 mm apart; Test2Set without contours
    volumes = read_rvsc(root, progress=False)
    assert {v.patient for v in volumes} == {"P01", "P02", "P03", "P17"}
    assert all(v.spacing[2] == pytest.approx(RVSC_STEP) for v in volumes)
    splits = load_splits(data_cfg("rvsc", root, task="rv", val_fraction=0.0, test_fraction=0.25), seed=0,
                         progress=False)
    assert summary(splits) == {"TrainingSet": (3, 0, 0), "Test1Set": (1, 0, 0), "Test2Set": (0, 1, 0)}
    with pytest.raises(DataError, match=r"Test2Set: no labelled patient \(1 found without ground truth"):
        read_rvsc(root / "Test2Set", progress=False)


def test_a_killed_runs_cache_temporary_is_removed_and_a_live_ones_kept(tmp_path, capsys):
    import subprocess

    from seg.runtime.temporaries import host_name

    root = make_acdc_tree(tmp_path / "acdc", num_patients=3, shape=(16, 16, 2))
    load_splits(tiny_acdc(root), seed=0, progress=False)
    folder = root / ".seg-cache"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # the pid of a process that has ended
    dead = folder / f".acdc-0123456789ab-0123456789ab.pt.tmp-{host_name()}-{gone}-0badc0de"
    alive = folder / f".acdc-0123456789ab-0123456789ab.pt.tmp-{host_name()}-{os.getpid()}-0badc0de"
    elsewhere = folder / f".acdc-0123456789ab-0123456789ab.pt.tmp-another-host-{gone}-0badc0de"
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"half a cache")
    load_splits(tiny_acdc(root), seed=0, progress=False)
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert f"Removed {dead}: a temporary left by process {gone}, which is gone" in capsys.readouterr().out
