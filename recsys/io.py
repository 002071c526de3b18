"""Atomic file and directory writes shared by every job that leaves results behind (torch-free)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file is in ``path``'s own directory (so the rename never crosses devices) and is
    flushed to disk before the rename, and the directory after it: readers, and a machine that loses
    power, see the previous file or the new one, never half of one. On an exception the temporary file
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with tmp.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux >= 3.15)
_AT_FDCWD = -100
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(-[0-9a-f]+)?$")


def exchange_directory(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``'s place in one atomic step; ``new`` then holds the old content.

    Linux's ``renameat2(RENAME_EXCHANGE)`` leaves a complete directory at ``target`` at every instant.
    Where it is missing (another OS, an old kernel, a file system without it) two renames are used
    instead, with a window of a few microseconds in which ``target`` does not exist.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, f"cannot swap {new} into {target}: {os.strerror(code)}")
    old = new.with_name(new.name + ".old")
    os.rename(target, old)
    os.rename(new, target)
    os.rename(old, new)


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield a new hidden directory beside ``target`` to fill; on success it takes ``target``'s place in
    one atomic step (:func:`exchange_directory`) and the previous content is removed. On an exception it
    is removed and ``target`` is left as it was. Staging directories of writers that died are removed
    first (:func:`remove_stale_temporaries`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            exchange_directory(staging, target)
        else:
            os.rename(staging, target)
        _fsync_directory(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the hidden temporaries of ``path`` (``.NAME.tmp-PID[-…]``) whose writer process is gone,
    e.g. an export killed mid-write; returns what was removed. Temporaries of live writers are kept."""
    removed = []
    for candidate in path.parent.glob(f".{path.name}.tmp-*"):
        match = _TEMPORARY.match(candidate.name)
        if match is None or match["name"] != path.name or process_alive(int(match["pid"])):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed
