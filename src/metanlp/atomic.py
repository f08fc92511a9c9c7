"""Writes that a crash cannot leave half done: a file or a folder is replaced whole or not at all (and the
digest that says whether a file or folder changed).

The one place that knows how: saved learners, pretrained encoders, training checkpoints, served tasks and
every JSON record of the pipeline go through these functions.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary name beside `path`, which is then renamed: a reader never sees half a
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # one per writer
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


def file_in_the_way(path: Path) -> Path | None:
    """An ancestor of `path` that is a file, so that nothing can be written at `path`; None if there is none."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def check_replaceable(directory: str | Path, marker: str | None, force: bool = False) -> None:
    """Refuse to replace an existing, non-empty folder unless it holds `marker` (it is an output of the same
    kind: a metanlp model has learner.json) or `force` says so: a wrong --out never deletes a user's folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OverwriteRefused(f"{directory}: exists and is not a folder; choose another output path")
    if (blocking := file_in_the_way(directory)) is not None:
        raise OverwriteRefused(f"{directory}: {blocking} is a file, so nothing can be written under it; "
                               "choose another output path")
    if force or not directory.is_dir() or not any(directory.iterdir()):
        return
    if marker is None or not (directory / marker).exists():
        what = f"has no {marker}" if marker else "is not empty"
        raise OverwriteRefused(f"{directory}: exists and {what}, so it is not an output of this kind; nothing was "
                               "written; choose another output folder, or pass --force to replace it")


FAULT_ENV = "METANLP_FAULT"  # crash tests only: "<point>" or "<point>@<n>" SIGKILLs at the n-th pass of <point>
_fault_passes: dict[str, int] = {}  # per process, read only when the variable is set


def fault_point(name: str) -> None:
    """Where a crash test may kill the process (SIGKILL, as an OOM killer or a power cut would): a no-op
    unless METANLP_FAULT names this point."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point == name:
        _fault_passes[name] = _fault_passes.get(name, 0) + 1
        if _fault_passes[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(directory: str | Path) -> None:
    """Remove what a killed writer left beside `directory` (its staging or retired copies; a process still
    running keeps its own). If the kill fell between the two renames of the fallback swap, so that only the
    retired copy exists, it is put back: the folder always ends up holding a complete old or new version."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return
    written = re.compile(rf"\.{re.escape(directory.name)}\.(staging|old)-(\d+)(-.*)?")  # as replace_directory names
    for leftover in directory.parent.glob(f".{directory.name}.*-*"):
        match = written.fullmatch(leftover.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not directory.exists():
            leftover.rename(directory)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def replace_directory(directory: str | Path, write: Callable[[Path], None], marker: str | None = None,
                      force: bool = False) -> Path:
    """Fill a staging folder with `write`, then swap it in for `directory` in one atomic step: at every
    instant `directory` holds the complete old or the complete new contents, never half of either. An existing
    folder is replaced only if it holds `marker` (or `force`): see `check_replaceable`. Leftovers of a killed
    earlier writer are cleaned first."""
    directory = Path(directory)
    check_replaceable(directory, marker, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-{os.getpid()}-", dir=directory.parent))
    try:
        write(staging)
        fault_point(f"{directory.name}.staged")
        if not directory.exists():
            staging.rename(directory)
        elif _exchange(staging, directory):
            fault_point(f"{directory.name}.swapped")
            shutil.rmtree(staging)  # now the old contents
        else:  # no atomic exchange here: a crash between the renames is repaired by clean_leftovers
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            shutil.rmtree(retired, ignore_errors=True)
            directory.rename(retired)
            fault_point(f"{directory.name}.retired")
            staging.rename(directory)
            shutil.rmtree(retired)
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
