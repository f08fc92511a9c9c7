"""Writes that a crash cannot leave half done: a file or a folder is replaced whole or not at all (and the
digest that says whether a file or folder changed).

The one place that knows how: saved learners, pretrained encoders, training checkpoints, served tasks and
every JSON record of the pipeline go through these functions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary name beside `path`, which is then renamed: a reader never sees half a
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class OverwriteRefused(ValueError):
    """An output folder that holds something else than what would replace it."""


def check_replaceable(directory: str | Path, marker: str | None, force: bool = False) -> None:
    """Refuse to replace an existing, non-empty folder unless it holds `marker` (it is an output of the same
    kind: a metanlp model has learner.json) or `force` says so: a wrong --out never deletes a user's folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OverwriteRefused(f"{directory}: exists and is not a folder; choose another output path")
    if force or not directory.is_dir() or not any(directory.iterdir()):
        return
    if marker is None or not (directory / marker).exists():
        what = f"has no {marker}" if marker else "is not empty"
        raise OverwriteRefused(f"{directory}: exists and {what}, so it is not an output of this kind; nothing was "
                               "written; choose another output folder, or pass --force to replace it")


def replace_directory(directory: str | Path, write: Callable[[Path], None], marker: str | None = None,
                      force: bool = False) -> Path:
    """Fill a staging folder with `write`, then swap it in for `directory`: a crash leaves the old
    contents, never half of the new ones. An existing folder is replaced only if it holds `marker` (or
    `force`): see `check_replaceable`."""
    directory = Path(directory)
    check_replaceable(directory, marker, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def file_digest(path: Path) -> str:
    """md5 of a file, or of a folder's relative names and contents; 'missing' when absent."""
    if not path.exists():
        return "missing"
    digest = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
