"""Bad configurations and bad data through the real ``train.py``: the exit code and message of each.

    python scripts/bad_inputs_report.py

Builds a small valid ACDC-layout tree, breaks one thing per case (a typo, a wrong type, a
truncated file, mismatched shapes, ...), runs ``train.py`` on it and prints a Markdown table of
the exit code and the first line of the message the user gets.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from acdc_tree import make_acdc_tree, write_volume  # noqa: E402  (the tests' writer of real NIfTI trees)


def frame(tree: Path, gt: bool = False) -> Path:
    return tree / "database" / "training" / "patient001" / f"patient001_frame01{'_gt' if gt else ''}.nii.gz"


def truncate(tree):
    frame(tree).write_bytes(frame(tree).read_bytes()[:200])


def not_nifti(tree):
    with gzip.open(frame(tree), "wb") as handle:
        handle.write(b"not an image")


def shape_mismatch(tree):
    write_volume(frame(tree, gt=True), np.zeros((48, 36, 4)), dtype=np.uint8)


def affine_mismatch(tree):
    write_volume(frame(tree, gt=True), np.zeros((48, 40, 4)), spacing=(2.0, 2.0, 8.0), dtype=np.uint8)


def bad_labels(tree):
    write_volume(frame(tree, gt=True), np.full((48, 40, 4), 7), dtype=np.uint8)


def nan_voxels(tree):
    data = np.ones((48, 40, 4), np.float32)
    data[5, 5, 1] = np.nan
    write_volume(frame(tree), data)


def four_d(tree):
    write_volume(frame(tree), np.ones((48, 40, 4, 2)))


def empty_root(tree):
    shutil.rmtree(tree / "database")
    (tree / "database").mkdir()


def split_file(tree):
    (tree / "split.json").write_text('{"train": ["patient001", "patient002", "patient003"], "val": ["patient004"], '
                                     '"test": ["patient099"]}')


CONFIG_CASES = {
    "typo in a key": ["trainer.epoch=3"],
    "wrong type": ["lr=fast"],
    "unknown norm": ["norm=batchnorm"],
    "unknown norm option": ["norm=gn", "+norm.grups=8"],
    "wrong-typed norm option": ["norm=gn", "norm.groups=abc"],
    "channels not divisible by groups": ["norm=gn", "norm.groups=12"],
    "invalid task": ["data.task=atria"],
    "image size not a multiple of 2^depth": ["data.image_size=90"],
    "resume from a missing checkpoint": ["trainer.resume=/nonexistent/run"],
    "init_from a missing checkpoint": ["model.init_from=/nonexistent/best.pt"],
    "unknown precision": ["trainer.precision=fp8"],
    "unknown torch.compile backend": ["trainer.compile=true", "trainer.compile_backend=fast"],
    "norm.sync on a layer that cannot synchronize": ["norm=sn", "+norm.sync=true"],
    "cin on data that records no vendor": ["norm=cin"],
    "a size given by the data set in the config": ["norm=cin", "+norm.num_domains=3"],
    "unknown base of spade": ["norm=spade", "norm.base=ln"],
}
# cases that need an environment: (overrides, environment variables)
ENV_CASES = {
    "compile on a CPU without a C++ compiler": (["trainer.device=cpu", "trainer.compile=true"],
                                                {"CXX": "/nonexistent/g++"}),
}
DATA_CASES = {
    "truncated .nii.gz": (truncate, []),
    "gzip file that is not NIfTI": (not_nifti, []),
    "image/label shapes differ": (shape_mismatch, []),
    "image/label affines differ": (affine_mismatch, []),
    "label values outside the set": (bad_labels, []),
    "NaN voxels": (nan_voxels, []),
    "4D file where 3D is expected": (four_d, []),
    "empty root folder": (empty_root, []),
    "split file naming a missing patient": (split_file, ["data.split_file={tree}/split.json"]),
}


def message_of(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    hydra = [line for line in lines if not line.startswith(("Set the environment", "Traceback", "  "))]
    return " ".join(hydra[:3]) if hydra else "(no message)"


def main() -> None:
    print("| case | exit code | message |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(name, None, overrides, {}) for name, overrides in CONFIG_CASES.items()]
        cases += [(name, None, overrides, env) for name, (overrides, env) in ENV_CASES.items()]
        cases += [(name, breaker, overrides, {}) for name, (breaker, overrides) in DATA_CASES.items()]
        for number, (name, breaker, overrides, env) in enumerate(cases):
            tree = make_acdc_tree(tmp / f"tree{number}", num_patients=6, shape=(48, 40, 4))
            if breaker:
                breaker(tree)
            command = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "data=acdc", f"data.root={tree}",
                       "trainer.progress=false", f"hydra.run.dir={tmp / f'run{number}'}",
                       *(o.format(tree=tree) for o in overrides)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                                    env={**os.environ, **env})
            text = message_of(result).replace(str(tmp), "<tmp>").replace("|", "\\|")
            print(f"| {name} | {result.returncode} | {text[:300]} |", flush=True)


if __name__ == "__main__":
    main()
