"""The GPU path in one prepared command: install offline, check CUDA end to end, measure every GPU figure.

On a GPU node (no network; a Python that already has torch), from the repository root:

    python scripts/gpu_check.py --wheels /path/to/wheelhouse --out gpu-report        # ~8 minutes
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gpu-check            # CI: tiny, on the CPU

Where the network is (any machine), first fill the wheelhouse for the node's Python and platform:

    python scripts/gpu_check.py --fill-wheels wheelhouse --python-version 3.12 --torch-version 2.11.0

Every step runs in its own process under a time limit, printed before it starts, and gets its own
verdict: pass, fail, skipped (with the reason) or timed out. The steps (docs/gpu_check.md says what
each checks):

1. ``install`` -- ``pip install --no-index --find-links DIR``: the project's dependencies besides torch
   (pyproject.toml, the ``launchers`` extra too) and then the project's own wheel (``--no-deps``);
   torch is held at its installed version by a constraint and checked unchanged afterwards;
2. ``correctness`` -- every registered layer forward and backward on the device against the CPU
   (float64 where the layer takes it), bf16 autocast against float32 on the device, both memory formats;
   the U-Net's training step compiled with ``fullgraph=True`` (no graph break) for bn, gn, iln, bin, sn;
   Dice on the device equal to Dice on the CPU from the same predictions;
3. ``train_default``, ``torchrun``, ``launcher`` -- ``python train.py`` as a user first runs it (wall
   time, images/s, Dice: scripts/bench_default_run.py), ``torchrun --nproc_per_node=1`` and
   ``hydra/launcher=gpus`` with two jobs;
4. ``throughput_eager``, ``throughput_compiled``, ``layer_bandwidth`` -- scripts/bench.py (ours against
   MONAI at batch 32, bf16, channels_last) and scripts/bench_norms.py (each layer against GroupNorm,
   and its bandwidth as a fraction of the measured copy bandwidth);
5. ``study`` -- a reduced ``experiment=iln_paper`` grid at 256x256, timed, and extrapolated to the full grid.

The report (``--out``: report.md through the harness, with its stamp, and report.json) states each
step's verdict and each target of the GPU path as met, not met or not measured. The steps' scratch
(data, run folders, the benchmarks' pages) goes to a temporary folder (``--work`` to keep it). The
checked code is the checkout this script lives in (it is put first on every step's PYTHONPATH); the
installed wheel is what makes the dependencies and the console commands available.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_steps import BENCH, BENCH_NORMS, FUSED, Partial, STEP_FUNCTIONS
from gpu_wheels import MANYLINUX_X86_64, ROOT, fill_wheels





@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: int  # on one GPU, full sizes; the limits sum to under 8 minutes
    quick_limit_s: int  # --quick: tiny sizes, but on a CPU that others share (CI): generous, never a verdict on speed
    extra: bool = False  # not in the 8-minute check: runs only when named in --steps


STEPS = (
    Step("install", "offline install from the wheelhouse, torch untouched", 40, 180),
    Step("correctness", "layers on the device against the CPU, bf16 against fp32; Dice; compiled U-Net", 85, 180),
    Step("train_default", "python train.py (default phantom run): wall time, images/s, Dice", 60, 180),
    Step("torchrun", "torchrun --nproc_per_node=1 train.py", 25, 180),
    Step("launcher", "python train.py -m hydra/launcher=gpus, two jobs", 35, 180),
    Step("throughput_eager", "bench.py: ours vs MONAI, batch 32, bf16, channels_last, eager", 50, 180),
    Step("throughput_compiled", "bench.py: ours vs MONAI, batch 32, bf16, channels_last, compiled", 90, 180),
    Step("layer_bandwidth", "bench_norms.py: layers vs GroupNorm, fraction of copy bandwidth", 25, 180),
    Step("study", "reduced experiment=iln_paper grid at 256x256, extrapolated", 60, 180),
    Step("stacked", "bench_stacked.py: K runs as one computation against the K runs in turn, K = 1, 8, 32",
         300, 180, extra=True),
)
BUDGET_S = 8 * 60
# --fill-wheels' default platform: x86-64 Linux, glibc 2.17 and later (pip matches a manylinux_2_N tag exactly)


def run_one_step(args) -> None:
    """The child process of one step: its result goes to <work>/steps/<name>.json."""
    partial = Partial(args.work / "steps" / f"{args.run_step}.json")
    partial.save()
    if args.device == "cuda" and args.run_step != "install":
        import torch

        if not torch.cuda.is_available():
            partial.skip(f"torch {torch.__version__} sees no CUDA device")
            return
    STEP_FUNCTIONS[args.run_step](args, partial)


# ---------------------------------------------------------------------------- the whole check (parent process)


def run_step(step: Step, args, log) -> dict:
    """Run one step in its own process group under its limit; its verdict, reason, time, figures and details."""
    limit = max(1, round((step.quick_limit_s if args.quick else step.limit_s) * args.limit_scale))
    header = f"\n=== step {step.name}: {step.title} (limit {limit} s)"
    print(header, flush=True)
    log.write(header + "\n")
    command = [sys.executable, __file__, "--run-step", step.name, "--device", args.device, "--work", str(args.work)]
    command += (["--quick"] if args.quick else []) + (["--all-norms"] if args.all_norms else [])
    command += ["--wheels", str(args.wheels)] if args.wheels else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(BENCH), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    tail: list[str] = []

    def copy_output():
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the step and everything it started
        code, timed_out = process.wait(), True
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    path = args.work / "steps" / f"{step.name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"verdict": "fail", "reason": "", "figures": {},
                                                                 "details": ["(the step wrote no result)"]}
    if timed_out:
        result.update(verdict="timed out", reason=f"stopped at its limit of {limit} s (what it finished is below)")
    elif code != 0 and result["verdict"] != "fail":
        last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
        result.update(verdict="fail", reason=f"exit code {code}: {last[:200]}")
    result.update(name=step.name, title=step.title, limit_s=limit, seconds=round(seconds, 1),
                  output_tail="".join(tail[-15:]))
    print(f"=== {step.name}: {result['verdict']}{': ' + result['reason'] if result['reason'] else ''} "
          f"({seconds:.0f} s of {limit} s)", flush=True)
    return result


def targets(results: dict[str, dict], device: str) -> list[dict]:
    """Each target of the GPU path: met, not met or not measured, with the figures it was judged on."""
    on_gpu = device == "cuda"
    rows = []

    def add(target: str, status: str, evidence: str) -> None:
        rows.append({"target": target, "status": status, "evidence": evidence})

    def figures(step: str) -> dict | None:
        result = results.get(step)
        return result["figures"] if result and result["verdict"] == "pass" and result["figures"] else None

    not_gpu = "not measured (the targets are for one CUDA GPU; this run used the CPU)"
    layers = figures("layer_bandwidth")
    if layers and on_gpu:
        alone = layers["layer_alone"]
        ratios = {n: alone[n]["ratio"] for n in FUSED if n in alone}
        fractions = {n: alone[n]["copy_fraction"] for n in FUSED if n in alone}
        add("fused bin/iln/sn forward+backward on CUDA <= 1.5x torch's GroupNorm",
            "met" if all(r <= 1.5 for r in ratios.values()) else "not met",
            ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))
        add("fused bin/iln/sn >= 60% of the measured copy bandwidth",
            "met" if all(f >= 0.6 for f in fractions.values()) else "not met",
            ", ".join(f"{n} {f:.0%}" for n, f in fractions.items())
            + f" of {layers['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    else:
        reason = not_gpu if not on_gpu else "not measured (step layer_bandwidth did not pass)"
        add("fused bin/iln/sn forward+backward on CUDA <= 1.5x torch's GroupNorm", reason, "")
        add("fused bin/iln/sn >= 60% of the measured copy bandwidth", reason, "")
    bench = figures("throughput_compiled")
    ratios = {n: r["ratio"] for n, r in (bench or {}).get("devices", {}).get(device, {}).items()
              if r.get("ratio") is not None}
    if on_gpu and ratios:
        add("our pipeline >= 3x MONAI's at batch 32, bf16, compiled",
            "met" if all(r >= 3 for r in ratios.values()) else "not met",
            ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()) + " (the norms measured)")
    else:
        add("our pipeline >= 3x MONAI's at batch 32, bf16, compiled",
            not_gpu if not on_gpu else "not measured (step throughput_compiled did not pass, or MONAI's runs "
                                       "failed: no ratio)", "")
    run = figures("train_default")
    if on_gpu and run:
        add("python train.py on one GPU: under 60 s wall", "met" if run["wall_s"] < 60 else "not met",
            f"{run['wall_s']:.1f} s ({'fresh data folder' if run['fresh_data'] else 'existing data'})")
        add("python train.py on one GPU: Dice >= 0.85", "met" if run["dice"] >= 0.85 else "not met",
            f"test Dice {run['dice']:.4f}")
    else:
        reason = not_gpu if not on_gpu else "not measured (step train_default did not pass)"
        add("python train.py on one GPU: under 60 s wall", reason, "")
        add("python train.py on one GPU: Dice >= 0.85", reason, "")
    return rows


def write_report(args, results: list[dict], total_s: float) -> None:
    from harness import markdown_table, write_json, write_result

    by_name = {r["name"]: r for r in results}
    goals = targets(by_name, args.device)
    summary = markdown_table(["step", "what", "limit (s)", "took (s)", "verdict", "reason"],
                             [[r["name"], r["title"], r["limit_s"], f"{r['seconds']:.0f}", r["verdict"], r["reason"]]
                              for r in results])
    goal_table = markdown_table(["target", "status", "figures"], [[g["target"], g["status"], g["evidence"]]
                                                                 for g in goals])
    sections = []
    for r in results:
        details = "\n".join(r.get("details", [])).strip() or "(nothing finished)"
        if r["verdict"] in ("fail", "timed out"):
            details += "\n\nThe step's last output:\n\n```\n" + r["output_tail"].strip() + "\n```"
        sections.append(f"## {r['name']}: {r['verdict']}\n\n{details}\n")
    limits = sum(r["limit_s"] for r in results)
    mode = "--quick (tiny sizes: checks the path, not the figures)" if args.quick else "full sizes"
    about = (f"The GPU path checked on `{args.device}`, {mode}: every step in its own process under its limit "
             f"(the limits sum to {limits} s{'' if args.quick else f' of the {BUDGET_S} s budget'}); the whole "
             f"check took {total_s:.0f} s. Targets of the GPU path: met, not met, or not measured.")
    body = f"## Steps\n\n{summary}\n## Targets\n\n{goal_table}\n" + "\n".join(sections)
    write_result("gpu_check", "GPU check", body, about, args.out / "report.md")
    write_json(args.out / "report.json", {"device": args.device, "quick": args.quick, "total_s": total_s,
                                          "limits_s": limits, "steps": results, "targets": goals})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, help="folder for report.md and report.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every step in seconds (CI, on the CPU)")
    parser.add_argument("--wheels", type=Path, help="install the project offline from this wheelhouse first")
    parser.add_argument("--work", type=Path, help="keep the steps' scratch here (default: a temporary folder)")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="only these steps")
    parser.add_argument("--all-norms", action="store_true",
                        help=f"throughput of all of {' '.join(BENCH_NORMS)}, eager and compiled (past the 8-minute "
                             f"budget; with --limit-scale)")
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiply every step's limit (a slower GPU)")
    parser.add_argument("--fill-wheels", type=Path, metavar="DIR",
                        help="fill DIR with the wheels a GPU node needs (where the network is), then exit")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="with --fill-wheels: the node's Python (default: this one's)")
    parser.add_argument("--platform", action="append",
                        help="with --fill-wheels: the node's platform tags (repeatable; default: manylinux_2_17 to "
                             "manylinux_2_39 x86_64)")
    parser.add_argument("--torch-version", help="with --fill-wheels: the node's torch, so the versions chosen suit it")
    parser.add_argument("--run-step", choices=[s.name for s in STEPS], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.fill_wheels:
        platforms = args.platform or MANYLINUX_X86_64
        fill_wheels(args.fill_wheels, args.python_version, platforms, args.torch_version)
        return
    if args.wheels and not args.wheels.is_dir():
        sys.exit(f"--wheels: {args.wheels} is not a folder")
    if args.run_step:
        args.work = args.work.resolve()
        run_one_step(args)
        return
    if args.out is None:
        sys.exit("--out: the folder for the report is required")
    if args.limit_scale <= 0:
        sys.exit("--limit-scale: must be positive")
    if args.device == "cuda":  # torch's answer, from a child: this process stays free of torch until the report
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, "
                                "torch.cuda.is_available())"], capture_output=True, text=True)
        answer = probe.stdout.split()
        if probe.returncode != 0 or answer[-1:] != ["True"]:
            sys.exit(f"--device cuda: {'torch ' + answer[0] if answer else 'torch (not importable)'} sees no CUDA "
                     f"device (--device cpu checks the path on the CPU)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    keep = args.work is not None
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s.name in args.steps] if args.steps else [s for s in STEPS if not s.extra]
    limits = sum(max(1, round((s.quick_limit_s if args.quick else s.limit_s) * args.limit_scale)) for s in steps)
    print(f"GPU check on {args.device}{' (--quick)' if args.quick else ''}: {len(steps)} steps, limits summing to "
          f"{limits} s; report in {args.out}", flush=True)
    started = time.perf_counter()
    results = []
    try:
        with open(args.out / "check.log", "w") as log:
            for step in steps:
                results.append(run_step(step, args, log))
        write_report(args, results, time.perf_counter() - started)
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)
    failed = [r["name"] for r in results if r["verdict"] in ("fail", "timed out")]
    print(f"\n{len(results) - len(failed)} of {len(results)} steps passed or were skipped"
          + (f"; not: {', '.join(failed)}" if failed else "") + f". Report: {args.out / 'report.md'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
