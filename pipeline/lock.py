"""One run at a time per output directory: an advisory lock file in the state directory.

The lock is ``fcntl.flock`` on a file that also records who holds it (pid, host, start).
The kernel releases a flock when its process dies, SIGKILL included, so a killed run never
leaves a lock that blocks the next one; the next run finds the dead holder's record in the
file, reports that it took the lock over, and overwrites it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import TilepipeError


class LockHeld(TilepipeError, RuntimeError):
    """Another run of the same workflow holds the lock; the message names it."""


def lock_path(state_dir: Path, output_dir: Path) -> Path:
    """The lock of the workflow writing ``output_dir`` (several may share one state directory)."""
    key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:10]
    return Path(state_dir) / f"run-{key}.lock"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


@contextlib.contextmanager
def hold_lock(path: Path, *, what: str = "this workflow") -> Iterator[dict | None]:
    """Hold the lock at ``path`` for the block; yields the record of a dead holder it took over.

    Raises :class:`LockHeld` at once if a live process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeld(f"another run of {what} is in progress ({describe(_read_holder(fd))}; "
                           f"lock {path}); this run did nothing") from None
        stale = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # an empty lock file means the last run ended cleanly
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
