"""An exclusive lock on an output directory (a training workdir, a conversion output).

`with WorkdirLock(path): ...` creates `path/.lov_jax.lock` atomically (O_EXCL) holding
the holder's host, pid, process start time and command line, and removes it on exit. A
second process that opens the same directory raises `WorkdirLocked` at once, naming the
holder. A lock left by a process that died (SIGKILL, OOM) is stale: on the holder's own
host a dead pid (or a pid reused by a newer process, told apart by its start time) is
detected and the lock is taken over with a warning; a lock from another host is never
broken automatically (its pid means nothing here): the message says which file to delete.

Reentrant within one process (a command that locks its output, then calls a library
function that locks it again): the lock file goes when the outermost holder releases.
Local (POSIX) filesystems only; O_EXCL on NFS v3+ is atomic too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lov_jax.lock"
_HELD: dict[Path, int] = {}  # lock file -> holders in this process


class WorkdirLocked(RuntimeError):
    """Another live process holds the directory's lock."""


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), after "(comm)"


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = process_start_time(pid)
    return start is None or now is None or now == start  # else: the pid was reused


class WorkdirLock:
    """Exclusive lock on `directory` (created if missing); reentrant in one process."""

    def __init__(self, directory: str | Path, what: str = "workdir"):
        self.directory = Path(directory).absolute()
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.held = False

    def holder(self) -> dict | None:
        """The lock file's contents, or None when there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # half-written by a killed holder: no pid to trust
            return {"host": socket.gethostname(), "pid": -1, "start": None}

    def acquire(self) -> WorkdirLock:
        if self.held:
            return self
        if _HELD.get(self.path):
            _HELD[self.path] += 1
            self.held = True
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        for _ in range(3):  # a stale lock is removed, then the O_EXCL create retried
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = self.holder()
                if held is not None and not self._stale(held):
                    raise WorkdirLocked(self._in_use(held)) from None
                if held is not None:
                    message = (f"{self.path}: stale lock of pid {held.get('pid')} on "
                               f"{held.get('host')} (no longer running) taken over")  # fmt: skip
                    log.warning(message)
                    print(f"WARNING: {message}", flush=True)
                    self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _HELD[self.path] = 1
            return self
        raise WorkdirLocked(f"{self.directory}: could not take the {self.what} lock {self.path}")

    def _stale(self, held: dict) -> bool:
        if held.get("host") != socket.gethostname():
            return False
        pid = int(held.get("pid", -1))
        return pid <= 0 or not _alive(pid, held.get("start"))

    def _in_use(self, held: dict) -> str:
        return (
            f"{self.directory} is in use by another process (pid {held.get('pid')} on "
            f"{held.get('host')}, since {held.get('since', '?')}: {held.get('command', '')!r}); "
            f"wait for it to finish, or use another {self.what}. If that process is gone "
            f"(another host's lock is never broken automatically), delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            _HELD[self.path] -= 1
            if _HELD[self.path] > 0:
                return
            del _HELD[self.path]
            held = self.holder()
            if held is not None and held.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
