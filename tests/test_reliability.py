"""Reliability: exact resume after SIGKILL, safe and atomic checkpoints, refusal of ones that don't fit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_train
from seg.checkpoint import CheckpointError, check_free_space, load_checkpoint, save_checkpoint


def resumable(acdc_root, run_dir, *extra):
    return ["experiment=smoke", "data=acdc", f"data.root={acdc_root}", "trainer.epochs=3", "norm=iln",
            "trainer.checkpoint_every_n_steps=2", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
            "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]


def kill_mid_run(overrides, checkpoint, timeout=120):
    """Start train.py, SIGKILL it as soon as its first mid-epoch checkpoint exists; True if killed mid-run."""
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_then_resume_gives_identical_weights_and_metrics(acdc_root, tmp_path):
    reference = tmp_path / "reference"
    run_train(*resumable(acdc_root, reference))

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.pt"
    for _attempt in range(3):  # the kill must land inside the run, after a mid-epoch checkpoint
        if kill_mid_run(resumable(acdc_root, killed), last) and last.exists():
            progress = load_checkpoint(last)["progress"]
            if progress["batch"] > 0 and not (killed / "metrics.json").exists():
                break
        for leftover in (killed / "checkpoints").glob("*"):
            leftover.unlink()
    else:
        pytest.fail("could not kill the run in the middle of an epoch")
    assert progress["step"] < load_checkpoint(reference / "checkpoints" / "last.pt")["progress"]["step"]

    resumed = run_train(*resumable(acdc_root, killed, "trainer.resume=true"))
    assert "Resuming" in resumed.stdout
    final, expected = load_checkpoint(last)["model"], load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key  # bit for bit
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (killed, reference))
    for key in ("dice", "dice_2d", "best_val_dice", "steps", "best_epoch"):
        assert ours[key] == theirs[key], key
    assert [h["train_loss"] for h in ours["history"]] == [h["train_loss"] for h in theirs["history"]]


def test_resume_refuses_a_checkpoint_of_another_norm(acdc_root, tmp_path):
    run_train(*resumable(acdc_root, tmp_path / "bn", "norm=bn", "trainer.epochs=1"))
    result = run_train(*resumable(acdc_root, tmp_path / "gn", "norm=gn", "norm.groups=4",
                                  f"trainer.resume={tmp_path / 'bn'}"), check=False)
    assert result.returncode == 1
    assert "is from a different model" in result.stderr and "norm.name: checkpoint 'bn', this run 'gn'" in result.stderr
    # a named run folder without a checkpoint starts fresh there, even beside a finished run of the same command
    run_train(*resumable(acdc_root, tmp_path / "done", "trainer.epochs=1"))
    fresh = run_train(*resumable(acdc_root, tmp_path / "new", "trainer.resume=true", "trainer.epochs=1"))
    assert "starting fresh" in fresh.stdout and (tmp_path / "new" / "checkpoints" / "last.pt").exists()
    assert json.loads((tmp_path / "new" / "metrics.json").read_text())["resumed_from"] is None
    missing = run_train(*resumable(acdc_root, tmp_path / "other", f"trainer.resume={tmp_path / 'nowhere'}"),
                        check=False)
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr


class Payload:
    """Not a tensor: loading it would mean unpickling arbitrary code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoints_never_unpickle_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    path.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": torch.tensor(1)})

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint, if any, is intact"):
        save_checkpoint(path, {"step": torch.tensor(2)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_and_unwritable_folder_are_refused_before_training(tmp_path):
    with pytest.raises(CheckpointError, match="MiB free on the disk"):
        check_free_space(tmp_path, 2**62)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    from seg.train import check_writable

    with pytest.raises(CheckpointError, match="cannot write to the output folder"):
        check_writable(blocker / "run")
