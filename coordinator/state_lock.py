"""One coordinator per state folder: an exclusive lock held for the coordinator's lifetime.

Two coordinators on one ``state_dir`` would both commit rounds and lose acknowledged updates. The
lock is ``flock`` on ``<state_dir>/coordinator.lock``: the kernel drops it when the process dies,
so a crash (SIGKILL included) never leaves a stale lock behind. The file says who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "coordinator.lock"


class StateDirBusy(RuntimeError):
    """Another live coordinator holds the state folder."""


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise StateDirBusy(
                f"state_dir {self.path.parent} is in use by another coordinator ({holder}): "
                "stop that one, or give this one another state_dir"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since_unix": int(time.time())}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(info["since_unix"])))
        return f"pid {int(info['pid'])} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "its process is unknown"
