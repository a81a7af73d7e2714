"""What a dataset reader is, and the one loop that reads every patient of a dataset.

A reader is a function ``find(root, **options) -> list[Patient]``: it checks the folder has the
layout of its format (else ``DataError`` saying what was expected) and lists the patients, each
with a ``read()`` that returns that patient's ``Volume``s. Finding is cheap (folder listings and
small tables); reading opens the images. Keeping them apart lets the cache decide whether any
image must be opened at all, and lets ``data.on_error=skip`` drop one bad patient, not a run.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from .volumes import DataError, Volume

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class Patient:
    """One patient found in a dataset folder; ``read()`` opens its files (raising ``DataError``)."""

    id: str
    read: Callable[[], list[Volume]]


def warn(message: str) -> None:
    """A warning the user should see, on stderr, without a Python warnings-module location."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def iter_volumes(patients: list[Patient], *, on_error: str = "raise", skipped: list[dict] | None = None,
                 progress: bool = True, desc: str = "Reading volumes") -> Iterator[Volume]:
    """Each checked volume of ``patients`` in order, with a progress bar over patients.

    ``on_error="skip"``: a patient whose files raise ``DataError`` is left out with a warning and
    appended to ``skipped`` as {"patient", "error"}; ``"raise"`` lets the error end the run.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}; valid: {', '.join(ON_ERROR)}")
    for patient in tqdm(patients, desc=desc, unit="patient", disable=not progress):
        try:
            volumes = patient.read()
            for volume in volumes:
                volume.check()
        except DataError as err:
            if on_error == "raise":
                raise
            warn(f"skipping patient {patient.id} (data.on_error=skip): {err}")
            if skipped is not None:
                skipped.append({"patient": patient.id, "error": str(err)})
            continue
        yield from volumes


def read_all(patients: list[Patient], *, max_patients: int | None = None, progress: bool = True) -> list[Volume]:
    """Every volume of the first ``max_patients`` patients (all when None); the first bad file raises."""
    return list(iter_volumes(patients[:max_patients], progress=progress))


def read_table(path: Path) -> list[dict[str, str]]:
    """A CSV file as rows of {column: value}, names and values stripped (a BOM and index column tolerated)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the table ({type(err).__name__}: {err})") from None
    return [{key.strip(): (value or "").strip() for key, value in row.items() if isinstance(key, str)}
            for row in rows]


def table_columns(path: Path) -> set[str]:
    """The column names of a CSV file (empty if it cannot be read)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return {name.strip() for name in next(csv.reader(handle), [])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def read_text(path: Path) -> str:
    """A small text file (a contour, a list, Info.cfg); an unreadable one is a ``DataError`` naming it."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({type(err).__name__}: {err})") from None
