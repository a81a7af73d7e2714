"""Volumes and the clinical indices of cardiac MRI: EDV, ESV, stroke volume, ejection fraction, LV mass.

Definitions (those of the ACDC challenge's evaluation, Bernard et al., IEEE TMI 2018, and of the M&Ms
challenges, Campello et al., IEEE TMI 2021):

- **Volume** of a structure in one volume (ml): voxel count x voxel volume (mm^3, the product of the
  spacing) / 1000. ``vol_error`` = predicted - true (ml; positive: the prediction is too large).
- Per patient and ventricle (LV cavity ``lv``, RV cavity ``rv``) from its ED and ES volumes:
  **EDV** and **ESV** (ml), the cavity volumes at end-diastole and end-systole; **SV** = EDV - ESV (ml);
  **EF** = (EDV - ESV) / EDV x 100 (%).
- **LV mass** (g) = 1.05 g/ml (the density of myocardium) x the myocardium's (``myo``) volume at ED.

Each index is computed twice -- from the prediction and from the truth -- and its error is predicted -
true. Where the data do not allow it the index is undefined (NaN; means and agreement statistics skip
it, tables show "—"), never a zero:

- a patient without an ED or an ES volume (or whose phase the dataset does not name ED/ES) has no SV or
  EF, and no EDV/ESV/mass for the missing phase;
- EF is undefined when EDV is 0 (an empty cavity at ED: nothing to eject);
- a task without a structure has no index of it (``data.task=multi`` and ACDC's labels give all;
  ``data.task=lv`` gives the LV's, ``rv`` the RV's, ``myo`` the mass).

An empty structure has volume 0 ml (a defined value: an empty prediction of a present cavity is an
error of the whole volume). A patient with two volumes of one phase is an error (which one is ED?).
"""

from __future__ import annotations

import math

import numpy as np

MYOCARDIAL_DENSITY = 1.05  # g/ml
VENTRICLES = ("lv", "rv")
MYOCARDIUM = "myo"
PHASES = ("ED", "ES")
# (index, unit) in the order of the tables
INDICES = (("lv_edv", "ml"), ("lv_esv", "ml"), ("lv_sv", "ml"), ("lv_ef", "%"), ("lv_mass", "g"),
           ("rv_edv", "ml"), ("rv_esv", "ml"), ("rv_sv", "ml"), ("rv_ef", "%"))
UNITS = dict(INDICES)


def volume_ml(mask, spacing) -> float:
    """The volume of a binary mask in ml: voxel count x product of the spacing (mm) / 1000."""
    return float(np.count_nonzero(np.asarray(mask))) * float(np.prod([float(s) for s in spacing])) / 1000.0


def phase_of(text) -> str:
    """'ED' or 'ES' from a dataset's phase name (any case); '' for anything else (a frame number, none)."""
    phase = str(text or "").strip().upper()
    return phase if phase in PHASES else ""


def structure_key(name: str) -> str:
    """A class name as the indices know it: lv, rv or myo (any case); the name itself otherwise."""
    return str(name).lower()


def ejection_fraction(edv: float, esv: float) -> float:
    """(EDV - ESV) / EDV x 100, in %; NaN when EDV is 0 or either is undefined."""
    if not (math.isfinite(edv) and math.isfinite(esv)) or edv <= 0:
        return math.nan
    return (edv - esv) / edv * 100.0


def patient_indices(volumes: dict[str, dict[str, float]]) -> dict[str, float]:
    """The indices of one patient from {phase: {structure: volume in ml}} (one source, predicted or true):
    {"lv_edv", ..., "rv_ef"} for the structures present, NaN where a phase is missing."""
    ed, es = volumes.get("ED", {}), volumes.get("ES", {})
    out: dict[str, float] = {}
    for ventricle in VENTRICLES:
        if ventricle not in ed and ventricle not in es:
            continue
        edv, esv = ed.get(ventricle, math.nan), es.get(ventricle, math.nan)
        out.update({f"{ventricle}_edv": edv, f"{ventricle}_esv": esv,
                    f"{ventricle}_sv": edv - esv if math.isfinite(edv) and math.isfinite(esv) else math.nan,
                    f"{ventricle}_ef": ejection_fraction(edv, esv)})
    if any(MYOCARDIUM in phase for phase in (ed, es)):
        out["lv_mass"] = MYOCARDIAL_DENSITY * ed.get(MYOCARDIUM, math.nan)
    return out


def clinical_indices(rows: list[dict], structures: list[str]) -> list[dict]:
    """Per patient, from per-volume rows ({"patient", "case", "phase", "vendor"?, "vol_pred_<s>",
    "vol_true_<s>"}): {"patient", "vendor", "<index>_pred", "<index>_true", "<index>_error"} for the indices
    the ``structures`` allow, patients in order of first appearance. Raises ValueError when a patient has
    two volumes of one phase."""
    by_patient: dict[str, dict] = {}
    for row in rows:
        phase = phase_of(row.get("phase"))
        patient = str(row.get("patient") or row.get("case"))
        entry = by_patient.setdefault(patient, {"vendor": row.get("vendor") or "", "pred": {}, "true": {},
                                                "cases": {}})
        if not phase:
            continue
        if phase in entry["cases"]:
            raise ValueError(f"patient {patient}: two {phase} volumes ({entry['cases'][phase]} and {row.get('case')})")
        entry["cases"][phase] = row.get("case")
        for source in ("pred", "true"):
            entry[source][phase] = {structure_key(s): as_float(row.get(f"vol_{source}_{s}")) for s in structures
                                    if structure_key(s) in (*VENTRICLES, MYOCARDIUM)}
    result = []
    for patient, entry in by_patient.items():
        predicted, true = patient_indices(entry["pred"]), patient_indices(entry["true"])
        row = {"patient": patient, "vendor": entry["vendor"]}
        for index in (name for name, _ in INDICES if name in true or name in predicted):
            p, t = predicted.get(index, math.nan), true.get(index, math.nan)
            row.update({f"{index}_pred": p, f"{index}_true": t,
                        f"{index}_error": p - t if math.isfinite(p) and math.isfinite(t) else math.nan})
        result.append(row)
    return result


def indices_present(patients: list[dict]) -> list[str]:
    """The indices of INDICES that at least one patient has (predicted or true), in table order."""
    return [name for name, _ in INDICES if any(math.isfinite(as_float(p.get(f"{name}_true"))) for p in patients)]


def as_float(value) -> float:
    """A number, or NaN for None / anything not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number
