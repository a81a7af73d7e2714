"""What a dataset reader is, and the one loop that reads every patient of a dataset.

A reader is a function ``find(root, **options) -> list[Patient]``: it checks the folder has the
layout of its format (else ``DataError`` saying what was expected) and lists the patients, each
with a ``read()`` that returns that patient's ``Volume``s. Finding is cheap (folder listings and
small tables); reading opens the images. Keeping them apart lets the cache decide whether any
image must be opened at all, and lets ``data.on_error=skip`` drop one bad patient, not a run.

A reader also lists the patients a release ships without ground truth (ACDC 2017's testing set,
M&Ms-1's Unlabeled subset, RVSC's test sets, nnU-Net's imagesTs) as ``unlabeled``, with the
reason, and every patient carries the ``subset`` (folder) it came from: a run prints one line per
subset -- patients read, skipped as unlabeled, skipped as bad (``summarize``).
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
    """One patient found in a dataset folder; ``read()`` opens its files (raising ``DataError``).

    subset: the folder of the release it lies in (``training``, ``Training/Unlabeled``, ``Test1Set``);
    unlabeled: why it has no ground truth ('' when it has): such a patient is counted, never read.
    """

    id: str
    read: Callable[[], list[Volume]] | None = None
    subset: str = ""
    unlabeled: str = ""


def subset_name(root: Path, folder: Path) -> str:
    """The subset a patient folder's parent stands for: its path below ``root`` (``root``'s name if none)."""
    try:
        relative = folder.resolve().relative_to(root.resolve())
    except ValueError:
        return folder.name
    return relative.as_posix() if relative.parts else root.resolve().name


def some_labelled(patients: list[Patient], root: Path, what: str) -> list[Patient]:
    """``patients`` (all of them, sorted by id), if any has ground truth; else an error saying why none has."""
    if not any(not p.unlabeled for p in patients):
        reasons = sorted({p.unlabeled for p in patients})
        raise DataError(f"{root}: no labelled patient ({len(patients)} found without ground truth: "
                        f"{'; '.join(reasons)}); point data.root at the {what}")
    return sorted(patients, key=lambda p: p.id)


def summarize(patients: list[Patient], read: set[str], skipped: list[dict], unread: set[str] = frozenset()
              ) -> list[dict]:
    """Per subset: patients read, skipped as unlabeled (and why), skipped as bad, not read (``max_patients``)."""
    bad = {entry["patient"] for entry in skipped}
    entries: dict[str, dict] = {}
    for patient in patients:
        entry = entries.setdefault(patient.subset or ".", {"subset": patient.subset or ".", "read": 0, "unlabeled": 0,
                                                          "bad": 0, "unread": 0, "unlabeled_because": []})
        if patient.unlabeled:
            entry["unlabeled"] += 1
            if patient.unlabeled not in entry["unlabeled_because"]:
                entry["unlabeled_because"].append(patient.unlabeled)
        elif patient.id in bad:
            entry["bad"] += 1
        elif patient.id in read:
            entry["read"] += 1
        elif patient.id in unread:
            entry["unread"] += 1
    return sorted(entries.values(), key=lambda entry: entry["subset"])


def summary_line(entry: dict) -> str:
    """``Data subset <subset>: N patients read, U skipped as unlabeled (why), B skipped as bad``."""
    why = f" ({'; '.join(entry['unlabeled_because'])})" if entry["unlabeled"] else ""
    line = (f"Data subset {entry['subset']}: {entry['read']} patients read, {entry['unlabeled']} skipped as "
            f"unlabeled{why}, {entry['bad']} skipped as bad")
    return line + (f", {entry['unread']} not read (data.max_patients)" if entry["unread"] else "")


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
        if patient.unlabeled:
            continue
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
    """Every volume of the first ``max_patients`` labelled patients (all when None); the first bad file raises."""
    labelled = [p for p in patients if not p.unlabeled]
    return list(iter_volumes(labelled[:max_patients], progress=progress))


def read_table(path: Path) -> list[dict[str, str]]:
    """A CSV file (or an Excel .xlsx sheet) as rows of {column: value}, names and values stripped.

    A BOM, an unnamed index column, CRLF line ends and empty padding rows (all fields empty) are
    tolerated: padding rows are dropped.
    """
    if path.suffix.lower() == ".xlsx":
        return read_xlsx(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the table ({type(err).__name__}: {err})") from None
    rows = [{key.strip(): (value or "").strip() for key, value in row.items() if isinstance(key, str)}
            for row in rows]
    return [row for row in rows if any(row.values())]


def import_openpyxl(path: Path):
    try:
        import openpyxl
    except ImportError:
        raise DataError(f"{path}: reading an Excel sheet needs openpyxl: pip install openpyxl (or the project's "
                        f"extra: pip install -e '.[xlsx]'), or save the sheet as CSV beside it") from None
    return openpyxl


def cell_text(value) -> str:
    """A spreadsheet cell as the text a CSV would hold (``3`` for the number 3.0, '' for an empty cell)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def xlsx_sheets(path: Path) -> list[list[list[str]]]:
    """Every sheet of an .xlsx file as rows of cell texts (values, not formulas)."""
    openpyxl = import_openpyxl(path)
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            return [[[cell_text(v) for v in row] for row in sheet.iter_rows(values_only=True)]
                    for sheet in book.worksheets]
        finally:
            book.close()
    except Exception as err:  # openpyxl and zipfile raise many types for a bad file
        raise DataError(f"{path}: cannot read the Excel sheet ({type(err).__name__}: {err})") from None


def read_xlsx(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of the first sheet of ``path`` whose header row holds ``required`` (any sheet if none given)."""
    for rows in xlsx_sheets(path):
        for number, header in enumerate(rows):
            names = [name.strip() for name in header]
            if not any(names):
                continue  # empty rows above the header
            if set(required) <= set(names):
                table = [dict(zip(names, row)) for row in rows[number + 1:]]
                return [{k: v for k, v in row.items() if k} for row in table if any(row)]
            break
    return []


def table_columns(path: Path) -> set[str]:
    """The column names of a CSV file or of any sheet of an .xlsx file (empty if it cannot be read)."""
    if path.suffix.lower() == ".xlsx":
        return {name for rows in xlsx_sheets(path) for row in rows[:1] for name in row if name}
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
