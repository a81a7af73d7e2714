"""The ``key=value`` options of the console commands (seg-predict, seg-evaluate, seg-export): parsed and
checked at start, a bad one refused with one line naming the key (``OptionError``)."""

from __future__ import annotations

from pathlib import Path


class OptionError(ValueError):
    """An option value refused at start; the message names the key."""


def parse_key_values(argv: list[str], defaults: dict, usage: str) -> dict:
    """Hydra-style ``key=value`` arguments over ``defaults`` (None: required); an unknown, repeated or
    missing key (a required one given empty counts as missing) ends the program with one line naming
    it (exit code 1) and ``usage``."""
    values, seen = dict(defaults), set()
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"error: unexpected argument {argument!r} (known: {', '.join(defaults)})\n{usage}")
        if key in seen:
            raise SystemExit(f"error: {key}= is given twice\n{usage}")
        seen.add(key)
        values[key] = value
    missing = [key for key, value in values.items() if defaults[key] is None and not value]
    if missing:
        raise SystemExit(f"error: missing {', '.join(f'{k}=...' for k in missing)}\n{usage}")
    return values


def parse_bool(key: str, value: str) -> bool:
    """``true`` or ``false`` (any case), else an OptionError naming ``key``."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise OptionError(f"{key}={value}: must be true or false")


def parse_positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise OptionError(f"{key}={value}: must be an integer >= 1")
    return number


def check_new_file(key: str, value: str, path: Path, suffix: str, overwrite: bool) -> None:
    """Refuse, naming ``key``, a file a tool is to write (``path``; ``value`` as the user gave it) that has
    another extension, is a folder (never replaced, even with ``overwrite=true``), lies in a folder that does
    not exist, or exists without ``overwrite=true``."""
    if path.suffix != suffix:
        raise OptionError(f"{key}={value}: must end in {suffix}")
    if path.is_dir():
        raise OptionError(f"{key}={value}: is a folder; give the name of a file to write, e.g. "
                          f"{key}={path / ('model' + suffix)}")
    if not path.parent.is_dir():
        raise OptionError(f"{key}={path}: folder {path.parent} does not exist")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OptionError(f"{key}={path}: exists (pass overwrite=true to replace it)")
