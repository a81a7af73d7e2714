"""The built-in phantom generator: ACDC layout, determinism, anatomy, vendors, atomic writing.

Real files are generated in temporary folders: four patients (one per vendor, since vendors are
balanced in blocks of four), plus a few small generations to compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg.data import phantom
from seg.data.phantom import GROUPS, VENDORS, generate_phantom

NUM_PATIENTS = 4


def patient_dirs(root: Path) -> list[Path]:
    return sorted((root / "database" / "training").iterdir())


def read_info(folder: Path) -> dict[str, str]:
    info = {}
    for line in (folder / "Info.cfg").read_text().splitlines():
        key, sep, value = line.partition(": ")
        assert sep, f"{folder.name}/Info.cfg: not a 'key: value' line: {line!r}"
        info[key] = value
    return info


def frame_paths(folder: Path, phase: str) -> tuple[Path, Path]:
    stem = f"{folder.name}_frame{int(read_info(folder)[phase]):02d}"
    return folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def volumes(root: Path):
    """(folder, phase, image, label, image nifti, label nifti) for every ED and ES frame."""
    for folder in patient_dirs(root):
        for phase in ("ED", "ES"):
            image_path, label_path = frame_paths(folder, phase)
            image_nii, label_nii = nib.load(str(image_path)), nib.load(str(label_path))
            yield folder, phase, np.asarray(image_nii.dataobj), np.asarray(label_nii.dataobj), image_nii, label_nii


def all_arrays(root: Path, patients: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every NIfTI array of the tree (optionally only some patients), by relative path."""
    return {str(path.relative_to(root)): load(path) for path in sorted(root.rglob("*.nii.gz"))
            if patients is None or path.parent.name in patients}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "phantom-n4-seed0"
    assert generate_phantom(root, num_patients=NUM_PATIENTS, seed=0, progress=False) == root
    return root


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

def test_acdc_layout_and_names(tree):
    folders = patient_dirs(tree)
    assert [f.name for f in folders] == [f"patient{i:03d}" for i in range(1, NUM_PATIENTS + 1)]
    for folder in folders:
        info = read_info(folder)
        assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight", "Vendor"]
        ed, es, nb_frame = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert ed == 1 and ed < es <= nb_frame
        assert info["Group"] in GROUPS and info["Vendor"] in VENDORS
        assert 140 <= float(info["Height"]) <= 210 and 30 <= float(info["Weight"]) <= 160
        expected = {"Info.cfg", f"{folder.name}_4d.nii.gz"}
        for frame in (ed, es):
            expected |= {f"{folder.name}_frame{frame:02d}.nii.gz", f"{folder.name}_frame{frame:02d}_gt.nii.gz"}
        assert {p.name for p in folder.iterdir()} == expected


def test_cine_is_4d_and_starts_at_ed_ends_at_es(tree):
    for folder in patient_dirs(tree):
        cine = nib.load(str(folder / f"{folder.name}_4d.nii.gz"))
        data = np.asarray(cine.dataobj)
        assert data.ndim == 4 and 2 <= data.shape[3] <= 8
        ed, es = (load(frame_paths(folder, phase)[0]) for phase in ("ED", "ES"))
        assert data.shape[:3] == ed.shape
        np.testing.assert_array_equal(data[..., 0], ed)
        np.testing.assert_array_equal(data[..., -1], es)
        assert len(cine.header.get_zooms()) == 4


def test_completion_marker_and_no_leftovers(tree):
    assert json.loads((tree / "phantom.json").read_text()) == {
        "generator_version": 1, "num_patients": NUM_PATIENTS, "seed": 0}
    assert [p.name for p in tree.parent.iterdir()] == [tree.name]  # the temporary folder is gone


def test_nifti_headers(tree):
    for folder, phase, image, label, image_nii, label_nii in volumes(tree):
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.ndim == 3 and image.shape == label.shape
        np.testing.assert_array_equal(image_nii.affine, label_nii.affine)
        sx, sy, sz = (float(z) for z in image_nii.header.get_zooms())
        assert sx == sy and 1.2 <= sx <= 1.9, (folder.name, sx)
        assert 5.0 <= sz <= 10.0, (folder.name, sz)
        np.testing.assert_allclose(np.diag(image_nii.affine)[:3], (sx, sy, sz), rtol=1e-6)
        assert image_nii.header.get_xyzt_units()[0] == "mm"
        assert label_nii.header.get_zooms() == image_nii.header.get_zooms()
        assert all(192 <= n <= 320 for n in image.shape[:2]) and 6 <= image.shape[2] <= 12


