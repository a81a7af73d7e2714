"""The bad-input cases: one table of what a user can get wrong, and what the project must answer.

Each case is a command line of ``train.py`` or of a tool (``seg-predict``, ``seg-export``: ``tool``), and,
for the data cases, one thing broken in a small valid ACDC-layout tree of real NIfTI files. A refused case
must end with exit code 1 and one line ``error: ...`` that contains ``expect``, without a traceback; a
case that must go on (``exit_code`` 0) prints the line that contains ``expect`` -- a ``warning:``, or the
tool's own result line. The table is read by tests/test_reliability.py (one parametrized test per case)
and by scripts/bad_inputs_report.py (the table of docs/results/bad_inputs.md); nothing here imports from
tests/ or from the harness.

Placeholders in a case's overrides: ``{tree}`` the case's data tree, ``{tmp}`` a folder of the case,
``{done}`` a finished smoke run on such a tree (made once, shared by the cases that need one; they
only read it; trained without flips, as by default), ``{volume}`` one image volume of the tree.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (48, 40, 4)  # x, y, slices of every volume of the tree


# ---------------------------------------------------------------------------- the data tree


def write_volume(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 8.0), dtype=np.float32) -> None:
    image = nib.Nifti1Image(array.astype(dtype), np.diag([*spacing, 1.0]))
    image.header.set_zooms(spacing[: array.ndim] if array.ndim <= 3 else (*spacing, 1.0))
    nib.save(image, str(path))


def make_tree(root: Path, num_patients: int = 6) -> Path:
    """ACDC layout under root/database/training: Info.cfg (no vendor), ED and ES frames with their _gt labels:
    an LV disk in a myocardium ring with the RV beside it, on a noisy background."""
    rng = np.random.default_rng(0)
    x, y = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for p in range(1, num_patients + 1):
        folder = root / "database" / "training" / f"patient{p:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Info.cfg").write_text(f"ED: 1\nES: {5 + p}\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n")
        for frame, scale in ((1, 1.0), (5 + p, 0.8)):
            cx = SHAPE[0] / 2 + rng.integers(-3, 4)
            r = np.hypot(x - cx, y - SHAPE[1] / 2)
            label = np.zeros(SHAPE[:2], np.uint8)
            label[np.hypot(x - cx, y - SHAPE[1] / 2 - 13 * scale) < 6 * scale] = 1
            label[r < 9] = 2
            label[r < 6 * scale] = 3
            labels = np.repeat(label[..., None], SHAPE[2], axis=-1)
            image = 100 + 300 * (labels == 1) + 80 * (labels == 2) + 300 * (labels == 3) + rng.normal(0, 10, SHAPE)
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", image)
            write_volume(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", labels, dtype=np.uint8)
    return root


# ---------------------------------------------------------------------------- what breaks


def frame(tree: Path, gt: bool = False) -> Path:
    return tree / "database" / "training" / "patient001" / f"patient001_frame01{'_gt' if gt else ''}.nii.gz"


def truncate(tree: Path, tmp: Path) -> None:
    frame(tree).write_bytes(frame(tree).read_bytes()[:200])


def not_nifti(tree: Path, tmp: Path) -> None:
    with gzip.open(frame(tree), "wb") as handle:
        handle.write(b"not an image")


def shape_mismatch(tree: Path, tmp: Path) -> None:
    write_volume(frame(tree, gt=True), np.zeros((SHAPE[0], SHAPE[1] - 4, SHAPE[2])), dtype=np.uint8)


def affine_mismatch(tree: Path, tmp: Path) -> None:
    write_volume(frame(tree, gt=True), np.zeros(SHAPE), spacing=(2.0, 2.0, 8.0), dtype=np.uint8)


def bad_labels(tree: Path, tmp: Path) -> None:
    write_volume(frame(tree, gt=True), np.full(SHAPE, 7), dtype=np.uint8)


def nan_voxels(tree: Path, tmp: Path) -> None:
    data = np.ones(SHAPE, np.float32)
    data[5, 5, 1] = np.nan
    write_volume(frame(tree), data)


def four_d(tree: Path, tmp: Path) -> None:
    write_volume(frame(tree), np.ones((*SHAPE, 2)))


def empty_root(tree: Path, tmp: Path) -> None:
    shutil.rmtree(tree / "database")
    (tree / "database").mkdir()


def split_file(tree: Path, tmp: Path) -> None:
    (tree / "split.json").write_text('{"train": ["patient001", "patient002", "patient003"], "val": ["patient004"], '
                                     '"test": ["patient099"]}')


def a_file(tree: Path, tmp: Path) -> None:
    (tmp / "a_file").write_text("not a folder\n")


# ---------------------------------------------------------------------------- what breaks a run's folder


def copy_run(done: Path, target: Path) -> Path:
    """A copy of the finished run ``done`` at ``target`` (its checkpoints, metrics.json and .hydra/)."""
    if not target.exists():
        shutil.copytree(done, target, ignore=shutil.ignore_patterns("events.out.*", ".run.lock"))
    return target


def onnx_folder(tmp: Path, done: Path) -> None:
    (tmp / "model.onnx").mkdir(exist_ok=True)


def nan_weights(tmp: Path, done: Path) -> None:
    """{tmp}/nan: the run with a NaN in one weight of its best.pt (as a run whose weights went NaN saves them)."""
    import torch

    run = copy_run(done, tmp / "nan")
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    weight = next(key for key, value in state["model"].items() if value.is_floating_point() and value.numel() > 1)
    state["model"][weight].view(-1)[0] = float("nan")
    torch.save(state, run / "checkpoints" / "best.pt")


def diverged_run(tmp: Path, done: Path) -> None:
    """{tmp}/diverged: the run, its metrics.json as the trainer records a run whose loss became non-finite."""
    import json

    run = copy_run(done, tmp / "diverged")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(status="diverged", diverged_step=7, diverged_loss="nan", dice=None, dice_2d=None,
                   best_val_dice=None)
    (run / "metrics.json").write_text(json.dumps(metrics))


def sweep_of_two(tmp: Path, done: Path) -> None:
    """{tmp}/sweep: two jobs of a sweep in the folders Hydra names them (commas between the overrides)."""
    for name in ("0_lr=0.1,norm=bn", "1_data.max_slices_per_volume=null,lr=0.1"):
        copy_run(done, tmp / "sweep" / name)


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    expect: str  # a part of the one-line message
    breaker: Callable[[Path, Path], None] | None = None  # breaks (tree, tmp) before the run
    env: dict = field(default_factory=dict)
    needs_done_run: bool = False  # the {done} run must exist
    cpu_only: bool = False  # meaningful only on a machine without a GPU
    tool: str = "train"  # train (train.py), or predict / export (python -m seg.tools.<tool>: seg-predict, seg-export)
    exit_code: int = 1  # 1: refused in one line; 0: it goes on (a warning, or the right result)
    setup: Callable[[Path, Path], None] | None = None  # prepares (tmp, done) before the command

    def __post_init__(self):
        if self.setup is not None and not self.needs_done_run:
            object.__setattr__(self, "needs_done_run", True)


PREDICT = ("input={volume}", "output={tmp}/pred")


CASES: list[Case] = [
    # ---- the configuration
    Case("typo in a key", ("trainer.epoch=3",), "trainer.epoch"),
    Case("wrong type", ("lr=fast",), "lr=fast"),
    Case("unknown norm", ("norm=batchnorm",), "norm/batchnorm"),
    Case("unknown norm option", ("norm=gn", "+norm.grups=8"), "no option 'grups'"),
    Case("wrong-typed norm option", ("norm=gn", "norm.groups=abc"), "must be an integer"),
    Case("channels not divisible by groups", ("norm=gn", "norm.groups=12"), "cannot be split into 12 groups"),
    Case("invalid task", ("data.task=atria",), "data.task='atria' is not valid"),
    Case("image size not a multiple of 2^depth", ("data.image_size=90",), "must be a multiple of 2**model.depth"),
    Case("unknown precision", ("trainer.precision=fp8",), "trainer.precision='fp8' is not valid"),
    Case("unknown torch.compile backend", ("trainer.compile=true", "trainer.compile_backend=fast"),
         "is not a torch.compile backend"),
    Case("norm.sync on a layer that cannot synchronize", ("norm=sn", "+norm.sync=true"),
         "norm.sync is not available for norm=sn"),
    Case("cin on data that records no vendor", ("norm=cin",), "needs a domain per image"),
    Case("a size given by the data set in the config", ("norm=cin", "+norm.num_domains=3"),
         "norm.num_domains is set by the trainer"),
    Case("unknown base of spade", ("norm=spade", "norm.base=ln"), "base='ln' is not valid"),
    Case("compile on a CPU without a C++ compiler", ("trainer.device=cpu", "trainer.compile=true"),
         "needs a C++ compiler", env={"CXX": "/nonexistent/g++"}),
    Case("a GPU asked for on a machine without one", ("trainer.device=cuda",), "CUDA is not available",
         cpu_only=True),
    # ---- the learning rate: one source, a finite positive number
    Case("learning rate not a number", ("lr=nan",), "lr=nan is not a finite number"),
    Case("infinite learning rate", ("lr=inf",), "lr=inf is not a finite number"),
    Case("negative learning rate", ("lr=-1",), "lr=-1.0 is out of range"),
    Case("optim.lr set apart from lr", ("optim.lr=0.3",), "optim.lr=0.3 differs from lr=0.1"),
    # ---- ranges of the optimizer, trainer and model keys
    Case("negative momentum", ("optim.momentum=-1",), "optim.momentum=-1.0 is out of range"),
    Case("momentum of 1", ("optim.momentum=1",), "optim.momentum=1.0 is out of range"),
    Case("negative weight decay", ("optim.weight_decay=-1",), "optim.weight_decay=-1.0 is out of range"),
    Case("gradient clipping at 0", ("optim.grad_clip=0",), "optim.grad_clip=0.0 is out of range"),
    Case("Nesterov momentum with Adam", ("optim.name=adam", "optim.nesterov=true"),
         "optim.nesterov=true is an option of optim.name=sgd"),
    Case("seed above 2**32-1", ("seed=4294967296",), "seed=4294967296 is out of range"),
    Case("negative seed", ("seed=-1",), "seed=-1 is out of range"),
    Case("no panel images", ("trainer.num_panel_images=0",), "trainer.num_panel_images=0 is out of range"),
    Case("negative checkpoint interval", ("trainer.checkpoint_every_n_steps=-1",),
         "trainer.checkpoint_every_n_steps=-1 is out of range"),
    Case("evaluation batch of 0", ("trainer.eval_batch_size=0",), "trainer.eval_batch_size=0 is out of range"),
    Case("negative auxiliary loss weight", ("model.aux_weight=-1",), "model.aux_weight=-1.0 is out of range"),
    # ---- the schedule: a name of the table, and only its options
    Case("unknown schedule", ("schedule.name=cosine",), "schedule.name='cosine' is not valid"),
    Case("an option the schedule does not read", ("schedule.name=constant",),
         "schedule 'constant' does not read schedule.gamma"),
    Case("milestone at epoch 0", ("schedule.milestones=[0]",), "schedule.milestones must be a list of epoch numbers"),
    Case("negative gamma", ("schedule.gamma=-1",), "schedule.gamma must be a finite number > 0"),
    Case("poly power of 0", ("schedule=poly", "schedule.power=0"), "schedule.power must be a finite number > 0"),
    # ---- folders and checkpoints
    Case("run folder under a file", ("hydra.run.dir={tmp}/a_file/run",), "a_file is a file, not a folder",
         breaker=a_file),
    Case("resume from a missing checkpoint", ("trainer.resume=/nonexistent/run",), "no checkpoint at"),
    Case("init_from a missing checkpoint", ("model.init_from=/nonexistent/best.pt",), "no such checkpoint file"),
    Case("a new run in a folder that holds one", ("hydra.run.dir={done}",), "already holds a run's checkpoint",
         needs_done_run=True),
    Case("resume with a changed learning rate", ("hydra.run.dir={done}", "trainer.resume=true", "lr=0.3"),
         "is from a different run: lr: checkpoint 0.1, this run 0.3", needs_done_run=True),
    Case("resume from another run's checkpoint into a new folder", ("trainer.resume={done}/checkpoints/last.pt",),
         "continues the run in", needs_done_run=True),
    Case("resume a run from its best.pt", ("hydra.run.dir={done}", "trainer.resume={done}/checkpoints/best.pt"),
         "would rewind the run", needs_done_run=True),
    # ---- the data
    Case("truncated .nii.gz", (), "not a readable NIfTI file", breaker=truncate),
    Case("gzip file that is not NIfTI", (), "not a readable NIfTI file", breaker=not_nifti),
    Case("image/label shapes differ", (), "does not match image", breaker=shape_mismatch),
    Case("image/label affines differ", (), "affine differs", breaker=affine_mismatch),
    Case("label values outside the set", (), "label values [7] are outside", breaker=bad_labels),
    Case("NaN voxels", (), "NaN or infinite voxel", breaker=nan_voxels),
    Case("4D file where 3D is expected", (), "expected a 3D volume", breaker=four_d),
    Case("empty root folder", (), "no patient folders found", breaker=empty_root),
    Case("split file naming a missing patient", ("data.split_file={tree}/split.json",), "patient099",
         breaker=split_file),
    # ---- Hydra's + and ~: a key the schema does not know, a key every run needs removed
    Case("a misspelt key added with +", ("+trainer.epoch=5",), "trainer.epoch is not a key of the configuration "
         "(did you mean trainer.epochs?)"),
    Case("a misspelt data key added with +", ("+data.max_patient=3",), "did you mean data.max_patients?"),
    Case("an unknown top-level key added with +", ("+nosuchkey=1",), "nosuchkey is not a key of the configuration"),
    Case("the learning rate removed with ~", ("~lr",), "lr is missing (removed with ~lr?)"),
    Case("the seed removed with ~", ("~seed",), "seed is missing (removed with ~seed?)"),
    Case("the norm removed with ~", ("~norm",), "norm is missing (removed with ~norm?)"),
    # ---- the stacked launcher
    Case("a stacked sweep with max_runs=1", ("-m", "hydra/launcher=stacked", "hydra.launcher.max_runs=1", "lr=0.1,0.05",
                                             "hydra.sweep.dir={tmp}/sweep"),
         "lr=0.1: hydra.launcher.max_runs=1: 2 jobs could share a stack", exit_code=0),
    # ---- seg-export and seg-predict on a trained run's checkpoint
    Case("seg-export to an existing folder named .onnx", ("ckpt={done}/checkpoints/best.pt", "output={tmp}/model.onnx",
                                                          "overwrite=true"),
         "is a folder", tool="export", setup=onnx_folder),
    Case("seg-export of a checkpoint with NaN weights", ("ckpt={tmp}/nan/checkpoints/best.pt",
                                                         "output={tmp}/model.onnx"),
         "non-finite", tool="export", setup=nan_weights),
    Case("seg-predict with a checkpoint with NaN weights", ("ckpt={tmp}/nan/checkpoints/best.pt", *PREDICT),
         "non-finite", tool="predict", setup=nan_weights),
    Case("seg-predict from a diverged run's last.pt", ("ckpt={tmp}/diverged/checkpoints/last.pt", *PREDICT),
         "is from a run that diverged", tool="predict", exit_code=0,
         setup=diverged_run),
    Case("seg-predict tta=true on a model trained without flips", ("ckpt={done}/checkpoints/best.pt", "tta=true",
                                                                   *PREDICT),
         "warning: tta=true:", tool="predict", exit_code=0, needs_done_run=True),
    Case("seg-predict: an ensemble of sweep jobs whose folder names hold commas",
         ("ckpt=[{tmp}/sweep/0_lr=0.1,norm=bn/checkpoints/best.pt,"
          "{tmp}/sweep/1_data.max_slices_per_volume=null,lr=0.1/checkpoints/best.pt]", *PREDICT),
         "ensemble of 2", tool="predict", exit_code=0, setup=sweep_of_two),
    Case("seg-predict: an ensemble given as a glob", ("ckpt={tmp}/sweep/*/checkpoints/best.pt", *PREDICT),
         "ensemble of 2", tool="predict", exit_code=0, setup=sweep_of_two),
]


# ---------------------------------------------------------------------------- running a case


@dataclass
class Outcome:
    returncode: int
    message: str  # the one line the user reads ("error: ..." without the prefix, or Hydra's first lines)
    output: str  # all of stdout and stderr


def tree_volume(tree: Path) -> Path:
    return tree / "database" / "training" / "patient002" / "patient002_frame01.nii.gz"


def base_command(tree: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "data=acdc", f"data.root={tree}",
            "trainer.progress=false", f"hydra.run.dir={run_dir}"]


def done_run(workspace: Path) -> Path:
    """A finished smoke run (made once per workspace) that the cases needing a run to continue only read."""
    done = workspace / "done"
    if not (done / "checkpoints" / "best.pt").is_file():
        tree = workspace / "tree"
        if not tree.exists():
            make_tree(tree)
        subprocess.run(base_command(tree, done), cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
                       env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    return done


def run_case(case: Case, workspace: Path, number: int) -> Outcome:
    """Run ``case`` through train.py in a folder of its own under ``workspace``."""
    tmp = workspace / f"case{number}"
    tmp.mkdir(parents=True, exist_ok=True)
    shared = workspace / "tree"
    if not shared.exists():
        make_tree(shared)
    tree = shared
    if case.breaker is not None:  # a copy of its own to break
        tree = tmp / "tree"
        if not tree.exists():
            shutil.copytree(shared, tree, ignore=shutil.ignore_patterns(".seg-cache"))
        case.breaker(tree, tmp)
    done = done_run(workspace) if case.needs_done_run else None
    if case.setup is not None:
        case.setup(tmp, done)
    values = {"tree": tree, "tmp": tmp, "done": done, "volume": tree_volume(tree)}
    arguments = [o.format(**values) for o in case.overrides]
    if case.tool == "train":  # Hydra's flags (-m) before the overrides
        flags = [a for a in arguments if a.startswith("-")]
        command = base_command(tree, tmp / "run")
        command = command[:2] + flags + command[2:] + [a for a in arguments if a not in flags]
    else:
        command = [sys.executable, "-m", f"seg.tools.{case.tool}", *arguments]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", **case.env})
    output = result.stdout + result.stderr
    return Outcome(result.returncode, message_of(result, case.expect), output)


def message_of(result: subprocess.CompletedProcess, expect: str = "") -> str:
    """The one line the user reads: the first ``error:`` line (without the prefix); else the first line that
    says what ``expect`` looks for (a ``warning:``, or a tool's result); else Hydra's first lines."""
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    for line in lines:
        if expect and expect in line:
            return line.strip()
    hydra = [line for line in lines if not line.startswith(("Set the environment", "Traceback", "  "))]
    return " ".join(hydra[:3]) if hydra else "(no message)"
