"""The dataset formats ``data.format`` can name, each a reader ``find(root, **options) -> list[Patient]``."""

from __future__ import annotations

from . import acdc
from . import mnms
from . import nnunet
from . import rvsc
from . import sunnybrook

READERS = {
    "acdc": acdc.find_patients,  # ACDC and the built-in phantom
    "mnms": mnms.find_patients,  # M&Ms-1 and M&Ms-2
    "nnunet": nnunet.find_patients,  # any nnU-Net raw dataset (dataset.json, imagesTr, labelsTr)
    "sunnybrook": sunnybrook.find_patients,  # Sunnybrook Cardiac Data, LV contours
    "rvsc": rvsc.find_patients,  # RV Segmentation Challenge, RV contours
}


def reader_options(data_cfg) -> dict:
    """The ``data.`` settings a format's reader takes (they change what is read, so they key the cache)."""
    if data_cfg.format == "nnunet":
        options = {"label_map": {str(k): str(v) for k, v in (data_cfg.label_map or {}).items()}}
        if data_cfg.get("patient_regex"):
            options["patient_regex"] = str(data_cfg.patient_regex)
        return options
    return {}
