"""Cardiac evaluation (seg/evaluation/surface.py, cardiac.py, agreement.py, report.py, per_volume.py): masks of
known geometry against hand-computed values and MONAI, the agreement statistics against scipy, seg-evaluate on
ACDC- and M&Ms-layout trees, the trainer's per-volume figures and the study's EF/HD95 comparison.

Tolerances, stated: a voxelized ellipsoid's volume is within 1.5% of 4/3 pi abc (at >= 12 voxels per semi-axis);
EF within 1 percentage point and mass within 2% of the analytic values; HD of two spheres shifted by d is d
(exact: the shift is a whole number of voxels); HD95 and ASSD within half the largest voxel side of the
continuous-surface values (the voxel surfaces are staircases); our distances equal MONAI's to 1e-4 mm.
"""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from acdc_tree import make_acdc_tree, write_volume
from dataset_trees import PROJECT_TO_MNMS, make_mnms2_tree
from seg.data.slices import SliceSet
from seg.evaluation.agreement import agreement
from seg.evaluation.cardiac import MYOCARDIAL_DENSITY, clinical_indices, ejection_fraction, volume_ml
from seg.evaluation.per_volume import per_volume_figures, summary
from seg.evaluation.scores import geometry_scores
from seg.evaluation.surface import surface_distances
from seg.tools.evaluate import main as evaluate_main

SPACING = (2.5, 1.0, 1.25)  # anisotropic, mm: a thick first axis (as slices are)


def grid(shape=(40, 80, 64), spacing=SPACING):
    """The coordinates (mm) of the voxel centres, centred on the grid."""
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij")


def ellipsoid(semi_axes, centre=(0.0, 0.0, 0.0)):
    z, y, x = grid()
    return sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), centre, semi_axes)) <= 1.0


def analytic_volume_ml(semi_axes) -> float:
    return 4 / 3 * math.pi * np.prod(semi_axes) / 1000


# ---------------------------------------------------------------------------- volumes, EF, mass


@pytest.mark.parametrize("semi_axes", [(30.0, 25.0, 20.0), (20.0, 30.0, 25.0), (45.0, 20.0, 18.0)])
def test_ellipsoid_volume_in_ml_with_anisotropic_spacing(semi_axes):
    mask = ellipsoid(semi_axes)
    assert volume_ml(mask, SPACING) == pytest.approx(analytic_volume_ml(semi_axes), rel=0.015)
    # the same voxels read with an isotropic spacing would be wrong by the ratio of voxel volumes
    assert volume_ml(mask, (1.0, 1.0, 1.0)) == pytest.approx(volume_ml(mask, SPACING) / np.prod(SPACING))


def test_ejection_fraction_and_mass_of_ellipsoids():
    """LV cavity: an ellipsoid at ED, a smaller one at ES; myocardium: the shell 6 mm around the ED cavity."""
    ed_lv, es_lv, epi = (30.0, 22.0, 20.0), (24.0, 17.0, 15.0), (36.0, 28.0, 26.0)
    ed_rv, es_rv = (25.0, 12.0, 14.0), (21.0, 10.0, 11.0)
    rv_centre = (0.0, 25.0, 0.0)  # beside the LV: its part outside the epicardium is the RV

    def labels(lv, rv, with_myo):
        label = np.zeros(grid()[0].shape, np.uint8)
        label[ellipsoid(rv, rv_centre) & ~ellipsoid(epi)] = 1  # rv beside the heart (its part outside the epi)
        if with_myo:
            label[ellipsoid(epi)] = 2
        label[ellipsoid(lv)] = 3
        return label

    classes = {"rv": 1, "myo": 2, "lv": 3}
    rows = []
    for phase, lv, rv in (("ED", ed_lv, ed_rv), ("ES", es_lv, es_rv)):
        truth = labels(lv, rv, with_myo=True)
        scores = geometry_scores(truth, truth, classes, SPACING, distances=False)
        rows.append({"case": f"p1_{phase}", "patient": "p1", "phase": phase,
                     **{f"vol_{s}_{c}": scores[f"vol_{s}"][c] for s in ("pred", "true") for c in classes}})
    (patient,) = clinical_indices(rows, list(classes))
    edv, esv = analytic_volume_ml(ed_lv), analytic_volume_ml(es_lv)
    assert patient["lv_edv_true"] == pytest.approx(edv, rel=0.015)
    assert patient["lv_esv_true"] == pytest.approx(esv, rel=0.015)
    assert patient["lv_ef_true"] == pytest.approx((edv - esv) / edv * 100, abs=1.0)
    assert patient["lv_sv_true"] == pytest.approx(patient["lv_edv_true"] - patient["lv_esv_true"])
    mass = MYOCARDIAL_DENSITY * (analytic_volume_ml(epi) - edv)
    assert patient["lv_mass_true"] == pytest.approx(mass, rel=0.02)
    assert patient["lv_ef_error"] == 0.0 and patient["rv_ef_error"] == 0.0  # prediction = truth here
    assert 0 < patient["rv_ef_true"] < 100


