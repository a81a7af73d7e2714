"""The GPU check's steps, each run in its own process by scripts/gpu_check.py (``--run-step NAME``): what
each checks and measures, and the partial result it leaves when it is stopped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_wheels import project_requirements, run_pip


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts"
VERDICTS = ("pass", "fail", "skipped", "timed out")
COMPILED_NORMS = ("bn", "gn", "iln", "bin", "sn")  # the U-Net step compiled without a graph break
BENCH_NORMS = ("bn", "in", "gn", "bin", "iln", "sn", "cin", "adain")  # the layers whose throughput the check measures
FUSED = ("bin", "iln", "sn")  # the fused layers of the bandwidth targets
# tolerances, relative (max |a - b| / max |b| for the device against the CPU; ||a - b|| / ||b|| for bf16)
TOL_FLOAT64, TOL_FLOAT32 = 1e-6, 1e-3
TOL_BF16_OUT, TOL_BF16_GRAD = 3e-2, 6e-2
# the options that make a layer random in training, and the values that make it deterministic
DETERMINISTIC = {"dropout_p": 0.0, "noise": False}


# ---------------------------------------------------------------------------- the steps (each in its own process)


class Partial:
    """A step's result, saved after every part, so that a step stopped at its limit still reports what it did."""

    def __init__(self, path: Path):
        self.path = path
        self.result = {"verdict": "pass", "reason": "", "figures": {}, "details": []}

    def add(self, markdown: str) -> None:
        self.result["details"].append(markdown)
        self.save()

    def fail(self, reason: str) -> None:
        self.result["verdict"] = "fail"
        self.result["reason"] = "; ".join(filter(None, [self.result["reason"], reason]))
        self.save()

    def skip(self, reason: str) -> None:
        self.result.update(verdict="skipped", reason=reason)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_suffix(".part")
        with open(part, "w") as file:
            json.dump(self.result, file, indent=1, default=str)
        os.replace(part, self.path)  # whole or not at all: the step may be killed at its limit at any moment


