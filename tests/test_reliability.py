"""Reliability: exact resume after SIGKILL, SIGTERM and SIGINT, a finished run's exit code kept whatever signal
comes while it exits, a checkpoint set consistent at every instant, resumes that cannot change a run, run folders
never shared, a full disk, and the table of bad inputs (every refusal one line, exit code 1)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bad_inputs import CASES, run_case  # the shared table of bad inputs (scripts/, on pytest's pythonpath)
from conftest import ROOT, run_train
from seg.runtime.checkpoint import (CheckpointError, RunState, check_free_space, last_record, load_checkpoint, restore_run,
                            save_checkpoint)
from seg.runtime.temporaries import TEMPORARY, host_name, remove_stale, temporary_path


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


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights_and_metrics(acdc_root, tmp_path, reference):
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.pt"
    for _attempt in range(3):  # the kill must land inside the run, after a mid-epoch checkpoint
        if kill_mid_run(resumable(acdc_root, killed), last) and last.exists():
            progress = load_checkpoint(last)["run_state"]
            if progress["batch"] > 0 and not (killed / "metrics.json").exists():
                break
        for leftover in (killed / "checkpoints").glob("*"):
            leftover.unlink()
    else:
        pytest.fail("could not kill the run in the middle of an epoch")
    assert progress["step"] < load_checkpoint(reference / "checkpoints" / "last.pt")["run_state"]["step"]

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


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_norm(acdc_root, tmp_path):
    run_train(*resumable(acdc_root, tmp_path / "bn", "norm=bn", "trainer.epochs=1"))
    result = run_train(*resumable(acdc_root, tmp_path / "bn", "norm=gn", "norm.groups=4", "trainer.epochs=1",
                                  "trainer.resume=true"), check=False)
    assert result.returncode == 1
    assert "is from a different run" in result.stderr and "norm.name: checkpoint 'bn', this run 'gn'" in result.stderr
    # a named run folder without a checkpoint starts fresh there, even beside a finished run of the same command
    run_train(*resumable(acdc_root, tmp_path / "done", "trainer.epochs=1"))
    fresh = run_train(*resumable(acdc_root, tmp_path / "new", "trainer.resume=true", "trainer.epochs=1"))
    assert "starting fresh" in fresh.stdout and (tmp_path / "new" / "checkpoints" / "last.pt").exists()
    assert json.loads((tmp_path / "new" / "metrics.json").read_text())["resumed_from"] is None
    missing = run_train(*resumable(acdc_root, tmp_path / "other", f"trainer.resume={tmp_path / 'nowhere'}"),
                        check=False)
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr


def test_last_pt_holds_the_run_state_and_an_older_last_pt_still_resumes(tmp_path):
    """last.pt saves where the run stands as ``run_state`` (format 3); a last.pt of formats 1-2, which called it
    ``progress``, restores the same RunState."""
    def live():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.2)
        return model, optimizer, scheduler, torch.Generator().manual_seed(3)

    model, optimizer, scheduler, generator = live()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = RunState(epoch=2, batch=3, order=torch.tensor([4, 0, 2, 1, 3]), step=8, epoch_losses=[0.5, 0.25],
                     history=[{"epoch": 1, "lr": 0.1}], best_dice=0.75, best_epoch=1, train_time=2.5,
                     train_time_before_epoch=1.5)
    last = tmp_path / "last.pt"
    save_checkpoint(last, last_record(model, optimizer, scheduler, generator, state, {"seed": 0}, [],
                                      model.state_dict(), None))
    saved = load_checkpoint(last)
    assert saved["format_version"] == 3 and "progress" not in saved and saved["run_state"]["step"] == 8
    older = dict(saved, format_version=2, progress=saved["run_state"])
    del older["run_state"]
    save_checkpoint(tmp_path / "older.pt", older)
    for path in (last, tmp_path / "older.pt"):
        fresh = live()
        restored, best = restore_run(path, *fresh)
        for key, value in state.record().items():
            assert torch.equal(getattr(restored, key), value) if key == "order" else getattr(restored, key) == value
        assert fresh[1].param_groups[0]["lr"] == pytest.approx(0.02) and torch.equal(best["weight"], model.weight)
        assert torch.equal(fresh[0].weight, model.weight) and fresh[3].get_state().equal(generator.get_state())


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
    from seg.runtime.runs import check_writable

    with pytest.raises(CheckpointError, match="cannot write to the output folder"):
        check_writable(blocker / "run")


# ---------------------------------------------------------------------------- helpers of the tests below

DEAD_PID = 4_194_303  # above Linux's default pid_max of 32-bit systems' 32768 and at 64-bit's limit: not a live process


def files_of(folder):
    """{relative path: bytes} of every file under ``folder``: to show that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(overrides, cwd=ROOT, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return path.exists()


def signal_when(path, overrides, sig, **kwargs):
    """Start train.py, send ``sig`` as soon as ``path`` exists; (exit code, stdout, stderr)."""
    process = start(overrides, **kwargs)
    if wait_for(path, process):
        process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def assert_same_weights(run_dir, reference_dir):
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    expected = load_checkpoint(reference_dir / "checkpoints" / "last.pt")["model"]
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key  # bit for bit


def test_every_writer_names_its_temporary_so_that_the_next_run_can_remove_it(tmp_path):
    """Checkpoints, metrics.json, predicted label maps and ONNX files are written under seg.runtime.temporaries' one
    naming (host, pid, a token; the extension kept where the writer needs it); a dead writer's is removed,
    a live one's kept."""
    for target, options in (("best.pt", {"hidden": True}), ("metrics.json", {"hidden": True}),
                            ("case_0001.nii.gz", {"hidden": True, "keep_suffix": ".nii.gz"}),
                            ("model.onnx", {"hidden": True, "keep_suffix": ".onnx"})):
        live = temporary_path(tmp_path / target, **options)
        match = TEMPORARY.match(live.name)
        assert live.name.startswith(".") and match and int(match["pid"]) == os.getpid(), live.name
        assert live.name.endswith(options.get("keep_suffix", match["token"]))
        dead = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{DEAD_PID}-"))
        live.write_bytes(b"being written")
        dead.write_bytes(b"half a file")
        assert remove_stale(tmp_path) == [dead] and live.exists()
        live.unlink()


@pytest.fixture(scope="module")
def reference(acdc_root, tmp_path_factory):
    """The uninterrupted run that interrupted and resumed runs must end identical to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(*resumable(acdc_root, run_dir))
    return run_dir


# ---------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_the_step_and_resume_is_bit_exact(acdc_root, tmp_path, reference, sig):
    """Slurm preemption, scancel or Ctrl-C: the step in progress finishes, last.pt and metrics.json
    (interrupted) are written, one line says so, exit code 75; resuming ends bit for bit like the
    uninterrupted run."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    for _attempt in range(3):  # the signal must land mid-epoch (after the first checkpoint, at step 2)
        code, out, err = signal_when(last, resumable(acdc_root, run), sig)
        assert code == 75, f"exit code {code}\n{out}\n{err}"
        assert "Traceback" not in err + out
        lines = [line for line in (out + err).splitlines() if "Interrupted by" in line]
        assert len(lines) == 1 and f"Interrupted by {sig.name} at epoch" in lines[0] and "trainer.resume=true" in lines[0]
        progress = load_checkpoint(last)["run_state"]
        if progress["batch"] > 0:
            break
        shutil.rmtree(run)
    else:
        pytest.fail("the signal never landed in the middle of an epoch")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == sig.name
    assert metrics["steps"] == progress["step"] > 2  # the step in progress was finished and saved
    assert not list(run.rglob("*.tmp*"))

    resumed = run_train(*resumable(acdc_root, run, "trainer.resume=true"))
    assert "Resuming" in resumed.stdout
    assert_same_weights(run, reference)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    for key in ("status", "dice", "dice_2d", "best_val_dice", "steps", "best_epoch"):
        assert ours[key] == theirs[key], key
    assert [h["train_loss"] for h in ours["history"]] == [h["train_loss"] for h in theirs["history"]]


@pytest.mark.slow
def test_ctrl_c_before_training_starts_is_one_line_without_a_traceback(tmp_path):
    process = start(["experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"])
    time.sleep(1.0)  # Python is importing torch
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 75, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "Interrupted by SIGINT before training started; nothing to save, run the same command again (exit code 75)"]


