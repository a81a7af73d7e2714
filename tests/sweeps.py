"""Synthetic sweep folders whose statistics are known: run folders with a metrics.json as the trainer writes
it, including the per-volume test Dice (two volumes, ED and ES, per patient)."""

from __future__ import annotations

import json
from pathlib import Path


def base_dice(patient: int, frame: str) -> float:
    """A Dice that differs between patients and frames (so no two volumes are alike)."""
    return 0.55 + 0.025 * (patient % 16) + (0.013 if frame == "ES" else 0.0)


def per_volume(patients: list[int], offset=0.0) -> list[dict]:
    """metrics.json's per_volume rows: base Dice + ``offset`` (a number, or a function of patient and frame)."""
    rows = []
    for p in patients:
        for frame in ("ED", "ES"):
            shift = offset(p, frame) if callable(offset) else offset
            dice = base_dice(p, frame) + shift
            rows.append({"case": f"patient{p:03d}_{frame}", "patient": f"patient{p:03d}", "dice": dice,
                         "dice_rv": dice})
    return rows


def run_metrics(norm: str, *, patients: list[int], offset=0.0, lr: float = 0.1, fold: int | None = 0,
                seed: int = 0, batch: int = 1, val: float = 0.8, test_vendors: list[str] | None = None,
                **extra) -> dict:
    """A finished run's metrics.json: test Dice = the mean of its volumes, validation Dice ``val``."""
    rows = per_volume(patients, offset)
    dice = sum(r["dice"] for r in rows) / len(rows)
    split = {"mode": "kfold", "fold": fold, "seed": seed, "test": [r["patient"] for r in rows[::2]]}
    if test_vendors:
        split = {"mode": "vendor", "seed": seed, "train_vendors": ["A", "B", "D"], "test_vendors": test_vendors,
                 "test": split["test"]}
    elif fold is None:
        split = {"mode": "random", "seed": seed, "test": split["test"]}
    return {"status": "ok", "norm": norm, "lr": lr, "batch_size": batch, "seed": seed, "task": "rv",
            "data": "phantom", "dice": dice, "dice_2d": dice, "dice_rv": dice, "best_val_dice": val, "split": split,
            "history": [{"epoch": 1, "step": 5, "train_loss": 0.5, "val_dice": val}], "per_volume": rows, **extra}


def write_run(sweep: Path, name: str, metrics: dict, overrides: list[str] | None = None) -> Path:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if overrides is not None:
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def two_fold_sweep(sweep: Path, layers: dict, seeds=(0,), patients_per_fold: int = 6, **common) -> Path:
    """Each layer {norm: offset} run on 2 folds x ``seeds``; fold f tests its own ``patients_per_fold`` patients
    (seed s shifts the patient ids, as another split would)."""
    for seed in seeds:
        for fold in (0, 1):
            patients = [100 * seed + fold * patients_per_fold + i for i in range(patients_per_fold)]
            for norm, offset in layers.items():
                write_run(sweep, f"{norm}_f{fold}_s{seed}", run_metrics(norm, patients=patients, offset=offset,
                                                                         fold=fold, seed=seed, **common))
    return sweep
