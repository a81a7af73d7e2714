"""The GPU check's wheelhouse, filled where the network is: the project's dependencies besides torch, for the
node's Python and platform (``python scripts/gpu_check.py --fill-wheels DIR``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# the extras a GPU node needs besides the dependencies: hydra/launcher=gpus is joblib's launcher
WHEEL_EXTRAS = ("launchers",)
MANYLINUX_X86_64 = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64",
                                                                              "manylinux1_x86_64"]



# ---------------------------------------------------------------------------- the wheelhouse (where the network is)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def project_requirements(extras=WHEEL_EXTRAS) -> list[str]:
    """The project's dependencies and those of ``extras``, as pyproject.toml states them, torch left out."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return [r for r in requirements if requirement_name(r) != "torch"]


def run_pip(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", *args]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        sys.stdout.write(result.stdout[-3000:])
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(f"pip failed (exit code {result.returncode}): {' '.join(command[3:5])} ...")
    return result


def closure_without_torch(report: dict, roots: list[str]) -> dict[str, str]:
    """The packages (name -> version) of pip's resolution ``report`` that ``roots`` need, not counting what
    only torch needs: the requirement graph walked from the roots, never through torch."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement

    resolved = {canonical(item["metadata"]["name"]): item["metadata"] for item in report["install"]}
    wanted: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name == "torch" or name not in resolved or name in wanted:
            continue
        metadata = resolved[name]
        wanted[name] = metadata["version"]
        for line in metadata.get("requires_dist", []):
            dependency = Requirement(line)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ["", *requirement.extras]):
                todo.append(dependency)  # a dependency whose marker the target rules out is not in `resolved`
    return wanted


def wheel_less(pip_output: str) -> list[str]:
    """The requirements that pip's failed resolution found no wheel for (PyPI ships some packages as source
    only), with the version range that asked for them: ["antlr4-python3-runtime==4.9.*"]."""
    names = re.findall(r"No matching distribution found for (\S+)", pip_output)
    listed = re.search(r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)", pip_output)
    for name in listed.group(1).split() if listed else []:
        asked = re.search(rf"depends on ({re.escape(name)}[^\s,;]*)", pip_output, re.IGNORECASE)
        names.append(asked.group(1) if asked else name)
    return list(dict.fromkeys(names))


def fill_wheels(folder: Path, python_version: str, platforms: list[str], torch_version: str | None,
                extras=WHEEL_EXTRAS) -> None:
    """Fill ``folder`` with every wheel the project needs besides torch, for ``python_version`` on ``platforms``:
    the project's own wheel, then pip's resolution of its requirements for that target (metadata only, torch
    pinned to ``torch_version`` when given, so that the versions chosen suit the node's torch), then the
    resolved packages that torch alone does not need, downloaded without their dependencies. A package that
    PyPI ships only as source is built here into a wheel, which must be pure Python."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # built from a copy: setuptools leaves build/ and *.egg-info behind
        source = Path(tmp) / "project"
        shutil.copytree(ROOT / "seg", source / "seg", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):  # what setuptools reads besides the package
            shutil.copy(ROOT / name, source / name)
        run_pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(source)])
    roots = project_requirements(extras)
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        target += ["--platform", platform]
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        for _ in range(10):  # each pass may find more source-only packages to build
            pinned = [f"torch=={torch_version}"] if torch_version else []
            result = run_pip(["install", "--dry-run", "--ignore-installed", "--report", str(report_path),
                              "--target", str(Path(tmp) / "target"), "--find-links", str(folder), *target,
                              *roots, *pinned], check=False)
            if result.returncode == 0:
                break
            missing = wheel_less(result.stdout + result.stderr)
            if not missing:
                sys.stderr.write(result.stderr[-3000:])
                raise SystemExit("pip could not resolve the project's requirements for the target (above)")
            for requirement in missing:
                print(f"{requirement}: no wheel for the target on the index; building one here", flush=True)
                built = Path(tmp) / "built"
                shutil.rmtree(built, ignore_errors=True)
                run_pip(["wheel", "--no-deps", "-w", str(built), requirement])
                for wheel in built.glob("*.whl"):
                    if not wheel.name.endswith("-none-any.whl"):
                        raise SystemExit(f"{requirement}: the wheel built here, {wheel.name}, is not pure Python: "
                                         f"build it on the target platform and put it in {folder}")
                    shutil.copy(wheel, folder)
        else:
            raise SystemExit("pip could not resolve the project's requirements after 10 passes")
        report = json.loads(report_path.read_text())
    wanted = closure_without_torch(report, roots)
    have = {canonical(p.name.split("-")[0]) for p in folder.glob("*.whl")}
    download = [f"{name}=={version}" for name, version in sorted(wanted.items()) if name not in have]
    if download:
        run_pip(["download", "--no-deps", "-d", str(folder), *target, *download])
    print(f"\n{folder}: {len(list(folder.glob('*.whl')))} wheels ({len(wanted)} packages besides torch and the "
          f"project) for Python {python_version} on {', '.join(platforms)}")


