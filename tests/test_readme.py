"""The README is a test: every command of README.md's and data/README.md's ```bash blocks runs here, in a
process of its own, as a user runs it, from a scratch folder (so ``outputs/``, ``multirun/`` and the phantom
land there, never in the repository), with small overrides so that each takes seconds:

- ``python train.py`` and ``torchrun ... train.py``: the keys of configs/experiment/smoke.yaml, the phantom at
  6 patients in one shared data folder, ``trainer.progress=false``, put *before* the command's own keys (the
  command's own values win), and ``data.phantom.num_patients=6`` after them (the phantom's size always small);
  with ``-m``, every swept key (on the command line or in a preset's grid) cut to its first value, an Optuna
  search cut to 2 trials, and ``hydra.sweep.subdir=${hydra.job.num}`` (job folders named by number: the
  appended keys would make their names too long for the file system).
- ``tensorboard --logdir <dir>``: with ``--inspect`` (it reads the event files and exits instead of serving).
- ``seg-<tool>``: ``python -m seg.tools.<tool>``, the module pyproject.toml's console command names.
- ``<ACDC>``, ``<MnMs>``, ``<nnUNet_raw>``, ``<sunnybrook>``, ``<RVSC>``: a tiny tree of that release's layout
  (tests/acdc_tree.py, tests/dataset_trees.py), chosen by what follows the placeholder (``<ACDC>/database``:
  the current release; ``<ACDC>``: the 2017 one); ``<run>`` and ``<sweep>``: the latest run and sweep folder of
  the commands above it; ``<images>`` and ``<labels>``: a patient folder of the ACDC tree; any other ``<name>``
  a fresh folder of that name, the same one for each use in a file.
- ``pip install`` and ``pytest``: not run here; they are what .ci/run runs (test_ci_runs_the_set_up_commands).
- A block whose first line is ``# needs: GPUs`` or ``# needs: Slurm`` needs hardware this machine lacks: its
  commands are not run, but their overrides are composed with the real configuration.

A command that fails fails its test with the command as run and its output. The README's layer table is the
registry's list of layers, and every ``key=value`` option the table names trains once.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from acdc_tree import make_acdc_2017_tree, make_acdc_tree
from conftest import ROOT, compose_train
from dataset_trees import (make_mnms1_2020_tree, make_mnms1_tree, make_mnms2_tree, make_nnunet_tree,
                           make_rvsc_tree, make_sunnybrook_tree)

DOCUMENTS = ["README.md", "data/README.md"]
HARDWARE = {"GPUs", "Slurm"}  # what a "# needs: ..." block may need
PHANTOM_PATIENTS = 6

# the placeholder with what follows it in the command -> (the tree that stands for it, the placeholder's value)
TREES = {
    "<ACDC>/database": lambda d: make_acdc_tree(d, num_patients=6),           # <ACDC>/database/training/...
    "<ACDC>": lambda d: make_acdc_2017_tree(d),                               # the 2017 release
    "<MnMs>/OpenDataset": lambda d: make_mnms1_tree(d).parent,
    "<MnMs>": lambda d: make_mnms1_2020_tree(d),                              # the 2020 release
    "<MnMs>/MnM2": lambda d: make_mnms2_tree(d).parent,
    "<nnUNet_raw>/Dataset027_ACDC": lambda d: make_nnunet_tree(d).parent,
    "<sunnybrook>": lambda d: make_sunnybrook_tree(d),
    "<RVSC>": lambda d: make_rvsc_tree(d),
}
LATEST = {"<run>": "outputs/*/*", "<sweep>": "multirun/*/*"}  # the newest folder of the commands above
PATIENT = {"<images>", "<labels>"}  # a patient folder of the ACDC tree (images and their _gt label maps)
PLACEHOLDER = re.compile(r"<\w+>(?:/[\w.-]+)*")


@dataclass
class Command:
    document: str
    line: str
    needs: str | None = None  # hardware the block says it needs
    cut: bool = True  # a sweep cut to the first value of each swept key

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.line, comments=True)

    @property
    def parts(self) -> list[list[str]]:
        """The commands of a line joined with ``&&``."""
        parts, current = [], []
        for word in self.argv:
            if word == "&&":
                parts.append(current)
                current = []
            else:
                current.append(word)
        return [*parts, current]


def commands(document: str) -> list[Command]:
    """Every command line of the document's ```bash blocks, in order."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / document).read_text(), re.S | re.M):
        lines = block.splitlines()
        needs = None
        if lines and lines[0].startswith("# needs:"):
            needs = lines[0].removeprefix("# needs:").strip()
        found += [Command(document, line.strip(), needs) for line in lines
                  if line.strip() and not line.strip().startswith("#")]
    return found