def pause_in_teardown(folder, where, seconds=3):
    """Make train.py, once its work is done, write ``folder/paused`` and wait ``seconds`` there, so that a signal lands in its
    teardown: at the end of Hydra's job (``where="job_end"``, a callback) or in the interpreter's last exit handler
    (``where="exit"``, a sitecustomize registering it first, so it is called last). The hook lives in the test's
    folder only; the overrides and the environment (PYTHONPATH) that install it are returned."""
    hooks = folder / "hooks"
    hooks.mkdir()
    pause = ("def pause(*args, **kwargs):\n"
             "    import pathlib, time\n"
             f"    pathlib.Path({str(folder / 'paused')!r}).touch()\n"
             f"    time.sleep({seconds})\n")
    if where == "exit":
        (hooks / "sitecustomize.py").write_text(f"import atexit\n{pause}atexit.register(pause)\n")
        overrides = []
    else:
        (hooks / "pause_hook.py").write_text(f"from hydra.experimental.callback import Callback\n{pause}"
                                             f"class AtJobEnd(Callback):\n    on_job_end = pause\n")
        overrides = ["+hydra.callbacks.pause._target_=pause_hook.AtJobEnd"]
    return overrides, {"PYTHONPATH": str(hooks)}


def assert_finished_quietly(paused, code, out, err, sig, what):
    """The signal was sent in the pause; exit code 0, no traceback, at most the one line saying that the work had
    already finished."""
    assert paused.exists(), f"the process never paused in its teardown (exit code {code})\n{out}\n{err}"
    assert code == 0, f"exit code {code}\n{out}\n{err}"
    assert "Traceback" not in err + out and "Interrupted" not in err + out, err
    assert [line for line in err.splitlines() if sig.name in line] in (
        [], [f"{sig.name} after the {what} had finished: nothing to stop; it exits as it would have (a second one: "
             f"at once)"]), err


