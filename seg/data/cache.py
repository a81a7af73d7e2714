"""Preparing a dataset once: read every volume, preprocess it, keep the result in a cache file.

The first run on a dataset reads and preprocesses every volume (progress bar) and writes the
result -- per volume, its 256x256 image slices, label slices in the project's label set, the
slices' annotation bits and its case record -- to one file next to the data:

    <data.root>/.seg-cache/<format>-<settings>-<files>.pt     (or under data.cache_dir)
    <data.root>/.seg-cache/<format>-<settings>-<files>.json   what the .pt holds, for people

``<settings>`` hashes everything that changes the prepared tensors (format, reader options,
image_size, spacing, clip_percentiles, normalize, cache_dtype, max_patients, on_error, the
cache version, and the root's path when the cache lies in a shared ``data.cache_dir``);
``<files>`` hashes the relative path, size and modification time of every file under the
root. A later run with the same settings on unchanged files loads the tensors and
opens no image; a changed file or setting prepares again (and removes the file it replaces).
The task, the split (fold, seed, split file, vendors) and ``max_slices_per_volume`` are applied
after loading, so changing them never invalidates the cache.

The file is written to a temporary name and renamed, so a crash never leaves half a cache (and
the temporary of a killed run is removed by the next one: ``temporaries``); it is read with
``torch.load(weights_only=True)`` (plain tensors, strings and numbers only). An
unwritable root gives a warning and a run without cache. Clear it by deleting the folder, or
``seg-prepare-data <overrides> --clear``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..runtime.temporaries import remove_stale, temporary_path
from .formats import READERS, reader_options
from .readers import iter_volumes, summarize, summary_line, warn
from .slices import PreparedVolume, prepare_volume
from .volumes import DataError

CACHE_VERSION = 3  # 2: nnU-Net case ids kept and cases grouped by the conversion's naming; 3: grid_spacing
CACHE_FOLDER = ".seg-cache"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Prepared:
    """A prepared dataset: its volumes, the patients skipped as bad, and where it was cached."""

    volumes: list[PreparedVolume]
    skipped: list[dict] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)  # every labelled patient the reader found
    cache_path: Path | None = None
    from_cache: bool = False
    summary: list[dict] = field(default_factory=list)  # per subset: read, unlabeled, bad (readers.summarize)

    def record(self) -> dict:
        return {"path": str(self.cache_path) if self.cache_path else None, "hit": self.from_cache}

    def summary_lines(self) -> list[str]:
        return [summary_line(entry) for entry in self.summary]


def preprocessing_settings(cfg) -> dict:
    return {"image_size": int(cfg.image_size), "spacing": None if cfg.spacing is None else float(cfg.spacing),
            "clip_percentiles": [float(p) for p in (cfg.clip_percentiles or [])], "normalize": str(cfg.normalize)}


def cache_settings(cfg, root: Path, max_patients: int | None) -> dict:
    """Everything that changes the prepared tensors, except the files themselves.

    In a shared ``data.cache_dir`` the dataset's location is part of it too (two copies of one
    format must not replace each other's cache); inside the root it is not, so a moved dataset
    keeps its cache.
    """
    return {"version": CACHE_VERSION, "format": str(cfg.format), "reader_options": reader_options(cfg),
            "preprocessing": preprocessing_settings(cfg), "dtype": str(cfg.cache_dtype),
            "max_patients": max_patients, "on_error": str(cfg.on_error),
            "root": str(root.resolve()) if cfg.cache_dir else None}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def files_digest(root: Path, skip: Path | None) -> str:
    """A hash of the relative path, size and mtime of every non-hidden file under ``root``."""
    hasher = hashlib.sha256()
    skip = skip.resolve() if skip is not None else None
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders
                               if not d.startswith(".") and (skip is None or Path(folder, d).resolve() != skip))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue  # a dangling link: the reader reports it if it matters
            hasher.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:12]


def cache_folder(cfg, root: Path) -> Path | None:
    if not cfg.cache:
        return None
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else root / CACHE_FOLDER


def prepare_dataset(cfg, root: Path, progress: bool = True) -> Prepared:
    """The prepared volumes of the dataset at ``root``: from the cache when valid, else read and cached."""
    patients = READERS[str(cfg.format)](root, **reader_options(cfg))
    labelled = [patient for patient in patients if not patient.unlabeled]
    found = [patient.id for patient in labelled]
    selected = labelled[: cfg.max_patients]

    def finish(prepared: Prepared) -> Prepared:
        read = {volume.case["patient"] for volume in prepared.volumes}
        prepared.summary = summarize(patients, read, prepared.skipped, {p.id for p in labelled[len(selected):]})
        return prepared

    folder = cache_folder(cfg, root)
    if folder is None:
        return finish(Prepared(*read_and_prepare(selected, cfg, progress), patients=found))
    remove_stale(folder)  # temporaries of runs killed while writing this cache

    files = files_digest(root, skip=folder)
    settings = cache_settings(cfg, root, cfg.max_patients)
    path = folder / f"{cfg.format}-{digest(settings)}-{files}.pt"
    cached = load_cache(path)
    if cached is None and cfg.max_patients is not None:  # a cache of the whole dataset serves its first N
        whole = load_cache(folder / f"{cfg.format}-{digest(cache_settings(cfg, root, None))}-{files}.pt")
        if whole is not None:
            volumes, skipped, whole_path = whole
            keep = {patient.id for patient in selected}
            cached = ([v for v in volumes if v.case["patient"] in keep], [s for s in skipped if s["patient"] in keep],
                      whole_path)
    if cached is not None:
        volumes, skipped, path = cached
        for entry in skipped:
            warn(f"skipping patient {entry['patient']} (data.on_error=skip; cached): {entry['error']}")
        print(f"Data: {len(volumes)} prepared volumes loaded from the cache {path}")
        return finish(Prepared(volumes, skipped, found, path, from_cache=True))

    started = time.perf_counter()
    volumes, skipped = read_and_prepare(selected, cfg, progress)
    written = save_cache(path, volumes, skipped, settings, root)
    print(f"Data: prepared {len(volumes)} volumes in {time.perf_counter() - started:.1f} s"
          + (f"; cached in {path}" if written else ""))
    return finish(Prepared(volumes, skipped, found, path if written else None))


def read_and_prepare(patients, cfg, progress: bool) -> tuple[list[PreparedVolume], list[dict]]:
    """Read and preprocess ``patients`` (one volume in memory at a time); bad ones per ``data.on_error``."""
    settings = preprocessing_settings(cfg)
    dtype = DTYPES[str(cfg.cache_dtype)]
    volumes, skipped, sources = [], [], {}
    for volume in iter_volumes(patients, on_error=str(cfg.on_error), skipped=skipped, progress=progress,
                               desc=f"Preparing {cfg.format} data (once)"):
        if volume.case in sources:
            raise DataError(f"{volume.source}: case {volume.case} appears twice (also {sources[volume.case]}); "
                            f"point data.root at one copy of the dataset")
        sources[volume.case] = volume.source
        prepared = prepare_volume(volume, **settings)
        # stored in the cache dtype and back, so a run from the cache equals the run that wrote it
        prepared.image = prepared.image.to(dtype).float()
        volumes.append(prepared)
    if not volumes:
        raise DataError(f"no volume could be read ({len(skipped)} patient(s) skipped as bad)")
    return volumes, skipped


def load_cache(path: Path) -> tuple[list[PreparedVolume], list[dict], Path] | None:
    """(volumes, skipped, path) from a cache file, or None when it is absent or unusable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        if payload.get("version") != CACHE_VERSION:
            return None
        volumes = [PreparedVolume(v["image"].float(), v["label"], v["annotated"], json.loads(v["case"]))
                   for v in payload["volumes"]]
        return volumes, json.loads(payload["skipped"]), path
    except Exception as err:  # a damaged or foreign file: prepare again and overwrite it
        warn(f"ignoring the unreadable data cache {path} ({type(err).__name__}: {err}); preparing again")
        return None