def test_empty_structure_conventions():
    empty, blob = np.zeros((4, 10, 10), bool), np.zeros((4, 10, 10), bool)
    blob[1:3, 2:6, 2:6] = True
    assert all(math.isnan(v) for v in surface_distances(empty, empty, (8, 1.5, 1.5)).values())  # both empty
    assert all(math.isnan(v) for v in surface_distances(blob, empty, (8, 1.5, 1.5)).values())  # one empty
    assert all(math.isnan(v) for v in surface_distances(empty, blob, (8, 1.5, 1.5)).values())
    assert volume_ml(empty, (8, 1.5, 1.5)) == 0.0  # an empty structure has a volume: 0 ml
    assert math.isnan(ejection_fraction(0.0, 0.0))  # an empty ED cavity: no EF
    # a patient without its ES volume: EDV only, no ESV, SV or EF
    (patient,) = clinical_indices([{"case": "a", "patient": "a", "phase": "ED", "vol_pred_lv": 10.0,
                                    "vol_true_lv": 12.0}], ["lv"])
    assert patient["lv_edv_error"] == -2.0 and math.isnan(patient["lv_esv_true"]) and math.isnan(patient["lv_ef_true"])
    assert "rv_edv_true" not in patient and "lv_mass_true" not in patient  # a task without them has none
    with pytest.raises(ValueError, match="two ED volumes"):
        clinical_indices([{"case": c, "patient": "a", "phase": "ED"} for c in ("a1", "a2")], ["lv"])


# ---------------------------------------------------------------------------- distances