@pytest.mark.slow
@pytest.mark.parametrize(("where", "sig"), [("job_end", signal.SIGINT), ("exit", signal.SIGINT), ("exit", signal.SIGTERM)],
                         ids=["SIGINT-at-job-end", "SIGINT-at-exit", "SIGTERM-at-exit"])
def test_a_signal_after_the_run_finished_leaves_its_exit_code_0(acdc_root, tmp_path, where, sig):
    """Ctrl-C or SIGTERM while a finished run's process exits (Hydra's cleanup, the interpreter's exit): the run is
    complete, so the process exits 0 as it would have, not 75 (which asks to run it again) nor killed by the
    signal."""
    run = tmp_path / "run"
    overrides, env = pause_in_teardown(tmp_path, where)
    code, out, err = signal_when(tmp_path / "paused", ["experiment=smoke", "data=acdc", f"data.root={acdc_root}",
                                                       "trainer.progress=false", f"hydra.run.dir={run}", *overrides],
                                 sig, env=env)
    assert_finished_quietly(tmp_path / "paused", code, out, err, sig, "run")
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_second_ctrl_c_after_the_run_finished_ends_a_slow_teardown_at_once(acdc_root, tmp_path):
    """The first Ctrl-C in a finished run's teardown is noted; a second one ends a teardown that takes long (here a
    Hydra callback of 60 s) at once, with exit code 0: the run's files are complete."""
    run = tmp_path / "run"
    overrides, env = pause_in_teardown(tmp_path, "job_end", seconds=60)
    process = start(["experiment=smoke", "data=acdc", f"data.root={acdc_root}", "trainer.progress=false",
                     f"hydra.run.dir={run}", *overrides], env=env)
    assert wait_for(tmp_path / "paused", process), process.communicate()
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)  # well before the callback's 60 s
    assert_finished_quietly(tmp_path / "paused", process.returncode, out, err, signal.SIGINT, "run")
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_signal_after_a_sweep_finished_leaves_its_exit_code_0(acdc_root, tmp_path):
    """The same for a sweep, once its last job and its summary are done (between jobs a signal stops the sweep)."""
    sweep = tmp_path / "sweep"
    overrides, env = pause_in_teardown(tmp_path, "exit")
    code, out, err = signal_when(tmp_path / "paused", ["-m", "experiment=smoke", "data=acdc", f"data.root={acdc_root}",
                                                       "norm=bn", "trainer.progress=false", f"hydra.sweep.dir={sweep}"],
                                 signal.SIGINT, env=env)
    assert_finished_quietly(tmp_path / "paused", code, out, err, signal.SIGINT, "sweep")
    assert [json.loads(m.read_text())["status"] for m in sweep.glob("*/metrics.json")] == ["ok"]
    assert (sweep / "summary.md").exists()