def console_tools() -> dict[str, str]:
    """pyproject.toml's console commands: name -> module."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.partition(":")[0] for name, target in scripts.items()}


def smoke_keys() -> list[str]:
    """configs/experiment/smoke.yaml as command-line keys."""
    flat = OmegaConf.to_container(OmegaConf.create(yaml.safe_load((ROOT / "configs/experiment/smoke.yaml").read_text())))

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value}"
    return list(walk(flat, ""))


def key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def first_values(overrides: list[str]) -> list[str]:
    """Each sweep of ``overrides`` (``key=a,b,c``) cut to its first value; the others as given."""
    parser = OverridesParser.create()
    cut = []
    for text in overrides:
        override = parser.parse_override(text)
        if override.is_sweep_override():
            text = f"{text.partition('=')[0]}={next(override.sweep_string_iterator())}"
        cut.append(text)
    return cut


def is_train(words: list[str]) -> bool:
    return any(Path(word).name == "train.py" for word in words)


def split_train(words: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's words up to train.py, train.py's arguments)."""
    at = next(i for i, word in enumerate(words) if Path(word).name == "train.py")
    return words[:at], words[at + 1:]


class Failure(Exception):
    pass


@dataclass
class Session:
    """Runs a document's commands in one scratch folder, the placeholders resolved as the module says."""
    work: Path
    data_dir: Path
    values: dict[str, Path] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    def resolve(self, word: str) -> str:
        def replace(match: re.Match) -> str:
            text = match.group(0)
            name, _, rest = text.partition(">")
            name += ">"
            if text in TREES:  # the placeholder and what follows it name a release
                if text not in self.values:
                    self.values[text] = TREES[text](self.work / ".trees" / f"tree-{len(self.values)}")
                return str(self.values[text]) + text[len(name):]
            if name in LATEST:
                found = sorted((p for p in self.work.glob(LATEST[name]) if p.is_dir()), key=lambda p: p.stat().st_mtime)
                if not found:
                    raise Failure(f"{name}: no folder {LATEST[name]} made by the commands above")
                return str(found[-1]) + rest
            if name in PATIENT:
                acdc = self.values.get("<ACDC>/database") or TREES["<ACDC>/database"](self.work / ".trees" / "tree-patient")
                self.values.setdefault("<ACDC>/database", acdc)
                return str(acdc / "database" / "training" / "patient001") + rest
            if any(key.startswith(name) for key in TREES):
                raise Failure(f"{text}: no tree of this layout in TREES (tests/test_readme.py)")
            self.values.setdefault(name, self.work / name.strip("<>"))
            return str(self.values[name]) + rest
        return PLACEHOLDER.sub(replace, word)

    def argv(self, words: list[str], cut: bool = True) -> list[str] | None:
        """The process to run for one command (None: not run here)."""
        words = [self.resolve(word) for word in words]
        program = words[0]
        if program in ("pip", "pytest"):
            return None  # .ci/run runs them (test_ci_runs_the_set_up_commands)
        if program == "tensorboard":
            return [sys.executable, "-m", "tensorboard.main", *words[1:], "--inspect"]
        if program in console_tools():
            return [sys.executable, "-m", console_tools()[program], *words[1:]]
        if is_train(words):
            launcher, arguments = split_train(words)
            if launcher == ["python"]:
                launcher = [sys.executable]
            elif launcher[:1] == ["torchrun"]:
                launcher = [sys.executable, "-m", "torch.distributed.run", *launcher[1:]]
            else:
                raise Failure(f"{' '.join(words)}: train.py started by {launcher}, which this test does not know")
            return [*launcher, str(ROOT / "train.py"), *self.train_arguments(arguments, cut)]
        raise Failure(f"{' '.join(words)}: a program this test does not know how to run ({program})")

    def train_arguments(self, arguments: list[str], cut: bool = True) -> list[str]:
        multirun = "-m" in arguments or "--multirun" in arguments
        overrides = [a for a in arguments if a not in ("-m", "--multirun")]
        own = {key_of(o) for o in overrides}
        before = [*smoke_keys(), f"paths.data_dir={self.data_dir}", "trainer.progress=false"]
        before = [o for o in before if key_of(o) not in own]
        after = []
        try:  # the configuration the command will run, to know its data and its grid
            composed = compose_train(*before, *first_values(overrides), hydra=True)
        except Exception:  # noqa: BLE001 -- a command that does not compose is run as it is, and fails as it fails
            return arguments
        if composed.data.name == "phantom":
            after.append(f"data.phantom.num_patients={PHANTOM_PATIENTS}")
        if multirun or composed.hydra.mode == "MULTIRUN":
            after.append("hydra.sweep.subdir=${hydra.job.num}")  # the job folders' names, short
        if (multirun or composed.hydra.mode == "MULTIRUN") and cut:
            overrides = first_values(overrides)
            sweeper = composed.hydra.sweeper
            if "optuna" in str(sweeper.get("_target_", "")):
                after.append("hydra.sweeper.n_trials=2")
            else:
                for key, value in (sweeper.get("params") or {}).items():
                    if key_of(key) not in own:
                        after += first_values([f"{key}={value}"])
        return [*(["-m"] if multirun else []), *before, *overrides, *after]

    def run(self, command: Command) -> str:
        """Run one command line; raises Failure with the command as run and its output."""
        output = []
        for words in command.parts:
            argv = self.argv(words, command.cut)
            if argv is None:
                continue
            env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            shown = " ".join(shlex.quote(w) for w in argv)
            started = time.perf_counter()
            try:
                result = subprocess.run(argv, cwd=self.work, env=env, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired as err:
                raise Failure(f"{command.document}: `{command.line}`\nran as: {shown}\ntimed out after 600 s\n"
                              f"{err.stdout}\n{err.stderr}") from None
            print(f"{time.perf_counter() - started:5.1f} s  exit {result.returncode}  {shown}")  # shown on failure
            if result.returncode != 0:
                raise Failure(f"{command.document}: `{command.line}`\nran as: {shown}\nexit code {result.returncode}\n"
                              f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
            if words[0] == "tensorboard" and "Found event files" not in result.stdout + result.stderr:
                raise Failure(f"{command.document}: `{command.line}`: tensorboard found no event files\n{result.stdout}")
            self.ran.append(shown)
            output.append(result.stdout)
        return "\n".join(output)


@pytest.fixture
def session(tmp_path, data_dir):
    work = tmp_path / "work"
    work.mkdir()
    return Session(work, data_dir)


# ---------------------------------------------------------------------------- fast: the commands are known


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_is_one_this_test_runs(document):
    """Each command's program and placeholders are known here, and each hardware block says what it needs;
    the hardware blocks' train.py overrides compose with the real configuration (their keys exist)."""
    found = commands(document)
    assert found, f"{document} has no ```bash command"
    for command in found:
        assert command.needs is None or command.needs in HARDWARE, f"{command.line}: needs {command.needs}?"
        for words in command.parts:
            program = words[0]
            assert program in {"pip", "pytest", "tensorboard", "python", "torchrun", *console_tools()}, command.line
            for word in words:
                for text in PLACEHOLDER.findall(word):
                    name = text.partition(">")[0] + ">"
                    assert text in TREES or not any(key.startswith(name) for key in TREES), \
                        f"{command.line}: no tree of the layout {text} in TREES"
            if command.needs and is_train(words):
                compose_train(*first_values([a for a in split_train(words)[1] if a != "-m"]), hydra=True)


def test_ci_runs_the_set_up_commands():
    """The README's test command (its pip install and pytest parts) is what .ci/run runs, in the same order."""
    ci = []  # each command of .ci/run, a line's `a && b` as two, in order
    for line in (ROOT / ".ci/run").read_text().splitlines():
        words = [w for w in shlex.split(line, comments=True) if w != "--quiet"]
        ci += [part.strip() for part in " ".join(words).split(" && ") if part.strip()]
    position = 0
    tested = [command for command in commands("README.md") if any(words[0] == "pytest" for words in command.parts)]
    assert tested, "README.md has no test command"
    for command in tested:
        for words in command.parts:
            if words[0] in ("pip", "pytest"):
                wanted = " ".join(words)
                assert wanted in ci[position:], f"README's `{wanted}` is not run by .ci/run (after line {position})"
                position = ci.index(wanted, position) + 1


# ---------------------------------------------------------------------------- slow: the commands run


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_readme_commands_run(document, session):
    """Every command of the document, in order, in one scratch folder (a run then resumed, a sweep then
    summarized, a model trained then used); a hardware block is listed, not run."""
    failures, listed = [], []
    for command in commands(document):
        if command.needs:
            listed.append(f"{command.line}  (needs {command.needs})")
            continue
        try:
            session.run(command)
        except Failure as failure:
            failures.append(str(failure))
    assert session.ran, f"no command of {document} ran"
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_a_broken_command_fails_its_test(session):
    """A documented command with a misspelt key fails, naming the key, with the command's output."""
    with pytest.raises(Failure, match="lrr") as failure:
        session.run(Command("README.md", "python train.py norm=iln lrr=0.5   # one run"))
    assert "exit code 1" in str(failure.value)


def readme_layers() -> list[tuple[str, list[str]]]:
    """The README's layer table: each name and the ``key=value`` options its row names."""
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \|", (ROOT / "README.md").read_text(), re.M)
    return [(name, re.findall(r"`(\w+=\w+)`", text)) for name, text in rows]


def test_the_readme_table_is_the_registry():
    """The table's names are exactly the registered layers (each trains in the U-Net in tests/test_norms.py and
    tests/test_conditional.py), and each option a row names is one of that layer's options."""
    from seg.norms import NORMS

    layers = readme_layers()
    assert [name for name, _ in layers] and {name for name, _ in layers} == set(NORMS), sorted(NORMS)
    for name, options in layers:
        for option in options:
            assert option.partition("=")[0] in compose_train(f"norm={name}").norm, f"norm={name}: {option}?"


@pytest.mark.slow
def test_every_option_of_the_readme_table(session):
    """Each ``key=value`` option the table names trains once through train.py: ``sync`` under torchrun with two
    processes, as the table says, the others in a run of their own."""
    options = [(name, option) for name, row in readme_layers() for option in row]
    assert options
    for name, option in options:
        if option.startswith("sync="):
            line = f"torchrun --nproc_per_node=2 --standalone train.py norm={name} norm.{option} trainer.batch_size=1"
        else:
            line = f"python train.py norm={name} norm.{option}"
        session.run(Command("README.md", line))
