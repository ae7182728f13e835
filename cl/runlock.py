"""Run-folder locks: one writer per run folder, stale locks of dead processes taken over.

A run holds ``<run folder>/run.lock`` from the moment it touches the folder until it returns. The lock is an
exclusive ``flock`` on that file, so the kernel releases it when the holder dies, ``kill -9`` included; the file also
records the holder (pid, host, start time, command) for the one-line refusal a second run prints. A lock file left
by a dead holder is *stale*: the next run takes it over and logs whose it was.

The file is removed on release. A run that opened the file just before it was removed could lock an unlinked inode;
:meth:`RunLock.acquire` therefore checks that the path still names the inode it locked and retries otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cl.errors import RunFolderError

__all__ = ["LOCK_NAME", "RunLock", "lock_holder", "refusal"]

LOCK_NAME = "run.lock"
log = logging.getLogger(__name__)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _read(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        obj = json.loads(raw) if raw.strip() else None
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refusal(run_dir: Path, holder: dict[str, Any] | None) -> RunFolderError:
    """The one-line error for a folder locked by a live run."""
    return RunFolderError(f"{run_dir}: locked by a running clsim run ({_describe(holder)}); wait for it to finish or "
                          f"choose another out/experiment")


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The holder of ``run_dir``'s lock if a live process holds it, else ``None`` (reads only; creates nothing)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock of one run folder (a context manager; the folder is created on :meth:`acquire`).

    Raises:
        RunFolderError: another live process holds the lock (the message names it), or the folder cannot be created.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"{self.run_dir}: cannot create the run folder ({err.strerror or err})") from None
        for _ in range(20):
            try:
                fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise RunFolderError(f"{self.path}: cannot open the lock file ({err.strerror or err})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise refusal(self.run_dir, holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by the previous holder between our open and our flock: retry on the new file
                os.close(fd)
                continue
            previous = _read(fd)
            if previous:
                self.took_over = previous
                host = socket.gethostname()
                dead = previous.get("host") == host and not _alive(previous.get("pid"))
                log.warning("%s: took over the %s lock of %s", self.run_dir, "stale" if dead else "abandoned",
                            _describe(previous))
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
                  "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunFolderError(f"{self.path}: could not lock the run folder (the lock file keeps changing)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the flock: a waiting opener retries (see module docstring)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