# ---------------------------------------------------------------------------- the checkpoint set


@pytest.mark.slow
def test_a_run_without_its_best_pt_resumes_without_a_traceback(acdc_root, tmp_path):
    """The state a kill between writing last.pt and best.pt leaves (or a user who deleted best.pt), with
    the killed writers' temporaries: resuming rebuilds best.pt from last.pt and removes the temporaries."""
    run = tmp_path / "run"
    run_train(*resumable(acdc_root, run, "trainer.epochs=2"))
    finished = json.loads((run / "metrics.json").read_text())
    (run / "checkpoints" / "best.pt").unlink()
    (run / "metrics.json").unlink()
    (run / "checkpoints" / f".best.pt.tmp-{host_name()}-{DEAD_PID}-0badc0de").write_bytes(b"half a checkpoint")
    (run / f".metrics.json.tmp-{host_name()}-{DEAD_PID}-0badc0de").write_bytes(b"")
    (run / "metrics.json.tmp").write_bytes(b"")  # a shared name: the folder's lock says no writer is left

    result = run_train(*resumable(acdc_root, run, "trainer.epochs=2", "trainer.resume=true"))
    assert "Traceback" not in result.stderr and "Rebuilt" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["dice"] == finished["dice"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_epoch"] == finished["best_epoch"] and best["config"]["norm"]["name"] == "iln"
    assert not [p for p in run.rglob("*") if "tmp" in p.name]


# ---------------------------------------------------------------------------- what a resume may change


@pytest.mark.slow
def test_resume_refuses_a_change_to_a_key_that_defines_the_run(acdc_root, tmp_path):
    run = tmp_path / "run"
    run_train(*resumable(acdc_root, run, "trainer.epochs=1"))
    before = files_of(run)
    changed = run_train(*resumable(acdc_root, run, "trainer.epochs=1", "trainer.resume=true", "lr=0.3",
                                   "optim.momentum=0.5", "seed=1", "trainer.batch_size=1", "data.spacing=3.0"),
                        check=False)
    assert changed.returncode == 1 and "Traceback" not in changed.stderr, changed.stderr
    for difference in ("lr: checkpoint 0.1, this run 0.3", "optim.momentum: checkpoint 0.9, this run 0.5",
                       "seed: checkpoint 0, this run 1", "trainer.batch_size: checkpoint 2, this run 1",
                       "data.spacing: checkpoint 6.0, this run 3.0"):
        assert difference in changed.stderr
    assert files_of(run) == before  # the run, its record and its metrics are untouched

    # where and how it runs may change
    same = run_train(*resumable(acdc_root, run, "trainer.epochs=1", "trainer.resume=true", "trainer.device=cpu",
                                "trainer.log_every_n_steps=3", "trainer.num_panel_images=1",
                                "trainer.eval_batch_size=4", "trainer.checkpoint_every_n_steps=0"))
    assert "Resuming" in same.stdout


# ---------------------------------------------------------------------------- run folders


def test_a_claimed_run_folder_is_never_given_twice(tmp_path):
    from seg.runtime.runs import claim_new

    base = tmp_path / "outputs" / "2024-01-01" / "12-00-00_bn_lr0.1_seed0"
    claimed = [claim_new(base) for _ in range(3)]
    assert [p.name for p in claimed] == [base.name, f"{base.name}_2", f"{base.name}_3"]


@pytest.mark.slow
def test_runs_started_together_never_share_a_folder(data_dir, tmp_path):
    """Two identical commands and another seed, started at once in one working directory (Hydra names
    their folders by the second they started in)."""
    commands = [["seed=0"], ["seed=0"], ["seed=1"]]
    processes = [start(["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
                        "trainer.progress=false", *extra], cwd=tmp_path) for extra in commands]
    results = [(p, *p.communicate(timeout=600)) for p in processes]
    for process, out, err in results:
        assert process.returncode == 0, out + err
    folders = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.json"))
    assert len(folders) == 3, folders
    assert sorted(json.loads((f / "metrics.json").read_text())["seed"] for f in folders) == [0, 0, 1]
    for folder in folders:  # each folder's record is its own run's
        seed = json.loads((folder / "metrics.json").read_text())["seed"]
        assert f"seed={seed}" in (folder / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_a_folder_that_holds_a_run_is_never_trained_over(acdc_root, tmp_path):
    run = tmp_path / "run"
    run_train(*resumable(acdc_root, run, "trainer.epochs=1"))
    before = files_of(run)
    again = run_train(*resumable(acdc_root, run, "trainer.epochs=1", "seed=1"), check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"hydra.run.dir={run} already holds a run's checkpoint" in again.stderr
    assert files_of(run) == before  # .hydra/ included: refused before Hydra writes anything


@pytest.mark.slow
def test_a_folder_in_use_by_a_live_run_is_refused(acdc_root, tmp_path):
    run = tmp_path / "run"
    first = start(resumable(acdc_root, run, "trainer.epochs=500"))  # alive for as long as the second one needs
    assert wait_for(run / "checkpoints" / "last.pt", first)
    second = run_train(*resumable(acdc_root, run, "trainer.epochs=500", "trainer.resume=true"), check=False)
    assert second.returncode == 1 and f"run folder {run} is in use by another run (pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGTERM)  # the first run goes on undisturbed until stopped, and saves
    out, err = first.communicate(timeout=300)
    assert first.returncode == 75, out + err
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_resuming_another_runs_checkpoint_never_writes_into_it(acdc_root, tmp_path):
    a = tmp_path / "A"
    run_train(*resumable(acdc_root, a, "trainer.epochs=1"))
    before = files_of(a)
    into_b = run_train(*resumable(acdc_root, tmp_path / "B", "trainer.epochs=1",
                                  f"trainer.resume={a / 'checkpoints' / 'best.pt'}"), check=False)
    assert into_b.returncode == 1 and "Traceback" not in into_b.stderr
    assert f"continues the run in {a}, in its own folder" in into_b.stderr
    rewind = run_train(*resumable(acdc_root, a, "trainer.epochs=1", f"trainer.resume={a / 'checkpoints' / 'best.pt'}"),
                       check=False)
    assert rewind.returncode == 1 and "would rewind the run" in rewind.stderr
    assert files_of(a) == before and not (tmp_path / "B").exists()

    # named by its folder, without hydra.run.dir: run A continues in place, and no other folder appears
    work = tmp_path / "cwd"
    work.mkdir()
    overrides = [o for o in resumable(acdc_root, a, "trainer.epochs=1") if not o.startswith("hydra.run.dir")]
    continued = run_train(*overrides, f"trainer.resume={a}", cwd=work)
    assert f"Resuming {a}" in continued.stdout and not list(work.iterdir())


# ---------------------------------------------------------------------------- a full disk


@pytest.mark.slow
@pytest.mark.parametrize("limit_kib", [8, 64])
def test_a_full_disk_mid_run_ends_in_one_line_and_keeps_the_checkpoint(acdc_root, tmp_path, limit_kib):
    """Files may not grow beyond ``limit_kib`` (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as
    on a full disk): at 8 KiB TensorBoard's writer thread fails first, at 64 KiB the checkpoint write. (Hydra
    writes its .hydra/hydra.yaml first, about 4 KiB with the test's temporary paths in it: the limits leave
    room for it.)"""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    assert kill_mid_run(resumable(acdc_root, run), last) and last.exists()
    before = last.read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kib * 1024, limit_kib * 1024))

    result = subprocess.run([sys.executable, str(ROOT / "train.py"),
                             *resumable(acdc_root, run, "trainer.resume=true", "trainer.checkpoint_every_n_steps=0")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: could not write"), errors
    assert "intact" in errors[0]
    assert last.read_bytes() == before  # the previous checkpoint
    assert not [p for p in run.rglob("*") if "tmp" in p.name]  # no temporaries, 0-byte or not
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------- the bad-input table


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_bad_input_is_refused_in_one_line(case, tmp_path_factory):
    """Each case of the shared table (scripts/bad_inputs.py, also behind docs/results/bad_inputs.md): refused with
    exit code 1 and one line, or (``exit_code`` 0) going on with the line it must print."""
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    outcome = run_case(case, tmp_path_factory.getbasetemp() / "bad_inputs", CASES.index(case))
    assert outcome.returncode == case.exit_code, outcome.output
    assert case.expect in outcome.message, outcome.output
    assert "Traceback" not in outcome.output


@pytest.mark.slow
def test_the_same_command_with_resume_true_continues_its_last_run_in_place(data_dir, tmp_path):
    """Hydra names the folders (by the second they started in): trainer.resume=true finds the earlier folder
    of the same run -- not one of another run beside it -- and continues there, making no new folder."""
    command = ["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
               "trainer.progress=false", "trainer.epochs=1"]
    run_train(*command, "seed=1", cwd=tmp_path)  # another run beside it
    run_train(*command, cwd=tmp_path)
    folders = sorted((tmp_path / "outputs").glob("*/*"))
    again = run_train(*command, "trainer.resume=true", "trainer.progress=true", cwd=tmp_path)
    ours = next(f for f in folders if f.name.endswith("_seed0"))
    assert f"Continuing the run in {ours.relative_to(tmp_path)}" in again.stdout and "Resuming" in again.stdout
    assert sorted((tmp_path / "outputs").glob("*/*")) == folders


@pytest.mark.slow
def test_sweeps_started_together_never_share_a_folder(data_dir, tmp_path):
    """Two identical sweeps started at once in one working directory (Hydra names a sweep's folder by the
    second it started in): each gets a folder of its own, with its job and its summary."""
    sweep = ["-m", "experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
             "trainer.progress=false", "norm=bn"]
    processes = [start(sweep, cwd=tmp_path) for _ in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out + err
    sweeps = sorted(p.parent for p in (tmp_path / "multirun").glob("*/*/summary.md"))
    assert len(sweeps) == 2, sweeps
    for folder in sweeps:
        jobs = list(folder.glob("*/metrics.json"))
        assert len(jobs) == 1 and json.loads(jobs[0].read_text())["status"] == "ok"


def test_a_checkpoint_from_before_a_key_existed_resumes_while_the_key_keeps_its_default():
    """A key added to the schema later (data.augment.gamma, ...) is absent from an older checkpoint's configuration:
    at its default it computes what the older run computed, so it is no difference; set to anything else it is."""
    from seg.config.identity import identity_differences, schema_defaults

    defaults = schema_defaults()
    current = {"lr": 0.1, "data": {"augment": {"rotate_deg": 15.0, "gamma": {"p": None, "range": [0.7, 1.5]}}}}
    saved = {"lr": 0.1, "data": {"augment": {"rotate_deg": 15.0}}}
    assert defaults["data.augment.gamma.p"] is None
    assert identity_differences(saved, current) == []
    current["data"]["augment"]["gamma"]["p"] = 0.3
    assert identity_differences(saved, current) == ["data.augment.gamma.p: checkpoint <absent>, this run 0.3"]
    assert identity_differences(current, saved) != []  # the newer checkpoint's key, absent from this run, still differs
