"""What defines a run, and what only says where and how it runs: one list for every place that asks.

A run is defined by its configuration: every key changes what it computes (lr, seed, batch size,
data.spacing, the norm and its options, the schedule...) except the few listed in
``NOT_IDENTITY``, which say where the run reads and writes, how it reports, or where it runs.
The same list is used

* by Hydra to name a sweep's job folders (``hydra.job.config.override_dirname.exclude_keys`` in
  configs/train.yaml reads it through the ``${not_identity:}`` resolver), so that re-running a sweep
  with ``trainer.resume=true`` (or another data.root) finds each job's folder again;
* by seg/runtime/checkpoint.py when a run is resumed: only these keys may differ from the checkpoint's
  configuration, any other difference is refused with the old and new values;
* by seg/study/summary.py, which does not treat them as factors of a study (they are not what a run
  computed).

A key that an older version of the project did not have (a checkpoint written before the key was
added) is no difference while this run leaves it at its schema default: a key is only ever added with
a default that computes what the project computed before it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from . import schema

# Keys (dotted, as on the command line) whose value does not change what a run computes. Config
# groups that merely set other keys (experiment, hparams_search) are listed too: their effect is
# compared key by key. Hydra's own keys (hydra.*) never define a run.
NOT_IDENTITY: tuple[str, ...] = (
    # where the run reads its data and writes its files
    "data.root",                 # the same data set mounted elsewhere
    "data.cache",                # the prepared-data cache on or off (it holds the same float32 values)
    "data.cache_dir",
    "paths.data_dir",
    "trainer.resume",
    # how it reports and saves
    "trainer.progress",
    "trainer.log_every_n_steps",
    "trainer.num_panel_images",
    "trainer.save_checkpoints",
    "trainer.checkpoint_every_n_steps",
    # where it runs
    "trainer.device",
    "trainer.eval_batch_size",   # evaluation in chunks of this size; the same Dice up to rounding
    "norm.sync",                 # a run resumed on another number of processes may switch it
    # config groups, compared through the keys they set
    "experiment",
    "hparams_search",
)
NOT_IDENTITY_PREFIXES: tuple[str, ...] = ("hydra.",)


def defines_run(key: str) -> bool:
    """Whether a configuration key (dotted; a command-line ``+``/``~`` is ignored) is part of a run's identity."""
    key = key.lstrip("+~")
    return key not in NOT_IDENTITY and not key.startswith(NOT_IDENTITY_PREFIXES)


def not_identity() -> list[str]:
    """The list as the ``${not_identity:}`` resolver gives it to Hydra (exact keys: Hydra compares them as such)."""
    return list(NOT_IDENTITY)


def flatten(tree, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def schema_defaults() -> dict:
    """{dotted key: default} of every key the schema gives a default (data.*, model.*, optim.*, trainer.*)."""
    groups = {"data": schema.DataConfig, "model": schema.ModelConfig, "optim": schema.OptimConfig,
              "trainer": schema.TrainerConfig}
    defaults = {}
    for key, config in groups.items():
        defaults.update(flatten(OmegaConf.to_container(OmegaConf.structured(config)), key))
    return defaults


def identity_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint <old>, this run <new>' for each key that defines the run and differs (a key that
    one of them lacks shows as <absent>; one the checkpoint lacks and this run leaves at its schema
    default is the same computation, from before the key existed)."""
    old, new = flatten(saved), flatten(current)
    defaults = schema_defaults()
    differences = []
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new.get(key, ABSENT) == defaults[key]:
            continue
        if defines_run(key) and old.get(key, ABSENT) != new.get(key, ABSENT):
            differences.append(f"{key}: checkpoint {old.get(key, ABSENT)!r}, this run {new.get(key, ABSENT)!r}")
    return differences


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def job_folder(sweep_dir, num, override_dirname) -> str:
    """A sweep job's folder name (``hydra.sweep.subdir`` through the ``${job_folder:...}`` resolver): the folder of
    an earlier launch of the sweep whose name ends in the job's identity (``<n>_<override_dirname>``, the keys of
    ``NOT_IDENTITY`` left out), else ``<num>_<override_dirname>``. A sweep resumed with a changed grid numbers
    its jobs anew; found by its overrides, never by its position, a job that ran before continues in its own
    folder, and only the new jobs train."""
    dirname = "" if override_dirname is None else str(override_dirname)
    earlier = []
    try:
        for path in Path(str(sweep_dir)).iterdir():
            number, separator, rest = path.name.partition("_")
            if separator and number.isdigit() and rest == dirname and path.is_dir():
                earlier.append((int(number), path.name))
    except OSError:
        pass  # no sweep folder yet
    return min(earlier)[1] if earlier else f"{num}_{dirname}"