def test_distances_of_shifted_spheres_against_hand_computed_values_and_monai():
    pytest.importorskip("scipy")  # MONAI's surface distances need it
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    radius, shift = 25.0, 5.0  # shifted along the thick axis by 2 voxels of 2.5 mm
    truth, prediction = ellipsoid((radius,) * 3), ellipsoid((radius,) * 3, centre=(shift, 0.0, 0.0))
    found = surface_distances(prediction, truth, SPACING)

    # continuous spheres: a point at angle theta on one lies |sqrt(r^2 + d^2 - 2 r d cos theta) - r| from the other;
    # over the sphere's area cos theta is uniform on [-1, 1]
    u = np.linspace(-1, 1, 400_001)
    distance = np.abs(np.sqrt(radius**2 + shift**2 - 2 * radius * shift * u) - radius)
    assert found["hd"] == pytest.approx(shift, abs=1e-6)
    assert found["hd95"] == pytest.approx(np.quantile(distance, 0.95), abs=max(SPACING) / 2)
    assert found["assd"] == pytest.approx(distance.mean(), abs=max(SPACING) / 2)

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask]))[None].float()

    p, g = one_hot(prediction), one_hot(truth)
    assert found["hd"] == pytest.approx(float(compute_hausdorff_distance(p, g, spacing=SPACING)), abs=1e-4)
    assert found["hd95"] == pytest.approx(float(compute_hausdorff_distance(p, g, percentile=95, spacing=SPACING)),
                                          abs=1e-4)
    assert found["assd"] == pytest.approx(float(compute_average_surface_distance(p, g, symmetric=True,
                                                                                 spacing=SPACING)), abs=1e-4)
    # the spacing matters: the same voxels at 1 mm isotropic are 2 voxels = 2 mm apart
    assert surface_distances(prediction, truth, (1.0, 1.0, 1.0))["hd"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------- agreement


def test_agreement_statistics_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    true = rng.uniform(40, 200, 30)
    predicted = true * 0.95 + rng.normal(3, 6, 30)
    found = agreement(list(predicted) + [None, 5.0], list(true) + [1.0, math.nan])  # pairs with a gap are left out
    d = predicted - true
    assert found.n == 30
    assert found.r == pytest.approx(stats.pearsonr(predicted, true)[0], abs=1e-12)
    assert found.bias == pytest.approx(np.mean(d)) and found.sd == pytest.approx(stats.tstd(d))
    assert (found.loa_low, found.loa_high) == pytest.approx((np.mean(d) - 1.96 * stats.tstd(d),
                                                             np.mean(d) + 1.96 * stats.tstd(d)))
    assert found.mae == pytest.approx(np.mean(np.abs(d)))
    one = agreement([1.0], [2.0])
    assert one.n == 1 and one.bias == -1.0 and math.isnan(one.sd) and math.isnan(one.r)


# ---------------------------------------------------------------------------- seg-evaluate on dataset trees


def shrunk(label: np.ndarray, value: int) -> np.ndarray:
    """``label`` with structure ``value`` losing its first row of voxels along x (a smaller prediction)."""
    out = label.copy()
    mask = out == value
    first = np.argmax(mask.any(axis=(1, 2)))
    out[first][out[first] == value] = 0
    return out


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_on_an_acdc_tree_writes_phases_indices_agreement_and_plot(tmp_path, capsys):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=4)
    for number, info in enumerate(sorted(root.rglob("Info.cfg"))):  # the phantom's Vendor line
        info.write_text(info.read_text() + f"Vendor: {'AB'[number % 2]}\n")
    pred = tmp_path / "pred"
    pred.mkdir()
    for truth in sorted(root.rglob("*_gt.nii.gz")):
        label = np.asarray(nib.load(str(truth)).dataobj).astype(np.uint8)
        es = truth.name != f"{truth.parent.name}_frame01_gt.nii.gz"
        write_volume(pred / truth.name.replace("_gt", ""), shrunk(label, 3) if es else label, (1.5, 1.5, 8.0),
                     np.uint8)

    assert evaluate_main([f"pred={pred}", f"gt={root}", "labels=rv:1,myo:2,lv:3"]) == 0
    printed = capsys.readouterr().out
    assert "## Per phase and structure" in printed and "## Agreement of the clinical indices" in printed

    cases = read_csv(pred / "evaluation.csv")
    assert [c["phase"] for c in cases[:-1]] == ["ED", "ES"] * 4 and cases[0]["vendor"] == "A"
    assert float(cases[0]["vol_error_lv"]) == 0.0 and float(cases[1]["vol_error_lv"]) < 0  # ES LV predicted small
    phases = read_csv(pred / "evaluation_phases.csv")
    assert {(r["vendor"], r["phase"], r["structure"]) for r in phases} >= {("all", "ED", "lv"), ("A", "ES", "rv")}
    clinical = read_csv(pred / "evaluation_clinical.csv")
    assert [r["patient"] for r in clinical] == [f"patient{p:03d}" for p in range(1, 5)]
    for row in clinical:  # ESV too small -> EF too high; EDV exact
        assert float(row["lv_edv_error"]) == 0.0 and float(row["lv_esv_error"]) < 0 < float(row["lv_ef_error"])
        true_ef = (float(row["lv_edv_true"]) - float(row["lv_esv_true"])) / float(row["lv_edv_true"]) * 100
        assert float(row["lv_ef_true"]) == pytest.approx(true_ef)
    agreement_rows = read_csv(pred / "evaluation_agreement.csv")
    lv_ef = next(r for r in agreement_rows if r["index"] == "lv_ef" and r["vendor"] == "all")
    errors = [float(r["lv_ef_error"]) for r in clinical]
    assert int(lv_ef["n"]) == 4 and float(lv_ef["bias"]) == pytest.approx(np.mean(errors))
    assert "## Per vendor, phase and structure" in (pred / "evaluation.md").read_text()
    pytest.importorskip("matplotlib")
    assert (pred / "evaluation_bland_altman.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_on_an_mnms2_tree_reads_phases_from_names_and_vendors_from_the_sheet(tmp_path, capsys):
    dataset = make_mnms2_tree(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for truth in sorted(dataset.rglob("*_SA_E?_gt.nii.gz")):
        write_volume(pred / truth.name.replace("_gt", ""), np.asarray(nib.load(str(truth)).dataobj), (1.3, 1.3, 10.0),
                     np.uint8)
    mnms = {name: int(np.flatnonzero(PROJECT_TO_MNMS == value)[0]) for name, value in (("lv", 3), ("myo", 2),
                                                                                        ("rv", 1))}
    labels = ",".join(f"{name}:{int(PROJECT_TO_MNMS[value])}" for name, value in mnms.items())
    assert evaluate_main([f"pred={pred}", f"gt={dataset}", f"labels={labels}"]) == 0
    capsys.readouterr()
    cases = read_csv(pred / "evaluation.csv")[:-1]
    assert {(c["patient"], c["phase"]) for c in cases} >= {("001", "ED"), ("001", "ES"), ("160", "ES")}
    assert {c["vendor"] for c in cases} == {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    clinical = read_csv(pred / "evaluation_clinical.csv")
    assert len(clinical) == 6 and all(float(r["lv_ef_error"]) == 0.0 for r in clinical)
    assert {r["vendor"] for r in read_csv(pred / "evaluation_agreement.csv")} == {
        "all", "SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}


def test_evaluate_refuses_to_replace_a_table_beside_the_csv(tmp_path, capsys):
    root = make_acdc_tree(tmp_path / "acdc", num_patients=1)
    pred = tmp_path / "pred"
    pred.mkdir()
    for truth in root.rglob("*_gt.nii.gz"):
        write_volume(pred / truth.name.replace("_gt", ""), np.asarray(nib.load(str(truth)).dataobj), dtype=np.uint8)
    (pred / "evaluation_clinical.csv").write_text("someone's table\n")
    assert evaluate_main([f"pred={pred}", f"gt={root}"]) == 1
    assert capsys.readouterr().err.startswith(f"error: out={pred / 'evaluation.csv'}: {pred / 'evaluation_clinical.csv'}"
                                              " exists (pass overwrite=true")
    assert (pred / "evaluation_clinical.csv").read_text() == "someone's table\n"
    assert not (pred / "evaluation.csv").exists()


# ---------------------------------------------------------------------------- the trainer's figures


def test_trainer_per_volume_figures_use_the_grid_spacing():
    """Two volumes of one patient (ED, ES) as the trainer holds them: slices of a resampled grid."""
    lv = np.zeros((3, 32, 32), np.uint8)
    lv[:, 8:20, 8:20] = 1  # 12 x 12 px on 3 slices
    es = np.zeros_like(lv)
    es[:, 10:18, 10:18] = 1
    shifted = np.roll(lv, 2, axis=1)
    labels = torch.from_numpy(np.concatenate([lv, es]))
    prediction = torch.from_numpy(np.concatenate([shifted, es]))
    cases = [{"case": f"p_{phase}", "patient": "p", "phase": phase, "vendor": "B", "spacing": [1.2, 1.2, 10.0],
              "grid_spacing": [1.5, 1.5, 10.0]} for phase in ("ED", "ES")]
    slices = SliceSet(torch.zeros(6, 1, 32, 32), labels, torch.tensor([0, 0, 0, 1, 1, 1]), cases)
    rows = per_volume_figures(prediction, slices, 2, ["lv"])
    voxel_ml = 1.5 * 1.5 * 10.0 / 1000
    assert rows[0]["vol_true_lv"] == pytest.approx(3 * 144 * voxel_ml) and rows[0]["vol_error_lv"] == 0.0
    assert rows[0]["phase"] == "ED" and rows[0]["vendor"] == "B" and rows[1]["dice_lv"] == 1.0
    (patient,) = summary(rows, ["lv"])["per_patient"]
    assert patient["lv_ef_true"] == pytest.approx((144 - 64) / 144 * 100)
    if rows[0]["hd95_lv"] is not None:  # with scipy: a 2-pixel shift at 1.5 mm is 3 mm
        assert rows[0]["hd_lv"] == pytest.approx(3.0) and rows[1]["hd95_lv"] == 0.0


@pytest.mark.slow
def test_trainer_metrics_json_holds_the_per_volume_figures(tmp_path):
    from conftest import run_train

    run = tmp_path / "run"
    run_train("experiment=smoke", "data.task=multi", "trainer.progress=false", f"paths.data_dir={tmp_path / 'data'}",
              f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["per_volume"]
    assert len(rows) == metrics["num_test_volumes"]
    for row in rows:
        assert row["phase"] in ("ED", "ES") and row["vendor"]  # the phantom knows both
        for name in ("rv", "myo", "lv"):
            assert row[f"vol_true_{name}"] > 0
            for key in ("dice", "hd", "hd95", "assd", "vol_pred", "vol_error"):
                assert f"{key}_{name}" in row
    assert metrics["per_patient"] and "lv_ef_true" in metrics["per_patient"][0]
    assert ("hd95" in metrics) and metrics["surface_distances"]


# ---------------------------------------------------------------------------- the study


def test_study_compares_layers_on_ef_error_and_hd95_and_the_table_shows_hd95(tmp_path):
    pytest.importorskip("scipy")
    from sweeps import run_metrics, write_run

    from seg.study.summary import write_summary

    def rows(patients, ef_bias, hd95):
        out = []
        for p in patients:
            edv, esv = 100.0 + p, 40.0 + p / 2
            for phase, true in (("ED", edv), ("ES", esv)):
                predicted = true - (ef_bias * edv / 100 if phase == "ES" else 0.0)
                out.append({"case": f"patient{p:03d}_{phase}", "patient": f"patient{p:03d}", "phase": phase,
                            "dice": 0.8, "dice_lv": 0.8, "hd95_lv": hd95 + p % 3, "vol_pred_lv": predicted,
                            "vol_true_lv": true})
        return out

    sweep = tmp_path / "sweep"
    for fold in (0, 1):
        patients = [fold * 8 + i for i in range(8)]
        for norm, bias, hd95 in (("bn", 0.0, 4.0), ("gn", 6.0, 9.0)):
            metrics = run_metrics(norm, patients=patients, fold=fold, hd95=hd95 + 1)
            metrics["per_volume"] = rows(patients, bias, hd95)
            write_run(sweep, f"{norm}_f{fold}", metrics)
    write_summary(sweep, plots=False)
    text = (sweep / "comparison_cardiac.md").read_text()
    assert "|EF error|" in text and "HD95" in text
    result = [r for r in read_csv(sweep / "comparison_cardiac.csv") if r["kind"] == "pair"]
    ef = next(r for r in result if r["metric"] == "ef_error")
    assert float(ef["mean"]) == pytest.approx(-6.0) and ef["result"] == "bn better" and int(ef["n"]) == 16
    hd = next(r for r in result if r["metric"] == "hd95")
    assert float(hd["mean"]) == pytest.approx(-5.0) and hd["result"] == "bn better"
    ranks = {r["a"]: float(r["rank"]) for r in read_csv(sweep / "comparison_cardiac.csv")
             if r["kind"] == "layer" and r["metric"] == "ef_error"}
    assert ranks == {"bn": 1.0, "gn": 2.0}
    table = (sweep / "paper_table.md").read_text()
    assert "| norm | lr=0.1 | HD95 (mm) |" in table and "| 5.00 ± 0.00 |" in table and "| 10.00 ± 0.00 |" in table
