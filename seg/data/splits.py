"""Which patients train, validate and test -- always by patient, always reproducible.

One of four ways, chosen by which ``data.`` keys are set:

- ``random`` (default): a seeded permutation of the sorted patient ids; ``val_fraction`` and
  ``test_fraction`` of the patients validate and test (``split_patients``).
- ``kfold`` (``data.fold=k data.num_folds=n``): the same permutation cut into n folds whose sizes
  differ by at most one; fold k tests, and ``val_fraction`` of all patients, taken from the other
  folds, validate. Over k = 0..n-1 the test folds partition the patients.
- ``file`` (``data.split_file=...``): a fixed split written by a person or another tool -- JSON
  ``{"train": [...], "val": [...], "test": [...]}`` (a run's metrics.json works too: its
  ``split`` entry has that form), nnU-Net's ``splits_final.json`` (a list of folds of
  ``{"train", "val"}``; the fold ``data.fold``, default 0, is used and nnU-Net's held-out ``val``
  becomes the test set), or CSV with columns ``patient`` (or ``case``) and ``split``. Ids are
  patient ids or case ids (``patient001_ED``); an id the dataset does not hold is an error, and so
  is a file that puts the cases of one patient in different splits (a leak).
- ``vendor`` / ``centre`` (``data.train_vendors=[A,B] data.test_vendors=[C]``): domain shift;
  the test vendors' patients test, ``val_fraction`` of the training vendors' patients validate.

The seed is ``data.split_seed``, or the run's ``seed`` when that is null.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .readers import read_table, read_text
from .slices import split_patients
from .volumes import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
DOMAIN_KEYS = {"vendor": ("train_vendors", "test_vendors"), "centre": ("train_centres", "test_centres")}


def split_mode(cfg) -> str:
    """``random``, ``kfold``, ``file``, ``vendor`` or ``centre``, from which keys are set; two at once are refused."""
    modes = []
    if cfg.split_file:
        modes.append("file")
    elif cfg.fold is not None:
        modes.append("kfold")
    for key, (train_key, test_key) in DOMAIN_KEYS.items():
        if cfg.get(train_key) or cfg.get(test_key):
            modes.append(key)
    if len(modes) > 1:
        raise DataError(f"data: choose one way to split, not {' and '.join(modes)} (set only one of data.fold, "
                        f"data.split_file, data.train_vendors/test_vendors, data.train_centres/test_centres)")
    return modes[0] if modes else "random"


def assign_splits(cases: list[dict], cfg, seed: int, all_patients: list[str] | None = None
                  ) -> tuple[dict[str, list[str]], dict]:
    """{split name: case names} for the prepared ``cases``, and a record of the split for metrics.json.

    ``all_patients``: every patient the reader found, read or not (``max_patients``, skipped
    files), so that a split file naming one of them is not mistaken for a typo.
    """
    mode = split_mode(cfg)
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    patients = [case["patient"] for case in cases]
    record: dict = {"mode": mode, "seed": split_seed}
    if mode == "random":
        by_patient = split_patients(patients, seed=split_seed, val_fraction=cfg.val_fraction,
                                    test_fraction=cfg.test_fraction)
    elif mode == "kfold":
        by_patient = kfold_split(patients, fold=cfg.fold, num_folds=cfg.num_folds, seed=split_seed,
                                 val_fraction=cfg.val_fraction)
        record.update(fold=cfg.fold, num_folds=cfg.num_folds)
    elif mode == "file":
        path = Path(cfg.split_file).expanduser()
        by_case = read_split_file(path, cases, all_patients or [], fold=cfg.fold)
        record.update(file=str(path), seed=None)
        return finish({name: [c for c in by_case if by_case[c] == name] for name in SPLIT_NAMES}, cases, record)
    else:
        train_key, test_key = DOMAIN_KEYS[mode]
        by_patient, train_values, test_values = domain_split(
            cases, mode, cfg.get(train_key) or [], cfg.get(test_key) or [], seed=split_seed,
            val_fraction=cfg.val_fraction)
        record.update({train_key: train_values, test_key: test_values})
    members = {name: set(ids) for name, ids in by_patient.items()}
    by_split = {name: [c["case"] for c in cases if c["patient"] in members.get(name, ())] for name in SPLIT_NAMES}
    return finish(by_split, cases, record)


def finish(by_split: dict[str, list[str]], cases: list[dict], record: dict) -> tuple[dict[str, list[str]], dict]:
    """Refuse an empty training or test set; add the patients of each split to the record."""
    patient_of = {case["case"]: case["patient"] for case in cases}
    for name in ("train", "test"):
        if not by_split[name]:
            raise DataError(f"the {record['mode']} split leaves no {name} patients "
                            f"({len(set(patient_of.values()))} patients in the data)")
    for name in SPLIT_NAMES:
        record[name] = sorted({patient_of[case] for case in by_split[name]})
    return by_split, record


def permuted(patients: list[str], seed: int) -> list[str]:
    """The sorted unique ids in a seeded random order (independent of the input order)."""
    unique = sorted(set(patients))
    return [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]


def kfold_split(patients: list[str], *, fold: int, num_folds: int, seed: int, val_fraction: float
                ) -> dict[str, list[str]]:
    """Fold ``fold`` of ``num_folds`` tests; ``val_fraction`` of all patients from the other folds validate."""
    order = permuted(patients, seed)
    if not 2 <= num_folds <= len(order):
        raise DataError(f"data.num_folds={num_folds} must be between 2 and the number of patients ({len(order)})")
    if not 0 <= fold < num_folds:
        raise DataError(f"data.fold={fold} must be between 0 and data.num_folds-1 = {num_folds - 1}")
    bounds = np.linspace(0, len(order), num_folds + 1).round().astype(int)
    test = order[bounds[fold]:bounds[fold + 1]]
    rest = [p for p in order if p not in set(test)]
    n_val = max(1, round(val_fraction * len(order))) if val_fraction > 0 else 0
    if n_val >= len(rest):
        raise DataError(f"only {len(rest)} patients outside fold {fold}: not enough for {n_val} validation "
                        f"patients and a training set")
    return {"train": rest[n_val:], "val": rest[:n_val], "test": test}


def domain_split(cases: list[dict], key: str, train_values: list, test_values: list, *, seed: int,
                 val_fraction: float) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Train (and validate) on the patients of some vendors/centres, test on others.

    Returns the patients per split and the training and test values (an empty list given for
    one side means every other value the dataset has).
    """
    value_of = {case["patient"]: str(case.get(key, "")) for case in cases}
    present = sorted(set(value_of.values()) - {""})
    option = f"data.train_{key}s / data.test_{key}s"
    if not present:
        raise DataError(f"{option}: this dataset records no {key} per patient (M&Ms does; so does the phantom)")
    spelled = {value.casefold(): value for value in present}
    unknown = [str(v) for v in [*train_values, *test_values] if str(v).casefold() not in spelled]
    if unknown:
        raise DataError(f"{option} name {unknown}, which this dataset does not have; its {key}s: {present}")
    train = {spelled[str(v).casefold()] for v in train_values}
    test = {spelled[str(v).casefold()] for v in test_values}
    if train & test:
        raise DataError(f"{option}: {sorted(train & test)} both train and test")
    train = train or set(present) - test
    test = test or set(present) - train
    training = [p for p in permuted(list(value_of), seed) if value_of[p] in train]
    n_val = max(1, round(val_fraction * len(training))) if val_fraction > 0 else 0
    if n_val >= len(training):
        raise DataError(f"{option}: {len(training)} training patient(s) from {sorted(train)}: not enough for "
                        f"{n_val} validation patients and a training set")
    testing = sorted(p for p, value in value_of.items() if value in test)
    return {"train": training[n_val:], "val": training[:n_val], "test": testing}, sorted(train), sorted(test)