def python_command(args: list[str], limit_s: float | None = None, cwd: Path = ROOT,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (this Python) with its output passed through; the completed process."""
    command = [sys.executable, *args]
    print("$ python " + " ".join(args), flush=True)
    return subprocess.run(command, cwd=cwd, env=env, timeout=limit_s)


def relative_max(a, b) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def relative_l2(a, b) -> float:
    scale = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / (scale if scale > 0 else 1.0)


def step_install(args, partial: Partial) -> None:
    if not args.wheels:
        partial.skip("no --wheels DIR: the dependencies are used as this Python has them, the checkout on PYTHONPATH")
        return
    wheels = args.wheels.resolve()
    own = sorted(wheels.glob("seg-*.whl"))
    if not own:
        partial.fail(f"{wheels}: no seg-*.whl (fill it with --fill-wheels)")
        return

    def torch_version() -> str:
        return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                              capture_output=True, text=True, cwd="/").stdout.strip()

    before = torch_version()
    constraints = partial.path.with_suffix(".constraints.txt")
    with open(constraints, "w") as file:  # pip's constraints file (no page): pip may not touch torch
        file.write(f"torch=={before.split()[0]}\n")
    requirements = project_requirements()
    common = ["install", "--no-index", "--find-links", str(wheels), "--only-binary=:all:", "--no-cache-dir",
              "--disable-pip-version-check"]
    deps = run_pip([*common, "-c", str(constraints), *requirements], check=False)
    print(deps.stdout[-3000:], deps.stderr[-3000:], flush=True)
    if deps.returncode != 0:
        partial.fail(f"pip install of the dependencies: exit code {deps.returncode}: "
                     f"{(deps.stderr.strip().splitlines() or ['no output'])[-1]}")
        return
    project = run_pip([*common, "--no-deps", "--force-reinstall", str(own[-1])], check=False)
    if project.returncode != 0:
        partial.fail(f"pip install of {own[-1].name}: {(project.stderr.strip().splitlines() or ['no output'])[-1]}")
        return
    after = torch_version()
    installed = [line for line in deps.stdout.splitlines() if line.startswith("Successfully installed")]
    partial.result["figures"] = {"torch_before": before, "torch_after": after,
                                 "installed": installed[0] if installed else "nothing new"}
    partial.add(f"- torch before: `{before}`; after: `{after}`\n- dependencies: "
                f"{installed[0] if installed else 'all already present'}\n- project: {own[-1].name}\n")
    if before != after:
        partial.fail(f"torch changed from {before} to {after}")
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import seg, seg.training.loop, monai, hydra, omegaconf, nibabel, pydicom, "
                            "tensorboard, hydra_plugins.hydra_joblib_launcher; print(seg.__file__)"],
                           capture_output=True, text=True, cwd="/", env=env)
    if probe.returncode != 0:
        partial.fail(f"the installed project does not import: {(probe.stderr.strip().splitlines() or [''])[-1]}")
    else:
        partial.add(f"- the installed project imports from `{probe.stdout.strip()}`\n")


def step_correctness(args, partial: Partial) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from bench_norms import bench_condition
    from harness import markdown_table
    from seg.evaluation.dice import slice_counts, summarize_counts
    from seg.norms import Condition, context_options, make_conv_norm, make_norm, names, spec
    from seg.training.step import TrainStep, train_step
    from seg.model.unet import UNet

    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions in float32 (TF32 would be a bf16-like 10 bits)
    torch.backends.cuda.matmul.allow_tf32 = False
    same = (" (the device is the CPU: it is compared with itself, the path is exercised only)"
            if device.type == "cpu" else "")
    shape = (2, 16, 16, 16) if args.quick else (4, 16, 64, 64)

    def cast(cond: Condition, dtype, to) -> Condition:
        fields = {k: getattr(cond, k) for k in ("image", "domain", "style", "regions", "region_codes", "aux_logits")}
        return Condition(**{k: None if v is None else (v.to(to, dtype) if v.is_floating_point() else v.to(to))
                            for k, v in fields.items()})

    def forward_backward(module, x, cond, grad, autocast=False):
        x = x.detach().clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = module(x, cond)
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y, [x, *params], grad.to(y.dtype))
        return y.float() if autocast else y, grads

    rows, failures = [], []
    for name in names():
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            x = torch.randn(*shape)
            cond = bench_condition(x)
            make, extra = (make_conv_norm, (shape[1], 3)) if spec(name).kind == "conv_pair" else (make_norm, ())
            # random in training (kn's dropout, sean's noise): off, so that two devices can agree
            options = {key: value for key, value in DETERMINISTIC.items() if key in spec(name).options}
            if spec(name).kind == "conditional":
                options.update(context_options(name, num_domains=4, num_regions=4))
            try:
                layer = make(name, shape[1], *extra, **options).train()
                for p in layer.parameters():  # not the identity initialisation: every parameter matters
                    p.data.add_(0.1 * torch.randn_like(p))
                grad = None

                def against_cpu(dtype):
                    """The largest relative differences, device against CPU, of the output and the gradients."""
                    nonlocal grad
                    reference = copy.deepcopy(layer).to(dtype).to(memory_format=fmt)
                    on_device = copy.deepcopy(reference).to(device)
                    xs = x.to(dtype).contiguous(memory_format=fmt)
                    if grad is None:
                        shape_out = reference(xs, cast(cond, dtype, "cpu")).shape
                        grad = torch.randn(shape_out, generator=torch.Generator().manual_seed(1))
                    cpu_y, cpu_g = forward_backward(reference, xs, cast(cond, dtype, "cpu"), grad.to(dtype))
                    dev_y, dev_g = forward_backward(on_device, xs.to(device), cast(cond, dtype, device),
                                                    grad.to(device, dtype))
                    return (relative_max(dev_y.cpu(), cpu_y),
                            max(relative_max(d.cpu(), c) for d, c in zip(dev_g, cpu_g)))

                try:
                    (error_fwd, error_bwd), tol, dtype_note = against_cpu(torch.float64), TOL_FLOAT64, "float64"
                except Exception as error:  # a layer that refuses float64 (on either side) is compared in float32
                    (error_fwd, error_bwd), tol = against_cpu(torch.float32), TOL_FLOAT32
                    dtype_note = f"float32 (float64: {type(error).__name__})"
                x32 = x.contiguous(memory_format=fmt).to(device)
                cond32, grad32 = cast(cond, torch.float32, device), grad.float().to(device)
                y32, g32 = forward_backward(copy.deepcopy(layer).to(memory_format=fmt).to(device), x32, cond32, grad32)
                y16, g16 = forward_backward(copy.deepcopy(layer).to(memory_format=fmt).to(device), x32, cond32, grad32,
                                            autocast=True)
                bf16_fwd = relative_l2(y16, y32)
                bf16_bwd = max(relative_l2(g16[0].float(), g32[0]),  # the input's gradient; the parameters' together
                               relative_l2(torch.cat([g.float().flatten() for g in g16[1:]] or [torch.zeros(1)]),
                                           torch.cat([g.flatten() for g in g32[1:]] or [torch.zeros(1)])))
                ok = (error_fwd <= tol and error_bwd <= tol and bf16_fwd <= TOL_BF16_OUT and bf16_bwd <= TOL_BF16_GRAD
                      and all(map(math.isfinite, (error_fwd, error_bwd, bf16_fwd, bf16_bwd))))
                dtype_note += "".join(f", {key}={options[key]}" for key in DETERMINISTIC if key in options)
                rows.append([name, fmt_name, dtype_note, f"{error_fwd:.1e}", f"{error_bwd:.1e}", f"{bf16_fwd:.1e}",
                             f"{bf16_bwd:.1e}", "pass" if ok else "FAIL"])
                if not ok:
                    failures.append(f"{name} ({fmt_name})")
            except Exception as error:
                rows.append([name, fmt_name, "", "", "", "", "", f"FAIL: {type(error).__name__}: {str(error)[:80]}"])
                failures.append(f"{name} ({fmt_name}): {type(error).__name__}")
    partial.result["figures"]["layers"] = rows
    partial.add(f"### Every layer, forward + backward on {device} against the CPU{same}\n\n"
                f"Input {shape}, training mode, parameters moved off their initial values. Device against CPU: the "
                f"largest difference relative to the largest value, of the output and of every gradient (input and "
                f"parameters), within {TOL_FLOAT64:g} in float64 ({TOL_FLOAT32:g} where a layer refuses float64). "
                f"bf16 autocast against float32 on {device}: relative L2 error within {TOL_BF16_OUT:g} (output) and "
                f"{TOL_BF16_GRAD:g} (gradients: the input's, and the parameters' as one vector). A layer that is "
                f"random in training is compared with its randomness off (its dtype cell says which option).\n\n"
                + markdown_table(["layer", "memory format", "dtype", "output", "gradients", "bf16: output",
                                  "bf16: gradients", "verdict"], rows))
    if failures:
        partial.fail(f"layers: {', '.join(failures)}")

    # Dice on the device from the same predictions as on the CPU
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randint(0, 3, (24, 256, 256), generator=generator)
    target = torch.randint(0, 3, (24, 256, 256), generator=generator)
    target[:4] = 0  # slices without any foreground: the NaN-skipping path
    volume_index = torch.arange(24) // 6
    on_cpu = summarize_counts(slice_counts(prediction, target, 3), volume_index, 4, ["rv", "lv"])
    on_device = summarize_counts(slice_counts(prediction.to(device), target.to(device), 3), volume_index.to(device),
                                 4, ["rv", "lv"])
    equal = on_cpu.keys() == on_device.keys() and all(  # a mean's summation order may differ in the last bit
        abs(on_cpu[k] - on_device[k]) <= 1e-12 or (math.isnan(on_cpu[k]) and math.isnan(on_device[k])) for k in on_cpu)
    partial.result["figures"]["dice"] = {"cpu": on_cpu, "device": on_device}
    partial.add(f"### Dice on {device} against the CPU\n\n24 slices of 256x256, 3 classes, 4 volumes, the same "
                f"predictions: {'equal (within 1e-12)' if equal else 'DIFFERENT'} "
                f"(3D {on_device['dice']:.6f} on the device, "
                f"{on_cpu['dice']:.6f} on the CPU).\n")
    if not equal:
        partial.fail("Dice on the device differs from the CPU")

    # the U-Net's training step compiled as trainer.compile=true does it, one graph (fullgraph=True)
    backend = "aot_eager" if args.quick else "inductor"
    size, depth, batch = (32, 2, 2) if args.quick else (64, 2, 4)  # every layer type at depth 2; compiles sooner
    compiled_rows = []
    for name in COMPILED_NORMS[:2] if args.quick else COMPILED_NORMS:
        torch._dynamo.reset()
        started = time.perf_counter()
        try:
            x = torch.randn(batch, 1, size, size, device=device)
            target = torch.randint(0, 2, (batch, size, size), device=device)

            def loss_of(compile_it: bool) -> float:
                """The loss of the trainer's own step (seg.training.step.train_step) from the same initial weights."""
                torch.manual_seed(0)
                model = UNet(norm=name, depth=depth).to(device).to(memory_format=torch.channels_last).train()
                module = torch.compile(model, backend=backend, fullgraph=True) if compile_it else model
                step = TrainStep.of(model, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy,
                                    module=module, autocast=torch.autocast(device.type, dtype=torch.bfloat16),
                                    memory_format=torch.channels_last)
                return train_step(step, x, target).item()

            eager, compiled = loss_of(False), loss_of(True)
            agree = abs(compiled - eager) <= 2e-2 * max(abs(eager), 1e-6)
            compiled_rows.append([name, "0 (fullgraph)", f"{eager:.4f}", f"{compiled:.4f}",
                                  f"{time.perf_counter() - started:.0f}", "pass" if agree else "FAIL: losses differ"])
            if not agree:
                partial.fail(f"compiled {name}: loss {compiled} against eager {eager}")
        except Exception as error:
            compiled_rows.append([name, f"{type(error).__name__}", "", "", f"{time.perf_counter() - started:.0f}",
                                  f"FAIL: {str(error).splitlines()[0][:100] if str(error) else ''}"])
            partial.fail(f"compiled {name}: {type(error).__name__}")
        partial.result["figures"]["compiled"] = compiled_rows
        partial.save()
    partial.add(f"### The U-Net's training step compiled ({backend}, fullgraph=True: a graph break is an error)\n\n"
                f"Depth {depth}, batch {batch}, {size}x{size}, channels_last, bf16 autocast on {device}; the loss "
                f"of one trainer step (seg.training.step.train_step) compiled against eager (within 2%).\n\n"
                + markdown_table(["norm", "graph breaks", "loss, eager", "loss, compiled", "s", "verdict"],
                                 compiled_rows))


def train_overrides(args, data: Path) -> list[str]:
    """The overrides of the trainer's runs here: the shared data folder; tiny sizes with --quick."""
    overrides = [f"paths.data_dir={data}", "trainer.progress=false"]
    if args.device == "cpu":
        overrides.append("trainer.device=cpu")
    if args.quick:
        overrides.append("data.phantom.num_patients=5")
    return overrides


def embedded(page: Path) -> str:
    """A benchmark's result page inside the report: what it measured and its tables, without its title and stamp
    (the report's own stamp says the same), its sections one level down."""
    stamp = ("- command:", "- commit:", "- machine:", "- load average:", "- torch:", "- date:")
    lines = [line for line in page.read_text().splitlines()[1:] if not line.startswith(stamp)]
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip() + "\n"


def metrics_of(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]


def step_train_default(args, partial: Partial) -> None:
    figures = args.work / "figures" / "default_run.json"
    quick = ["experiment=smoke"] if args.quick else []
    result = python_command([str(BENCH / "bench_default_run.py"), "--keep-data", str(args.work / "data"),
                             "--out", str(args.work / "pages" / "bench_default_run.md"), "--json", str(figures),
                             "--", *train_overrides(args, args.work / "data")[1:], *quick])
    if result.returncode != 0:
        partial.fail(f"bench_default_run.py: exit code {result.returncode}")
        return
    run = json.loads(figures.read_text())["figures"]
    partial.result["figures"] = run
    partial.add(f"`python train.py {' '.join(run['overrides'])}` on {run['device']} ({run['precision']}), "
                + ("from a fresh data folder (generating the phantom included)" if run["fresh_data"]
                   else "existing data")
                + f": wall {run['wall_s']:.1f} s, {run['images_per_s']:.1f} training images/s, test Dice "
                f"{run['dice']:.4f} (3D), {run['dice_2d']:.4f} (2D).\n")
    if not str(run["device"]).startswith(args.device):
        partial.fail(f"the run used {run['device']}, not {args.device}")


def step_torchrun(args, partial: Partial) -> None:
    folder = args.work / "runs" / "torchrun"
    result = python_command(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                             "experiment=smoke", f"hydra.run.dir={folder}", *train_overrides(args, args.work / "data")])
    runs = metrics_of(folder)
    if result.returncode != 0 or not runs:
        partial.fail(f"torchrun: exit code {result.returncode}, {len(runs)} metrics.json")
        return
    backend = "NCCL" if args.device == "cuda" else "gloo (NCCL needs CUDA)"
    partial.result["figures"] = {key: runs[0].get(key) for key in ("device", "world_size", "dice", "wall_time_s")}
    partial.add(f"`torchrun --standalone --nproc_per_node=1 train.py experiment=smoke` on {runs[0].get('device')} "
                f"({backend}): exit code 0, world size {runs[0].get('world_size')}, test Dice "
                f"{runs[0].get('dice', float('nan')):.4f}.\n")


