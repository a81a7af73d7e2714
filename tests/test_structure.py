"""The code base's structure: every module of seg imports on its own, no module imports seg inside a
function, the imports follow the layering that seg/__init__.py states, the console commands of
pyproject.toml are importable callables, and the benchmarks time the trainer's own step."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import pytest

from conftest import ROOT

SEG = ROOT / "seg"


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(path) for path in SEG.rglob("*.py"))


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def seg_imports(path, source: str | None = None, name: str | None = None):
    """(line, the seg module imported, whether the import statement is inside a function) for every import of
    seg in the module at ``path`` (or ``source``, as the module ``name``), relative or absolute."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(source if source is not None else path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "seg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "seg":
                # ``from . import x`` imports the module x; ``from .x import name`` the module x
                submodules = [f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")]
                targets = submodules or [base]
        found.extend((node.lineno, target, id(node) in in_function) for target in targets)
    return found


def unit(name: str) -> str | None:
    """The layered unit of a module: seg.<unit>[...] (a package counts as one); None for seg itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def stated_layers() -> dict[str, int]:
    """{unit: layer} as seg/__init__.py's docstring states them (lines ``layer N  name name ...``)."""
    docstring = ast.get_docstring(ast.parse((SEG / "__init__.py").read_text()))
    layers = {}
    for number, names in re.findall(r"^\s*layer (\d+)  +([a-z_ ]+)$", docstring, re.M):
        for name in names.split():
            assert name not in layers, f"{name} is stated in two layers"
            layers[name] = int(number)
    return layers


def test_every_module_of_seg_imports_on_its_own():
    """Each module imported first, in a process where no other module of seg is loaded yet: an import circle
    (a module that only works when another one happens to be imported before it) fails here. The
    third-party libraries stay loaded between modules, so that each import costs only its own code."""
    script = (
        "import importlib, sys, traceback\n"
        "import torch, numpy, hydra, omegaconf, nibabel, tqdm, torch.utils.tensorboard\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'seg' or m.startswith('seg.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", script, *MODULES], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_of_seg_imports_seg_inside_a_function():
    """Imports of the project sit at the top of each module, where the layering (below) sees them; one inside a
    function would hide an import circle until the function first runs."""
    inside = [f"{path.relative_to(ROOT)}:{line} imports {target}"
              for path in sorted(SEG.rglob("*.py")) for line, target, in_function in seg_imports(path) if in_function]
    assert not inside, "\n".join(inside)


def test_the_imports_follow_the_layering_of_seg_init():
    layers = stated_layers()
    units = {unit(name) for name in MODULES} - {None}
    assert units <= set(layers), f"not in the layering of seg/__init__.py: {sorted(units - set(layers))}"
    assert set(layers) <= units, f"stated in seg/__init__.py but not a module of seg: {sorted(set(layers) - units)}"
    upward = []
    for path in sorted(SEG.rglob("*.py")):
        importer = unit(module_name(path))
        for line, target, _ in seg_imports(path):
            imported = unit(target)
            if importer is None or imported is None or imported == importer:
                continue  # the package itself, or a package's own modules
            if layers[imported] >= layers[importer]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {importer} (layer {layers[importer]}) imports "
                              f"{imported} (layer {layers[imported]})")
    assert not upward, "\n".join(upward)


def test_the_scan_finds_every_form_of_import():
    """The scanner itself: relative, absolute and function-level imports of seg are found and resolved."""
    source = ("from . import losses\nfrom ..config.schema import ConfigError\nfrom ..data.slices import TASKS\n"
              "import seg.training.loop\n"
              "def build():\n    from .checks import validate\n    import seg.runtime.runs\n"
              "class Thing:\n    def method(self):\n        from ..norms import spec\n")
    found = {(target, inside) for _, target, inside in
             seg_imports(SEG / "training" / "probe.py", source, "seg.training.probe")}
    assert found == {("seg.training.losses", False), ("seg.config.schema", False), ("seg.data.slices", False),
                     ("seg.training.loop", False), ("seg.training.checks", True), ("seg.runtime.runs", True),
                     ("seg.norms", True)}
    found = {(target, inside) for _, target, inside in seg_imports(SEG / "data" / "options.py")}
    assert ("seg.data.volumes", False) in found and ("seg.config.schema", False) not in found