def read_split_file(path: Path, cases: list[dict], all_patients: list[str], fold: int | None) -> dict[str, str]:
    """{case name: split name} from a split file; unknown ids and ids in two splits are refused, naming them."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    entries = split_entries(path, fold)  # [(id, split, where)]
    known_cases = {case["case"]: case["patient"] for case in cases}
    cases_of: dict[str, list[str]] = {}
    for case, patient in known_cases.items():
        cases_of.setdefault(patient, []).append(case)
    unread = set(all_patients) - set(cases_of)  # found but not read (max_patients, skipped): not typos
    by_case: dict[str, str] = {}
    source: dict[str, str] = {}
    unknown = []
    for identifier, split, where in entries:
        if identifier in known_cases:
            targets = [identifier]
        elif identifier in cases_of:
            targets = cases_of[identifier]
        else:
            if identifier not in unread and not any(identifier.startswith(f"{p}_") for p in unread):
                unknown.append(identifier)
            continue
        for case in targets:
            if by_case.get(case, split) != split:
                raise DataError(f"{path}: {identifier} ({where}) is in {split}, but {source[case]} put {case} "
                                f"in {by_case[case]}")
            by_case[case], source[case] = split, f"{identifier} ({where})"
    if unknown:
        example = ", ".join(sorted(cases_of)[:3])
        raise DataError(f"{path}: names {len(unknown)} patient(s) or case(s) not in the dataset: "
                        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (its patients are "
                        f"e.g. {example})")
    sides = {p: sorted({by_case[c] for c in group if c in by_case}, key=SPLIT_NAMES.index)
             for p, group in cases_of.items()}
    leaking = sorted(p for p, names in sides.items() if len(names) > 1)
    if leaking:
        shown = "; ".join(f"{p}: {', '.join(sides[p])}" for p in leaking[:5])
        raise DataError(f"{path}: the cases of {len(leaking)} patient(s) lie in different splits ({shown}"
                        f"{' ...' if len(leaking) > 5 else ''}); a patient's frames are correlated, so the test "
                        f"would not be independent of training (nnU-Net's own splits_final.json is made per case). "
                        f"Put each patient in one split, or, if these are not one patient, set data.patient_regex")
    left_out = [case for case in known_cases if case not in by_case]
    if left_out:
        print(f"Split file {path.name}: {len(left_out)} case(s) of the dataset are not listed and are not used")
    return by_case


def split_entries(path: Path, fold: int | None) -> list[tuple[str, str, str]]:
    """(id, split name, where in the file) for each entry of a JSON or CSV split file."""
    if path.suffix.lower() == ".csv":
        rows = read_table(path)
        id_column = next((c for c in ("patient", "case", "id", "subject") if rows and c in rows[0]), None)
        if not rows or id_column is None or "split" not in rows[0]:
            raise DataError(f"{path}: a CSV split file needs a header with columns patient (or case) and split")
        return [(row[id_column], split_name(row["split"], path, f"line {n}"), f"line {n}")
                for n, row in enumerate(rows, start=2)]
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); a split file is JSON or CSV") from None
    if isinstance(data, dict) and isinstance(data.get("split"), dict):
        data = data["split"]  # a run's metrics.json
    if isinstance(data, list):  # nnU-Net's splits_final.json: [{"train": [...], "val": [...]}, ...]
        index = fold or 0
        if not 0 <= index < len(data) or not isinstance(data[index], dict):
            raise DataError(f"{path}: holds {len(data)} fold(s); data.fold={index} is not one of them")
        data = {"train": data[index].get("train", []), "test": data[index].get("val", [])}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{\"train\": [...], \"val\": [...], \"test\": [...]}}")
    entries = []
    for key, ids in data.items():
        if not isinstance(ids, list):
            continue  # metadata next to the lists (a metrics.json's mode, seed, ...)
        name = split_name(key, path, f"key {key!r}")
        entries.extend((str(identifier), name, f"in {key}") for identifier in ids)
    return entries


def split_name(value: str, path: Path, where: str) -> str:
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise DataError(f"{path}: {where}: unknown split {value!r} (use train, val or test)")
    return name
