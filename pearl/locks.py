"""One evaluation per job, however many sweeps run at once: a lock file per job.

``runs/<hash>.lock`` is held with ``flock`` while the job evaluates and names its owner (pid, host,
start time). The kernel (or the NFS server) releases the lock when the owner exits, killed or not,
so a lock whose owner is gone is simply taken by the next process; the file itself is only
informative. Where the filesystem has no ``flock`` (some Lustre mounts), evaluation goes on unlocked
after one warning. See docs/records.md.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path


class JobLock:
    """An acquired lock; ``release()`` (or leaving the ``with`` block) removes it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then sees the path gone
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "JobLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_owner(path: Path) -> dict:
    """The owner a lock file names ({} when unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


_unsupported_warned = False


def try_lock(path: str | os.PathLike) -> JobLock | None:
    """The job's lock, or None when another live process holds it."""
    global _unsupported_warned
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            os.close(fd)
            if not _unsupported_warned:
                warnings.warn(f"the filesystem of {path.parent} does not support file locks ({error.strerror}); "
                              f"two sweeps started together may evaluate a job twice", RuntimeWarning, stacklevel=2)
                _unsupported_warned = True
            return JobLock(path, None)
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous owner removed the file between our open and our lock: retry
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        return JobLock(path, fd)