def test_console_commands_point_at_importable_callables():
    """pyproject.toml's [project.scripts]: each command's target imports and is callable (what the console
    script generated by ``pip install`` calls)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"seg-predict", "seg-evaluate", "seg-export", "seg-summarize", "seg-prepare-data"}
    for command, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command


@pytest.mark.slow
def test_prepare_data_runs_as_a_module_and_refuses_a_bad_value_in_one_line():
    """``python -m seg.tools.prepare_data`` is the seg-prepare-data command (the other tools run this way in
    test_script_options.py and test_study.py): a bad override ends it with one line naming the key, exit code 1."""
    result = subprocess.run([sys.executable, "-m", "seg.tools.prepare_data", "lr=-1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr == "error: lr=-1.0 is out of range: it must be in (0, inf)\n"


def test_nothing_edits_sys_path():
    """The tools are console commands and the benchmarks import their harness as a sibling: no sys.path edits."""
    edits = [f"{path.relative_to(ROOT)}" for folder in ("seg", "scripts", "tests") for path in
             sorted((ROOT / folder).rglob("*.py")) if "sys.path.insert" in path.read_text()
             and path.name != "test_structure.py"]
    edits += ["train.py"] if "sys.path.insert" in (ROOT / "train.py").read_text() else []
    assert not edits, edits


# The torch.func (vmap) design that stacked runs were measured against: its own step, by design.
OTHER_DESIGNS = {"bench_stacked.py": "functorch"}


def test_the_benchmarks_time_the_trainers_own_step():
    """No benchmark re-implements the training step: those that train call seg.training.step.train_step, and none calls
    backward() or an optimizer's step itself."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        source = path.read_text()
        if path.name in OTHER_DESIGNS:  # drop the function that times another design, not the trainer's step
            node = next(n for n in ast.parse(source).body
                        if isinstance(n, ast.FunctionDef) and n.name == OTHER_DESIGNS[path.name])
            source = "\n".join(line for number, line in enumerate(source.splitlines(), start=1)
                               if not node.lineno <= number <= node.end_lineno)
        assert ".backward(" not in source and "optimizer.step(" not in source, path.name
    for name in ("bench.py", "bench_train_step.py"):
        assert "train_step(" in (ROOT / "scripts" / name).read_text(), name


def test_train_reads_as_a_table_of_contents():
    """seg.training.loop.train is at most 40 lines of code, calling the named phases; the run state is a RunState."""
    from seg.training import loop as train

    function = next(node for node in ast.parse((SEG / "training" / "loop.py").read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "train")
    code = function.body[1:]  # after the docstring
    assert code[-1].end_lineno - code[0].lineno + 1 <= 40
    called = {node.func.id for node in ast.walk(function) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name)}
    assert {"set_up", "starting_state", "train_epoch", "end_epoch", "finish"} <= called
    assert "evaluate_split" in {node.func.id for node in ast.walk(ast.parse((SEG / "training" / "loop.py").read_text()))
                                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert train.RunState is not None and "progress" not in {f for f in train.RunState.__dataclass_fields__}


def test_one_place_builds_the_model_and_one_registry_knows_each_layer():
    """Training, prediction and export build the network with seg.model.build.build_model, never by hand; no module
    outside seg/norms re-derives what a layer is from its class (the registry's spec says it)."""
    for name in ("training", "inference", "tools"):
        for path in sorted((SEG / name).rglob("*.py")):
            assert "UNet(" not in path.read_text() or path.parent.name == "stacked", path.name
    assert "build_model(" in (SEG / "training" / "loop.py").read_text()
    assert "build_model(" in (SEG / "inference" / "predict.py").read_text()
    assert "trained_model(" in (SEG / "tools" / "export.py").read_text()
    for path in sorted(SEG.rglob("*.py")):
        if "norms" not in path.relative_to(SEG).parts:
            source = path.read_text()
            assert "condition_inputs" not in source and '"conv_norm"' not in source, path.name


def test_the_folder_list_says_the_architecture():
    """``ls seg`` shows the stages (about ten subpackages), each with an ``__init__`` whose docstring says what it
    holds and what it may import; the programs run by path are in scripts/; no file of seg/ or scripts/ is over
    600 lines (a module that long carries several jobs)."""
    entries = sorted(path.name for path in SEG.iterdir() if path.name != "__pycache__")
    assert len(entries) <= 12, entries
    for package in (path for path in SEG.iterdir() if path.is_dir() and path.name != "__pycache__"):
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), package.name
    assert (ROOT / "scripts" / "bench.py").is_file() and (ROOT / "scripts" / "gpu_check.py").is_file()
    long = [f"{path.relative_to(ROOT)}: {n} lines" for folder in ("seg", "scripts")
            for path in sorted((ROOT / folder).rglob("*.py")) if (n := len(path.read_text().splitlines())) > 600]
    assert not long, "\n".join(long)
