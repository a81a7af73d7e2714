"""Speed and scale: bf16 and torch.compile, data-parallel training under torchrun (gloo, 2 CPU
processes), synchronized batch statistics, and sweeps through Hydra's joblib and submitit launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, compose_train, run_train
from seg.data.augmentations import Augmentation
from seg.training.augment import augment_batch
from seg.training.checks import ConfigError, validate
from seg.config.launch import register_configs
import seg.runtime.device as runtime
from seg.runtime.distributed import World
from seg.runtime.device import sweep_gpu
from seg.norms import make_norm, names, spec
from seg.model.unet import UNet

register_configs()

# A run that learns in seconds: 6 phantom patients at 64x64 (3 mm), LV, 6 epochs of 9 steps of 2
# slices. Group norm, so that the runs compared below have no batch statistics whose rounding
# the chaotic first steps of small-batch BN would amplify (see test_sync_...).
LEARNS = ["experiment=smoke", "data.phantom.num_patients=6", "data.spacing=3.0", "data.task=lv", "norm=gn",
          "norm.groups=4", "lr=0.3", "trainer.epochs=6", "schedule.milestones=[100]", "trainer.progress=false"]


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference: one process, batch 2, fp32, eager."""
    run_dir = tmp_path_factory.mktemp("one_process")
    run_train(*LEARNS, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}")
    return metrics_of(run_dir)


def assert_same_training(ours, reference, dice_tolerance):
    assert ours["status"] == reference["status"] == "ok"
    assert reference["dice"] > 0.5  # the reference learns: equal Dice means something
    for key in ("dice", "dice_2d", "best_val_dice"):
        assert ours[key] == pytest.approx(reference[key], abs=dice_tolerance), key
    assert [h["train_loss"] for h in ours["history"]] == pytest.approx(
        [h["train_loss"] for h in reference["history"]], rel=1e-3)


# ---------------------------------------------------------------------------- data parallel


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_process_with_the_global_batch(data_dir, tmp_path, one_process):
    """2 ranks x batch 1 = 1 process x batch 2: the same global batches and augmentation, averaged
    gradients, sharded evaluation with summed counts; one run folder (no hydra.run.dir given:
    the ranks agree on Hydra's time-stamped one), written by rank 0 alone."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(ROOT / "train.py"), *LEARNS, f"paths.data_dir={data_dir}", "trainer.batch_size=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks composed the same folder
    run_dir = runs[0]
    assert result.stdout.count("test Dice, 3D per volume") == 1  # rank 1 prints nothing
    assert "2 processes (DDP), batch 1 each" in result.stdout

    metrics = metrics_of(run_dir)
    assert metrics["world_size"] == 2 and metrics["batch_size"] == 1
    assert_same_training(metrics, one_process, dice_tolerance=0.01)
    assert metrics["num_train_slices"] == one_process["num_train_slices"]

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    steps = EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")
    assert [s.step for s in steps] == list(range(1, metrics["steps"] + 1))  # one writer: each step once


def test_each_rank_takes_its_share_of_every_global_batch():
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    one = World().batches(order, 2)
    assert [b.tolist() for b in one] == [b.tolist() for b in order.split(2)]  # one process: unchanged

    ranks = [World(rank, 2).batches(order, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 7 samples padded to 8: global batches of 4
    padded = torch.cat([order, order[:1]])
    for step, global_batch in enumerate(padded.split(4)):
        shares = [ranks[rank][step] for rank in range(2)]
        assert len(shares[0]) == len(shares[1])
        assert sorted(torch.cat(shares).tolist()) == sorted(global_batch.tolist())
    assert set(torch.cat([*ranks[0], *ranks[1]]).tolist()) == set(order.tolist())  # every sample seen


def test_ranks_augment_their_rows_as_one_process_augments_the_global_batch():
    images, labels = torch.randn(6, 1, 16, 16), torch.randint(0, 3, (6, 16, 16), dtype=torch.uint8)
    options = {"augmentation": Augmentation(15.0, True)}
    whole = augment_batch(images, labels, generator=torch.Generator().manual_seed(1), **options)
    for rank in range(3):
        part = augment_batch(images[rank::3], labels[rank::3], generator=torch.Generator().manual_seed(1),
                             shard=(rank, 3), **options)
        torch.testing.assert_close(part[0], whole[0][rank::3])
        assert torch.equal(part[1], whole[1][rank::3])


# ---------------------------------------------------------------------------- synchronized statistics


def sync_worker(rank, world_size, store):
    """One rank: sync bn and bin on its half of a batch against the plain layer on the whole batch."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 2 + 3
        upstream = torch.randn_like(x)
        for name in names(can_sync=True):
            whole = make_norm(name, 6).double()
            if name == "bin":
                with torch.no_grad():
                    whole.rho.copy_(torch.linspace(0, 1, 6))  # BN and IN parts both count
            synced = make_norm(name, 6, sync=True).double()
            synced.load_state_dict(whole.state_dict())
            for layer in (synced, torch.compile(synced, backend="aot_eager")):  # eager, then compiled
                x_whole, x_mine = x.clone().requires_grad_(), x[rank::2].clone().requires_grad_()
                whole.zero_grad(), synced.zero_grad()
                y_whole, y_mine = whole(x_whole), layer(x_mine)
                torch.testing.assert_close(y_mine, y_whole[rank::2])
                (y_whole * upstream).sum().backward()
                (y_mine * upstream[rank::2]).sum().backward()
                torch.testing.assert_close(x_mine.grad, x_whole.grad[rank::2])  # through the shared statistics
                for (key, mine), theirs in zip(synced.named_parameters(), whole.parameters()):
                    total = mine.grad.clone()
                    dist.all_reduce(total)  # what DDP averages, times 2
                    torch.testing.assert_close(total, theirs.grad, msg=f"{name} {key}")
                for key in ("running_mean", "running_var"):
                    torch.testing.assert_close(getattr(synced, key), getattr(whole, key), msg=f"{name} {key}")
            synced.eval(), whole.eval()
            torch.testing.assert_close(synced(x[rank::2]), whole(x)[rank::2])
            torch._dynamo.reset()
            explained = torch._dynamo.explain(synced.train())(x[rank::2])
            assert explained.graph_break_count == 0, (name, explained.break_reasons)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_layers_on_two_processes_are_the_layer_on_the_global_batch(tmp_path):
    """norm.sync=true, for every layer of ``names(can_sync=True)`` (bn, bin): outputs, input and parameter
    gradients and running statistics of 2 ranks with half a batch each equal those of one layer on the
    whole batch (float64, gloo, eager and compiled)."""
    torch.multiprocessing.spawn(sync_worker, args=(2, tmp_path / "store"), nprocs=2)