def test_matrix_sizes_and_spacings_vary(tree):
    shapes = {image.shape[:2] for _, _, image, *_ in volumes(tree)}
    spacings = {float(nii.header.get_zooms()[0]) for *_, nii, _ in volumes(tree)}
    assert len(shapes) > 1 and len(spacings) > 1
    assert any(nx != ny for nx, ny in shapes)  # not only square matrices


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_same_seed_gives_identical_trees(tree, tmp_path):
    again = generate_phantom(tmp_path / "again", num_patients=NUM_PATIENTS, seed=0, progress=False)
    assert_same_arrays(all_arrays(tree), all_arrays(again))
    for folder in patient_dirs(tree):
        assert (folder / "Info.cfg").read_text() == (again / folder.relative_to(tree) / "Info.cfg").read_text()


def test_a_patient_does_not_depend_on_the_number_of_patients(tree, tmp_path):
    fewer = generate_phantom(tmp_path / "fewer", num_patients=2, seed=0, progress=False)
    assert [f.name for f in patient_dirs(fewer)] == ["patient001", "patient002"]
    assert_same_arrays(all_arrays(tree, ["patient001", "patient002"]), all_arrays(fewer))


def test_another_seed_gives_other_volumes(tree, tmp_path):
    other = generate_phantom(tmp_path / "other", num_patients=2, seed=1, progress=False)
    mine, theirs = all_arrays(tree, ["patient001", "patient002"]), all_arrays(other)
    for name in set(mine) & set(theirs):
        assert mine[name].shape != theirs[name].shape or not np.array_equal(mine[name], theirs[name]), name


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------

def test_labels_are_acdc_classes_with_lv_and_myocardium_everywhere(tree):
    for folder, phase, image, label, *_ in volumes(tree):
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
        assert (label == 3).any() and (label == 2).any(), (folder.name, phase)


def test_rv_vanishes_before_the_apex_and_is_present_at_the_base(tree):
    apical_without_rv = 0
    for folder, phase, image, label, *_ in volumes(tree):
        assert (label[..., 0] == 1).any(), f"{folder.name} {phase}: no RV in the basal slice"
        apical_without_rv += not (label[..., -1] == 1).any()
        # apex is the last slice: the LV there is no larger than at the base
        assert (label[..., -1] >= 2).sum() < (label[..., 0] >= 2).sum()
    assert apical_without_rv > 0


def test_es_cavity_smaller_and_wall_thicker_than_ed(tree):
    for folder in patient_dirs(tree):
        (ed_label, es_label) = (load(frame_paths(folder, phase)[1]) for phase in ("ED", "ES"))
        assert (es_label == 3).sum() < (ed_label == 3).sum(), folder.name
        assert (es_label == 1).sum() < (ed_label == 1).sum(), folder.name
        # myocardial area grows relative to the cavity: a thicker wall
        assert (es_label == 2).sum() / (es_label == 3).sum() > (ed_label == 2).sum() / (ed_label == 3).sum()


def test_blood_is_brighter_than_myocardium(tree):
    for folder, phase, image, label, *_ in volumes(tree):
        image = image.astype(np.float64)
        lv, myo, rv = image[label == 3].mean(), image[label == 2].mean(), image[label == 1].mean()
        assert lv > 1.5 * myo and rv > 1.5 * myo, (folder.name, phase, lv, myo, rv)


def test_vendors_differ_in_intensity_scale(tree):
    blood = {}
    for folder, phase, image, label, *_ in volumes(tree):
        if phase == "ED":
            blood[read_info(folder)["Vendor"]] = float(image[label == 3].mean())
    assert sorted(blood) == sorted(VENDORS)  # four patients: one of each vendor
    levels = sorted(blood.values())
    assert all(high > 1.3 * low for low, high in zip(levels, levels[1:])), blood


