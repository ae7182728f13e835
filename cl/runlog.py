"""Run-folder I/O: atomic writes with normal permissions, the JSONL event log and its repair after a crash.

Every file of a run folder is written in one of two ways:

- **atomically** (:func:`atomic_write_bytes`): a temporary file in the same folder, created with mode ``0o666``
  minus the umask (``tempfile.mkstemp`` would leave ``0600``), written, fsynced, then ``os.replace``-d over the
  target and the folder fsynced. A reader sees the old file or the new one, never a mix;
- **appended** (:class:`JsonlLog`): one JSON record per line. A kill mid-append leaves a partial last line, which
  :func:`repair_jsonl` removes on resume (it also drops the records written after the boundary the run resumes
  from, so the log of a resumed run equals the log of an uninterrupted one plus a ``resume`` record).

The writes call :func:`cl.faults.fault_point` half-way, which is how the crash drill kills a run inside a write.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cl.faults import fault_point

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir", "JsonlLog", "repair_jsonl"]


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_synced(path: str | Path, data: bytes, point: str | None = None) -> None:
    """Create ``path`` (mode 0o666 minus the umask), write ``data``, fsync. ``point``: fault point half-way."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        half = len(data) // 2
        if half:
            os.write(fd, data[:half])
        if point is not None:
            fault_point(point)
        view = memoryview(data)[half:]
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, point: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    Args:
        path: target file; its folder is created if needed.
        data: the complete new content.
        point: fault-injection point reached half-way through the write (see :mod:`cl.faults`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write_file_synced(tmp, data, point)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, point: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), point)


def atomic_write_json(path: str | Path, obj: Any, point: str | None = None) -> None:
    """Write ``obj`` as indented JSON (NaN and infinities refused) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_default) + "\n", point)


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class JsonlLog:
    """Append-only JSONL event log: one record per line with ``time`` and ``event`` fields; keys ``split/metric``.

    ``path=None`` discards records (sessions driven without a run folder). ``deferred=True`` keeps records in memory
    until :meth:`open` (a run builds everything before it may touch its folder).
    """

    def __init__(self, path: str | Path | None, deferred: bool = False, **static: Any) -> None:
        self.path = Path(path) if path is not None else None
        self.static = static
        self._pending: list[bytes] | None = [] if deferred else None
        if self.path is not None and not deferred:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        """Start writing to the file: pending records first (no-op unless deferred)."""
        pending, self._pending = self._pending, None
        for data in pending or []:
            self._append(data)

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        rec = {"time": round(time.time(), 3), "event": event, **self.static, **fields}
        data = (json.dumps(rec, default=_default) + "\n").encode("utf-8")
        if self._pending is not None:
            self._pending.append(data)
            return
        self._append(data)

    def _append(self, data: bytes) -> None:
        assert self.path is not None
        fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            fault_point("metrics")
            os.write(fd, data[half:])
        finally:
            os.close(fd)

    def sync(self) -> int:
        """fsync the log and return its size in bytes (recorded by a checkpoint as the boundary's log length)."""
        if self.path is None or not self.path.exists():
            return 0
        fd = os.open(str(self.path), os.O_RDONLY)
        try:
            os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)


def repair_jsonl(path: str | Path, keep_bytes: int | None = None) -> dict[str, Any]:
    """Make a JSONL log end on a complete record: truncate to ``keep_bytes`` or drop a partial last line.

    Args:
        path: the log (a missing file is fine).
        keep_bytes: length of the log at the boundary a run resumes from (``None``: keep every complete line).

    Returns:
        ``{"dropped_records": {event: count}, "dropped_partial_line": bool}`` describing what was removed.
    """
    path = Path(path)
    info: dict[str, Any] = {"dropped_records": {}, "dropped_partial_line": False}
    if not path.exists():
        return info
    data = path.read_bytes()
    keep = len(data) if keep_bytes is None or keep_bytes > len(data) else keep_bytes
    cut = data.rfind(b"\n", 0, keep) + 1  # the end of the last complete line within the kept prefix
    tail = data[cut:]
    if not tail:
        return info
    counts: Counter[str] = Counter()
    *complete, last = tail.split(b"\n")
    info["dropped_partial_line"] = bool(last)  # no newline after it: torn by a kill mid-append
    for line in complete:
        try:
            counts[str(json.loads(line).get("event"))] += 1
        except (ValueError, AttributeError):
            counts["unparseable"] += 1
    info["dropped_records"] = dict(counts)
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return info