def test_sync_is_refused_for_layers_that_cannot_synchronize():
    with pytest.raises(ConfigError, match="norm.sync is not available for norm=sn: .* exists for bin, bn"):
        validate(compose_train("norm=sn", "+norm.sync=true"))
    validate(compose_train("norm=bin", "norm.sync=true"))


# ---------------------------------------------------------------------------- precision and compilation


@pytest.mark.slow
def test_compiled_training_matches_eager(data_dir, tmp_path, one_process):
    """trainer.compile=true (aot_eager: torch.compile's tracing without code generation, which takes
    minutes on CPU) trains like the eager run, and the model call is one graph: no graph break."""
    run_train(*LEARNS, f"paths.data_dir={data_dir}", "trainer.compile=true", "trainer.compile_backend=aot_eager",
              f"hydra.run.dir={tmp_path}")
    metrics = metrics_of(tmp_path)
    assert metrics["compile"] is True and metrics["graph_breaks"] == 0
    assert_same_training(metrics, one_process, dice_tolerance=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_every_norm_compiles_to_one_graph_in_a_training_step(name):
    """What trainer.compile=true with precision=bf16 traces: the U-Net in training mode, channels_last,
    under autocast. One graph and no graph break for every layer."""
    torch._dynamo.reset()
    small = {"groups": 4, "hidden": 8}  # fewer groups, a narrower modulation network: quicker to trace
    options = {key: value for key, value in small.items() if key in spec(name).options}
    model = UNet(norm=name, depth=2, norm_options=options, num_domains=2)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    domain = torch.tensor([0, 1])  # the trainer's call: every image's domain id, the auxiliary output too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, domain, with_aux=True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_bf16_training_learns(data_dir, tmp_path, one_process):
    run_train(*LEARNS, f"paths.data_dir={data_dir}", "trainer.precision=bf16", f"hydra.run.dir={tmp_path}")
    metrics = metrics_of(tmp_path)
    assert metrics["status"] == "ok" and metrics["precision"] == "bf16" and one_process["precision"] == "fp32"
    assert metrics["dice"] > 0.5 and metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


@pytest.mark.slow
def test_bad_precision_backend_and_unsupported_compile_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="trainer.precision='fp8' is not valid; choose one of: auto, fp32, bf16"):
        validate(compose_train("trainer.precision=fp8"))
    with pytest.raises(ConfigError, match="trainer.compile_backend='fast' is not a torch.compile backend"):
        validate(compose_train("trainer.compile=true", "trainer.compile_backend=fast"))
    # inductor on CPU without a C++ compiler: refused before any work
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.device=cpu",
                             "trainer.compile=true", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("error: trainer.compile=true: the inductor backend needs a C++ compiler on the CPU and found none "
            f"(CXX={tmp_path / 'no-such-compiler'})") in result.stderr
    assert "Data:" not in result.stdout


# ---------------------------------------------------------------------------- sweeps through launchers


