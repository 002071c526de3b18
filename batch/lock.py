"""One writer per output: a lock file that a second instance of a batch job refuses to start on.

The lock is a file created exclusively (``O_CREAT | O_EXCL``) beside the output it guards, holding its
owner's host, pid and start time. A lock left by a process that no longer runs on this host is stale and
taken over (a killed job must be resumable without manual steps); a lock held by a live process, or by
another host (whose processes this one cannot see), is refused with a message naming the owner and the
file to delete once that owner is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from recsys.io import process_alive


class LockError(RuntimeError):
    """The output is locked by another run."""


def _owner() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(),
    }


def _stale(path: Path) -> bool:
    """Whether the lock at ``path`` was left by a process of this host that is gone (or is unreadable
    because its writer died between creating and filling it)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return True
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    return not isinstance(pid, int) or not process_alive(pid)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the lock file ``path`` for the duration of the block (LockError if another run holds it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if attempt == 0 and _stale(path):
                path.unlink(missing_ok=True)
                continue
            try:
                owner = path.read_text()
            except OSError:
                owner = "unknown"
            raise LockError(
                f"{path} is held by another run ({owner.strip()}); wait for it to finish, or delete the "
                "file if that process is known to be gone"
            ) from None
    with os.fdopen(descriptor, "w") as f:
        json.dump(_owner(), f)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