def step_launcher(args, partial: Partial) -> None:
    folder = args.work / "runs" / "launcher"
    result = python_command(["train.py", "-m", "hydra/launcher=gpus", "experiment=smoke", "norm=bn,gn",
                             f"hydra.sweep.dir={folder}", *train_overrides(args, args.work / "data")])
    runs = metrics_of(folder)
    devices = sorted({str(r.get("device")) for r in runs})
    partial.result["figures"] = {"jobs": len(runs), "devices": devices}
    if result.returncode != 0 or len(runs) != 2:
        partial.fail(f"hydra/launcher=gpus: exit code {result.returncode}, {len(runs)} of 2 jobs wrote metrics.json")
        return
    partial.add(f"`python train.py -m hydra/launcher=gpus experiment=smoke norm=bn,gn`: 2 jobs, each on "
                f"{', '.join(devices)}, exit code 0.\n")
    if any(not d.startswith(args.device) for d in devices):
        partial.fail(f"jobs ran on {devices}, not {args.device}")


def step_throughput(args, partial: Partial, compiled: bool) -> None:
    name = "compiled" if compiled else "eager"
    figures = args.work / "figures" / f"bench_{name}.json"
    page = args.work / "pages" / f"bench_{name}.md"
    if args.quick:
        norms = ["kn"] if compiled else ["bn"]  # compiled: a layer without a MONAI counterpart (one process)
        sizes = ["--batch-size", "4", "--size", "32", "--steps", "2", "--warmup", "1", "--samples", "8",
                 "--workers", "0"]
    else:
        # within the budget: bn (the 3x target) compiled; bn, iln, sn eager; --all-norms: all eight both ways
        norms = list(BENCH_NORMS) if args.all_norms else ["bn"] if compiled else ["bn", "iln", "sn"]
        sizes = ["--batch-size", "32", "--size", "256", "--steps", "10" if compiled else "15", "--warmup", "3",
                 "--samples", "64"]
    backend = ["--compile", "--compile-backend", "aot_eager" if args.quick else "inductor"] if compiled else []
    result = python_command([str(BENCH / "bench.py"), "--devices", args.device, "--precision", "bf16",
                             "--norms", *norms, *sizes, *backend, "--out", str(page), "--json", str(figures)])
    if result.returncode != 0:
        partial.fail(f"bench.py: exit code {result.returncode}")
        return
    measured = json.loads(figures.read_text())["figures"]
    partial.result["figures"] = measured
    partial.add(embedded(page))
    per_norm = measured["devices"][args.device]
    failed = [norm for norm, r in per_norm.items() if "error" in (r["ours"] or {})]
    if failed:
        partial.fail(f"our pipeline failed for {', '.join(failed)}")
    broken = [norm for norm, r in per_norm.items() if (r["ours"] or {}).get("graph_breaks")]
    if broken:  # every layer compiles to one graph (docs/speed.md)
        partial.fail(f"graph breaks in our compiled model for {', '.join(broken)}")