def save_cache(path: Path, volumes: list[PreparedVolume], skipped: list[dict], settings: dict, root: Path) -> bool:
    """Write the cache atomically and remove the files it supersedes; False (with a warning) if it cannot."""
    dtype = DTYPES[settings["dtype"]]
    payload = {"version": CACHE_VERSION, "skipped": json.dumps(skipped),
               "volumes": [{"image": v.image.to(dtype), "label": v.label, "annotated": v.annotated,
                            "case": json.dumps(v.case, default=str)} for v in volumes]}
    description = {"root": str(root.resolve()), "settings": settings, "volumes": len(volumes),
                   "slices": sum(v.image.shape[0] for v in volumes), "skipped": skipped,
                   "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    temporary, umask = None, os.umask(0)
    os.umask(umask)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(description, indent=2).encode()
        writers = ((path, lambda f: torch.save(payload, f)), (path.with_suffix(".json"), lambda f: f.write(text)))
        for target, write in writers:
            temporary = temporary_path(target, hidden=True)  # names its host and pid
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask)
            with os.fdopen(handle, "wb") as file:
                write(file)
            os.replace(temporary, target)
            temporary = None
    except OSError as err:
        warn(f"cannot write the data cache in {path.parent} ({type(err).__name__}: {err}); the data will be "
             f"prepared again on every run (set data.cache_dir to a writable folder, or data.cache=false)")
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        return False
    # the same settings on older files: superseded
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*"):
        if old.stem != path.stem:
            old.unlink(missing_ok=True)
    return True


def clear_cache(cfg, root: Path) -> list[Path]:
    """Delete every cache file of this dataset's format in its cache folder; returns what was removed."""
    folder = cache_folder(cfg, root)
    if folder is None or not folder.is_dir():
        return []
    removed = sorted(folder.glob(f"{cfg.format}-*"))
    for path in removed:
        path.unlink()
    return removed