def test_parallel_sweep_jobs_each_claim_a_gpu_of_their_own(tmp_path, monkeypatch):
    """A job's process locks the first free GPU's file and keeps it; a second open file of the same
    lock conflicts like another process would, so each reset of the claim plays a new process."""
    gpus = ["gpu-a", "gpu-b", "gpu-c"]
    held = []
    for expected in (0, 1, 2):
        monkeypatch.setattr(runtime, "_gpu_claim", None)  # another worker process
        assert sweep_gpu(7, gpus, tmp_path) == expected
        held.append(runtime._gpu_claim[1])
        assert sweep_gpu(8, gpus, tmp_path) == expected  # a worker keeps its GPU for its next job
    monkeypatch.setattr(runtime, "_gpu_claim", None)
    assert sweep_gpu(7, gpus, tmp_path) == 7 % 3  # more parallel jobs than GPUs: shared by job number
    held[1].close()  # that worker ended: its GPU is free again
    assert sweep_gpu(7, gpus, tmp_path) == 1
    runtime._gpu_claim[1].close()
    for handle in held:
        handle.close()
    assert sweep_gpu(5, ["the-only-gpu"], tmp_path) == 0


def sweep(data_dir, sweep_dir, launcher, *extra):
    return run_train("-m", f"hydra/launcher={launcher}", *extra, "experiment=smoke", f"paths.data_dir={data_dir}",
                     "data.phantom.num_patients=6", "trainer.progress=false", "norm=bn,gn",
                     f"hydra.sweep.dir={sweep_dir}")


def assert_two_jobs_ran(sweep_dir):
    runs = sorted(sweep_dir.glob("*/metrics.json"))
    assert [metrics_of(r.parent)["norm"] for r in runs] == ["bn", "gn"]
    assert all(metrics_of(r.parent)["status"] == "ok" for r in runs)
    assert "| bn |" in (sweep_dir / "summary.md").read_text()  # the end-of-sweep callback ran


@pytest.mark.slow
def test_joblib_sweep_one_job_per_gpu(data_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = compose_train("hydra/launcher=gpus", hydra=True).hydra.launcher
    assert launcher.n_jobs == max(torch.cuda.device_count(), 1)  # as many parallel jobs as GPUs
    sweep(data_dir, tmp_path, "gpus", "hydra.launcher.n_jobs=2")  # two side by side, here on the CPU
    assert_two_jobs_ran(tmp_path)


@pytest.mark.slow
def test_submitit_local_sweep(data_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep(data_dir, tmp_path, "submitit_local", "hydra.launcher.timeout_min=10")
    assert_two_jobs_ran(tmp_path)
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))  # each job ran as a submitit job
    slurm = compose_train("hydra/launcher=slurm", hydra=True).hydra.launcher
    assert (slurm.gpus_per_node, slurm.timeout_min) == (1, 240) and "partition" in slurm


def test_the_slurm_launcher_requeues_a_preempted_or_timed_out_job():
    """submitit checkpoints (our launcher's jobs save and stop on its signal) and requeues; max_num_timeout
    lets a job that hits its time limit come back that many times (preemption does not count)."""
    slurm = compose_train("hydra/launcher=slurm", hydra=True).hydra.launcher
    assert slurm.max_num_timeout >= 1 and slurm.signal_delay_s >= 60


def submitit_task(sweep_dir):
    """The pid of the submitit task (the process that runs the job) of a sweep on this machine."""
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                command = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in command and any(str(sweep_dir).encode() in part for part in command):
                return int(proc)
    return None


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_by_itself(data_dir, tmp_path):
    """submitit's preemption signal (SIGUSR2) mid-epoch: the job saves after its step, submitit requeues it,
    and the requeued job -- the same command, trainer.resume not set -- continues from its last.pt and
    ends bit for bit like an uninterrupted run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    run = ["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6", "trainer.progress=false",
           "norm=gn", "norm.groups=4", "trainer.epochs=3", "trainer.checkpoint_every_n_steps=2",
           "trainer.deterministic=true"]
    run_train(*run, f"hydra.run.dir={tmp_path / 'reference'}")

    sweep_dir = tmp_path / "sweep"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                                "hydra.launcher.timeout_min=20", *run, f"hydra.sweep.dir={sweep_dir}"],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    deadline = time.monotonic() + 300
    while not list(sweep_dir.glob("0_*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.002)
    task = submitit_task(sweep_dir)
    assert task is not None
    os.kill(task, signal.SIGUSR2)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err
    job = next(sweep_dir.glob("0_*"))
    log = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "Interrupted by SIGUSR2" in log and "Requeued job" in log, log
    metrics = metrics_of(job)
    assert metrics["status"] == "ok" and metrics["resumed_from"] == str(job / "checkpoints" / "last.pt")
    final = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