def step_layer_bandwidth(args, partial: Partial) -> None:
    figures = args.work / "figures" / "bench_norms.json"
    page = args.work / "pages" / "bench_norms.md"
    sizes = ["--shape", "2", "16", "32", "32", "--rounds", "2", "--repeats", "2"] if args.quick else []
    result = python_command([str(BENCH / "bench_norms.py"), "--device", args.device, "--channels-last",
                             "--skip-pairs", "--layers", *FUSED, "bn", "in", "gn", *sizes, "--out", str(page),
                             "--json", str(figures)])
    if result.returncode != 0:
        partial.fail(f"bench_norms.py: exit code {result.returncode}")
        return
    partial.result["figures"] = json.loads(figures.read_text())["figures"]
    partial.add(embedded(page))


def step_stacked(args, partial: Partial) -> None:
    """The stacked runs' figures (docs/stacking.md): image-steps per second and the projected grid time."""
    page = args.work / "pages" / "stacked.md"
    sizes = ["--smoke"] if args.quick else ["--runs", "1", "8", "32", "--rounds", "3"]
    result = python_command([str(BENCH / "bench_stacked.py"), "--device", args.device, *sizes, "--out", str(page)])
    if result.returncode != 0:
        partial.fail(f"bench_stacked.py: exit code {result.returncode}")
        return
    partial.add(embedded(page))


