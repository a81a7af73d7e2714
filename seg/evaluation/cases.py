"""What a ground-truth file says about its case: the patient, the phase (ED/ES) and the vendor, read from
the dataset's own files as its reader reads them (seg/data/acdc.py, seg/data/mnms.py).

- **ACDC layout** (and the built-in phantom, which writes it): ``<patient>/<patient>_frameNN_gt.nii.gz``
  beside ``<patient>/Info.cfg``; the phase is ED when NN is Info.cfg's ``ED`` frame, ES when it is its ``ES``
  frame; the vendor is Info.cfg's ``Vendor`` line where there is one (the phantom writes it; ACDC, a single
  centre, has none).
- **M&Ms-2 layout**: ``<code>/<code>_SA_ED_gt.nii.gz`` and ``_SA_ES_gt``; the phase from the name; the vendor
  from the ``VENDOR`` column of ``dataset_information.csv`` (the row whose ``SUBJECT_CODE`` is the code, compared
  as numbers) in the case's folder or up to three folders above it.
- **Any other name ending in ``_ED`` / ``_ES``** (any case, ``-`` or ``_``): the phase from the name, the patient
  the part before it.
- Otherwise the case is its own patient, of unknown phase and vendor: it is scored, but enters no clinical
  index (those need a patient's ED and ES).

M&Ms-1 keeps its labels in one 4D file per patient (``<code>_sa_gt.nii.gz``), which seg-evaluate does not
read (it scores 3D label maps, as seg-predict writes them).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..data.acdc import read_info
from ..data.mnms import MNMS2_ID_COLUMN, subject_key
from ..data.readers import read_table, table_columns

ACDC_FRAME = re.compile(r"(?P<patient>.+)_frame(?P<frame>\d+)")
MNMS2_NAME = re.compile(r"(?P<patient>.+)_SA_(?P<phase>ED|ES)")
PHASE_SUFFIX = re.compile(r"(?P<patient>.+?)[_-](?P<phase>ED|ES)", re.IGNORECASE)


class CaseInfo:
    """Reads the phases and vendors of the cases below one ground-truth folder (each table read once)."""

    def __init__(self):
        self._info: dict[Path, dict] = {}
        self._vendors: dict[Path, dict[str, str]] = {}

    def __call__(self, case: str, truth: Path) -> dict[str, str]:
        """{"patient", "phase", "vendor"} of ``case`` whose ground truth is ``truth``."""
        acdc = ACDC_FRAME.fullmatch(case)
        if acdc and (truth.parent / "Info.cfg").is_file():
            info = self.info(truth.parent / "Info.cfg")
            frame = int(acdc["frame"])
            phase = "ED" if frame == int(info["ED"]) else "ES" if frame == int(info["ES"]) else ""
            return {"patient": acdc["patient"], "phase": phase, "vendor": info.get("Vendor", "")}
        mnms2 = MNMS2_NAME.fullmatch(case)
        if mnms2:
            return {"patient": mnms2["patient"], "phase": mnms2["phase"],
                    "vendor": self.mnms2_vendor(mnms2["patient"], truth)}
        named = PHASE_SUFFIX.fullmatch(case)
        if named:
            return {"patient": named["patient"], "phase": named["phase"].upper(), "vendor": ""}
        return {"patient": case, "phase": "", "vendor": ""}

    def info(self, path: Path) -> dict:
        if path not in self._info:
            self._info[path] = read_info(path)
        return self._info[path]

    def mnms2_vendor(self, code: str, truth: Path) -> str:
        for folder in list(truth.parents)[:4]:
            table = self.vendor_table(folder)
            if subject_key(code) in table:
                return table[subject_key(code)]
        return ""

    def vendor_table(self, folder: Path) -> dict[str, str]:
        """{subject key: VENDOR} of the M&Ms-2 information tables directly in ``folder``."""
        if folder not in self._vendors:
            table: dict[str, str] = {}
            for path in sorted(folder.glob("*.csv")):
                if MNMS2_ID_COLUMN in table_columns(path):
                    for row in read_table(path):
                        if row.get(MNMS2_ID_COLUMN):
                            table.setdefault(subject_key(row[MNMS2_ID_COLUMN]), row.get("VENDOR", "") or "")
            self._vendors[folder] = table
        return self._vendors[folder]
