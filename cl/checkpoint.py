"""Task-boundary checkpoints written as one unit, verified on resume, with fallback to the previous boundary.

Layout inside a run folder::

    checkpoint/task_002/{tensors.safetensors, state.json, manifest.json}
    checkpoint/task_003/{...}

A boundary is written into ``checkpoint/task_NNN.tmp`` (each file fsynced; ``manifest.json`` last, naming every file
with its size and sha256, the config hash and the length of ``metrics.jsonl`` at the boundary), then renamed to
``task_NNN`` in one ``os.rename``; only then are boundaries older than the previous one deleted. A kill at any moment
therefore leaves the previous boundary intact and at most one ``.tmp`` folder, which is ignored and later removed
(old boundaries are renamed to ``.tmp`` before they are deleted, for the same reason).

On resume :func:`verify_checkpoint` checks the manifest, the files' hashes and the config hash of the newest boundary;
a boundary that fails (or fails to load) is rejected with a logged reason and the previous one is tried.

:func:`save_run_checkpoint` / :func:`load_run_checkpoint` write and read one boundary folder; the Avalanche bridge uses
them directly on a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cl.errors import NumericalError, RunFolderError
from cl.faults import fault_point
from cl.runlog import fsync_dir, write_file_synced

if TYPE_CHECKING:
    from cl.model import CLModel
    from cl.strategy import Strategy

__all__ = [
    "CheckpointStore",
    "MANIFEST",
    "VOLATILE_KEYS",
    "config_diff",
    "save_run_checkpoint",
    "load_run_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
#: config keys that may change between a run and its resume (they do not shape results)
VOLATILE_KEYS = ("train.progress", "train.num_workers")
_BOUNDARY = re.compile(r"task_(\d{3,})")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_run_checkpoint(ckpt_dir: Path, model: CLModel, strategy: Strategy, state: dict[str, Any], task_id: int,
                        cfg_hash: str, log_bytes: int | None = None) -> None:
    """Write one task boundary into ``ckpt_dir`` (a fresh folder): tensors, JSON state, then the manifest.

    Args:
        ckpt_dir: the folder to fill (created if needed); :class:`CheckpointStore` passes a ``.tmp`` folder.
        model, strategy: what to save (the model minus its frozen backbone, plus :meth:`Strategy.state`).
        state: the loop's JSON-able bookkeeping (accuracy rows, timings, events).
        task_id: the task just finished. cfg_hash: hash of the result-shaping config.
        log_bytes: length of ``metrics.jsonl`` at this boundary (a resume truncates the log to it).

    Raises:
        NumericalError: a tensor to save holds NaN or infinity (a bad boundary is never written).
    """
    import torch
    from safetensors.torch import save

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta, extra = strategy.state()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tensors.update({f"strategy.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NumericalError(f"checkpoint after task {task_id}: non-finite values in {', '.join(bad[:3])}; the "
                             f"previous boundary is kept")
    blobs = {
        TENSORS: save(tensors),
        STATE: (json.dumps({
            "task_done": task_id, "config_hash": cfg_hash, "structure": model.structure(), "strategy": meta,
            "loop": state, "routes": {k: _route_spec(s.route) for k, s in model.sites.items()},
        }, allow_nan=False) + "\n").encode(),
    }
    for name, data in blobs.items():
        write_file_synced(ckpt_dir / name, data, f"checkpoint.{name.split('.')[0]}")
    manifest = {"format": 1, "task_done": task_id, "config_hash": cfg_hash, "log_bytes": log_bytes,
                "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in blobs.items()}}
    write_file_synced(ckpt_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), "checkpoint.manifest")
    fsync_dir(ckpt_dir)


def _route_spec(route: Any) -> dict[str, Any] | None:
    if route.index is not None or route.weights is not None:
        return None  # transient routes are not persisted; strategies set them per forward
    return {"kind": route.kind, "names": list(route.names)}


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed manifest of a boundary folder; raises :class:`RunFolderError` naming the file."""
    path = ckpt_dir / MANIFEST
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: unreadable ({err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("files"), dict) or "task_done" not in obj:
        raise RunFolderError(f"{path}: not a checkpoint manifest")
    return obj


def verify_checkpoint(ckpt_dir: Path, cfg_hash: str) -> str | None:
    """Why the boundary in ``ckpt_dir`` cannot be resumed (``None`` if it can): manifest, sizes, hashes, config."""
    try:
        manifest = read_manifest(ckpt_dir)
    except RunFolderError as err:
        return str(err)
    if manifest.get("config_hash") != cfg_hash:
        return f"{ckpt_dir}: written by a different config (hash {manifest.get('config_hash')}, now {cfg_hash})"
    for name in (TENSORS, STATE):
        if name not in manifest["files"]:
            return f"{ckpt_dir / MANIFEST}: does not list {name}"
    for name, want in manifest["files"].items():
        path = ckpt_dir / name
        try:
            data = path.read_bytes()
        except OSError as err:
            return f"{path}: unreadable ({err.strerror or err})"
        if len(data) != want.get("bytes") or _sha256(data) != want.get("sha256"):
            return f"{path}: content differs from the manifest (size {len(data)}, expected {want.get('bytes')})"
    return None


def load_run_checkpoint(ckpt_dir: Path, model: CLModel, strategy: Strategy, state: dict[str, Any],
                        cfg_hash: str) -> int:
    """Restore a boundary into a freshly built model and strategy; returns the first task still to train.

    A folder with a manifest is verified first. Raises :class:`RunFolderError` (one line naming the folder) when the
    boundary is corrupt, was written by another config, or does not fit the model.
    """
    from safetensors.torch import load_file

    from cl.mixture import Route

    if (ckpt_dir / MANIFEST).exists():
        reason = verify_checkpoint(ckpt_dir, cfg_hash)
        if reason:
            raise RunFolderError(reason)
    try:
        meta = json.loads((ckpt_dir / STATE).read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{ckpt_dir / STATE}: unreadable ({err})") from None
    if meta["config_hash"] != cfg_hash:
        raise RunFolderError(f"checkpoint in {ckpt_dir} was written by a different config; rerun without --resume "
                             f"or with the original config")
    try:
        tensors = load_file(str(ckpt_dir / TENSORS))
    except Exception as err:  # safetensors raises its own error type for torn or foreign files
        raise RunFolderError(f"{ckpt_dir / TENSORS}: unreadable ({err})") from None
    model.load_structure(meta["structure"])
    strategy.rebuild(model, meta["strategy"])
    model_t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(model_t, strict=False)
    except RuntimeError as err:  # size mismatch
        raise RunFolderError(f"{ckpt_dir}: does not fit the model ({str(err).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise RunFolderError(f"{ckpt_dir}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, r in meta["routes"].items():
        if r is not None and key in model.sites:
            model.sites[key].route = Route(r["kind"], tuple(r["names"]))
    strategy.load_state(model, meta["strategy"],
                        {k[len("strategy."):]: v for k, v in tensors.items() if k.startswith("strategy.")})
    state.update(meta["loop"])
    return int(meta["task_done"]) + 1


class CheckpointStore:
    """The boundaries of one run folder (``<run>/checkpoint/task_NNN``), newest ``keep`` kept.

    Args:
        root: the ``checkpoint`` folder. keep: boundaries kept after a write (2: the new one and its fallback).
    """

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def boundaries(self) -> list[tuple[int, Path]]:
        """Complete boundaries ``(task_done, folder)``, newest first (``.tmp`` folders are never listed)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _BOUNDARY.fullmatch(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        if (self.root / STATE).exists():
            log.warning("%s holds a checkpoint in the old single-folder layout; it is ignored", self.root)
        return sorted(out, reverse=True)

    def write(self, task_id: int, fill: Callable[[Path], None]) -> Path:
        """Fill ``task_NNN.tmp`` with ``fill(folder)``, rename it to ``task_NNN``, then prune old boundaries."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"task_{task_id:03d}"
        tmp = self.root / f"{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a torn write from a killed run
        tmp.mkdir()
        fill(tmp)
        fault_point("checkpoint.rename")
        if final.exists():  # rewritten after a resume from an older boundary
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep`` boundaries (renamed to ``.tmp`` first: a half-deleted one is ignored)."""
        for _, path in self.boundaries()[self.keep:]:
            doomed = path.with_name(f"{path.name}.old.tmp")
            path.rename(doomed)
            fault_point("checkpoint.prune")
            shutil.rmtree(doomed, ignore_errors=True)

    def discard_after(self, task_done: int) -> list[Path]:
        """Delete boundaries newer than ``task_done`` (rejected on resume) and torn ``.tmp`` folders."""
        gone = [p for n, p in self.boundaries() if n > task_done]
        if self.root.is_dir():
            gone += [p for p in self.root.iterdir() if p.name.endswith(".tmp")]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = VOLATILE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: old -> new`` (``ignore`` skipped)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if k not in ignore)
    return [f"{k}: {a.get(k, _ABSENT)!r} -> {b.get(k, _ABSENT)!r}" for k in keys
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()