def grid_size() -> tuple[int, dict]:
    """The number of runs of the full experiment=iln_paper grid, from its config's sweeper parameters."""
    import yaml

    preset = yaml.safe_load((ROOT / "configs" / "experiment" / "iln_paper.yaml").read_text())
    params = preset["hydra"]["sweeper"]["params"]
    counts = {key: len(str(value).split(",")) for key, value in params.items()}
    return math.prod(counts.values()), counts


def step_study(args, partial: Partial) -> None:
    folder = args.work / "runs" / "study"
    reduced = ["norm=bn,iln", "lr=0.5", "data.task=lv", "data.fold=0", "seed=0"]
    if args.quick:
        reduced[0] = "norm=iln"  # one job
    tiny = ["data.image_size=64", "data.spacing=6.0", "data.max_patients=5", "data.max_slices_per_volume=3",
            "model.depth=2"] if args.quick else []
    started = time.perf_counter()
    result = python_command(["train.py", "-m", "experiment=iln_paper", *reduced, *tiny, f"hydra.sweep.dir={folder}",
                             *train_overrides(args, args.work / "data")])
    wall = time.perf_counter() - started
    runs = metrics_of(folder)
    total, counts = grid_size()
    jobs = len(reduced[0].split(","))
    if result.returncode != 0 or len(runs) != jobs:
        partial.fail(f"the reduced grid: exit code {result.returncode}, {len(runs)} of {jobs} jobs wrote metrics.json")
        return
    per_job = wall / len(runs)
    size = "64x64, depth 2 (--quick: not the study's size)" if args.quick else "256x256 (the study's size)"
    grid = f"({' x '.join(f'{n} {k}' for k, n in counts.items())} = {total} runs, one after another)"
    # a job's time scales with its work only at the study's own configuration: --quick's jobs (64 px, depth 2,
    # 5 patients, 3 slices a volume) are mostly start-up and data preparation, not training steps
    extrapolated = None if args.quick else per_job * total
    partial.result["figures"] = {"jobs": len(runs), "wall_s": wall, "per_job_s": per_job, "grid_runs": total,
                                 "extrapolated_s": extrapolated, "size": size,
                                 "device": runs[0].get("device")}
    measured = (f"`python train.py -m experiment=iln_paper {' '.join(reduced + tiny)}` at {size} on "
                f"{runs[0].get('device')}: {len(runs)} job{'s' if len(runs) != 1 else ''} in {wall:.0f} s (the "
                f"sweep's summary included), {per_job:.1f} s a job. ")
    if extrapolated is None:
        partial.add(measured + f"**No estimate of the full grid** {grid}: these jobs are not the study's "
                    f"configuration (256x256, the preset's depth, every patient and slice), and a job's time does "
                    f"not scale from theirs (mostly start-up and data preparation); run the check without --quick "
                    f"for one.\n")
        return
    partial.add(measured + f"**Extrapolation, not a measurement:** the full grid {grid} would take about "
                f"{extrapolated / 3600:.2f} h ({extrapolated / 60:.0f} min) on this machine.\n")


STEP_FUNCTIONS = {"install": step_install, "correctness": step_correctness, "train_default": step_train_default,
                  "torchrun": step_torchrun, "launcher": step_launcher,
                  "throughput_eager": lambda a, p: step_throughput(a, p, compiled=False),
                  "throughput_compiled": lambda a, p: step_throughput(a, p, compiled=True),
                  "layer_bandwidth": step_layer_bandwidth, "study": step_study, "stacked": step_stacked}