# ---------------------------------------------------------------------------------------------
# Writing: progress bar, atomicity, arguments
# ---------------------------------------------------------------------------------------------

def test_progress_bar(tmp_path, capsys):
    generate_phantom(tmp_path / "one", num_patients=1, seed=3, progress=True)
    assert "Generating phantom" in capsys.readouterr().err


def test_an_existing_complete_tree_is_kept(tmp_path):
    root = tmp_path / "phantom"
    root.mkdir()
    (root / "phantom.json").write_text("{}")  # someone else finished first
    assert generate_phantom(root, num_patients=1, seed=0, progress=False) == root
    assert [p.name for p in root.iterdir()] == ["phantom.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]


def test_an_existing_empty_folder_is_filled(tmp_path):
    root = tmp_path / "phantom"
    root.mkdir()
    generate_phantom(root, num_patients=1, seed=0, progress=False)
    assert (root / "phantom.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]


def test_an_unrelated_folder_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "phantom"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete phantom"):
        generate_phantom(root, num_patients=1, seed=0, progress=False)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]


def test_an_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = phantom._write_patient

    def fail_on_second(training, index, seed):
        if index == 2:
            raise KeyboardInterrupt
        real(training, index, seed)

    monkeypatch.setattr(phantom, "_write_patient", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_phantom(tmp_path / "phantom", num_patients=3, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"num_patients": 0}, {"num_patients": 2.5}, {"seed": -1}, {"seed": "0"}])
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_phantom(tmp_path / "phantom", **{"num_patients": 1, "seed": 0, **kwargs}, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# A generator killed by SIGTERM: its temporary is removed by the next run, a live one's never
# ---------------------------------------------------------------------------------------------

GENERATE = ("import sys; from pathlib import Path; from seg.data import ensure_phantom; "
            "ensure_phantom(Path(sys.argv[1]), int(sys.argv[2]), 0, progress=False)")


def start_generator(root: Path, num_patients: int):
    """A real ``ensure_phantom`` in its own process; returns it once its temporary folder holds a patient."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", GENERATE, str(root), str(num_patients)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):  # up to 2 minutes on a busy machine
        found = [t for t in root.parent.glob(f"{root.name}.tmp-*-{process.pid}-*")
                 if any((t / "database" / "training").glob("patient*/*_gt.nii.gz"))]
        if found:
            return process, found[0]
        if process.poll() is not None:
            raise AssertionError(f"the generator ended first: {process.stderr.read().decode()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the generator wrote no patient in 2 minutes")


@pytest.mark.slow
def test_a_generator_killed_by_sigterm_leaves_a_temporary_the_next_run_removes(tmp_path, capsys):
    import signal

    from seg.data import ensure_phantom

    killed_root, live_root = tmp_path / "phantom-n300-seed0", tmp_path / "phantom-n301-seed0"
    killed, killed_tmp = start_generator(killed_root, 300)
    killed.send_signal(signal.SIGTERM)  # Slurm's preemption, scancel, kill
    assert killed.wait(timeout=60) == -signal.SIGTERM
    assert killed_tmp.is_dir() and not killed_root.exists()  # what a killed generator leaves
    ensure_phantom(killed_root, 1, 0, progress=False)  # the next run
    assert (killed_root / "phantom.json").is_file() and not killed_tmp.exists()
    assert f"Removed {killed_tmp}: a temporary left by process {killed.pid}, which is gone" in capsys.readouterr().out

    live, live_tmp = start_generator(live_root, 301)
    live.send_signal(signal.SIGSTOP)  # alive, mid-generation, while another run starts beside it
    try:
        ensure_phantom(tmp_path / "phantom-n2-seed0", 1, 0, progress=False)
        assert live_tmp.is_dir()  # the running generator's folder is untouched
        assert "Removed" not in capsys.readouterr().out
    finally:
        live.send_signal(signal.SIGKILL)
        live.send_signal(signal.SIGCONT)
        live.wait(timeout=60)
    assert live_tmp.is_dir()  # killed now: removed by the next run, of any phantom configuration
    ensure_phantom(tmp_path / "phantom-n3-seed0", 1, 0, progress=False)
    assert not live_tmp.exists() and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
