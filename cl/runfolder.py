"""Run-folder preparation around :func:`cl.loop.run`: checks that write nothing, and the folder set-up under the lock.

- :func:`check_out_path`: the folder can be created (existing ancestors are writable folders);
- :func:`check_resume_config`: ``--resume`` continues only the same config (one line naming the keys that differ);
- :func:`prepare_folder` (under the run lock): on resume, drop boundaries newer than the one resumed from and cut
  ``metrics.jsonl`` back to its length at that boundary (a torn last line and the dead attempt's records go; a
  ``resume`` record says what was dropped); on a fresh run, clear a previous run's result, log and checkpoints so
  the folder never mixes two runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from cl.checkpoint import CheckpointStore, config_diff, read_manifest
from cl.errors import RunFolderError
from cl.runlog import JsonlLog, repair_jsonl

__all__ = ["check_out_path", "check_resume_config", "prepare_folder"]

log = logging.getLogger(__name__)


def check_out_path(run_dir: Path) -> None:
    """The run folder can be created: every existing ancestor is a writable folder (checked without writing)."""
    p = run_dir
    while not p.exists():
        if p.parent == p:
            return
        p = p.parent
    if not p.is_dir():
        raise RunFolderError(f"{p}: not a folder; out/experiment must name a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunFolderError(f"{p}: not writable")


def check_resume_config(run_dir: Path, store: CheckpointStore, cfg_dict: dict[str, Any], cfg_hash: str) -> None:
    """``--resume`` continues only the same config: one line naming the keys that differ."""
    boundaries = store.boundaries()
    if not boundaries:
        return
    path = run_dir / "config.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{path}: unreadable ({str(err)[:120]}); rerun without --resume to start over") \
                from None
        saved = {k: v for k, v in saved.items() if k not in ("versions", "config_hash")}
        diff = config_diff(saved, cfg_dict)
        if diff:
            raise RunFolderError(f"{run_dir}: --resume with a different config; keys differ: {'; '.join(diff[:6])}"
                                 f"{' ...' if len(diff) > 6 else ''} (rerun without --resume, or restore them)")
    try:
        manifest = read_manifest(boundaries[0][1])
    except RunFolderError:
        return  # rejected (and logged) when the boundaries are verified
    if manifest.get("config_hash") != cfg_hash:
        raise RunFolderError(f"{run_dir}: checkpoint was written by a different config; rerun without --resume "
                             f"or with the original config")


def prepare_folder(run_dir: Path, store: CheckpointStore, jlog: JsonlLog, resume: bool, boundary: Path | None,
                   start_task: int, rejected: list[dict[str, Any]]) -> None:
    """Under the lock: repair the log and drop rejected boundaries (resume), or clear a previous run (fresh)."""
    log_path = run_dir / "metrics.jsonl"
    for torn in run_dir.glob(".*.tmp"):  # temporary files of atomic writes killed half-way
        torn.unlink(missing_ok=True)
    if boundary is not None:
        manifest = read_manifest(boundary)
        store.discard_after(start_task - 1)
        store.prune()
        dropped = repair_jsonl(log_path, manifest.get("log_bytes"))
        jlog.open()
        for r in rejected:
            jlog.write("checkpoint_rejected", **r)
        jlog.write("resume", from_task=start_task, checkpoint=boundary.name, **dropped)
        log.info("resumed %s after task %d (%s)", run_dir, start_task - 1, boundary.name)
        return
    if resume:
        log.info("--resume: no usable checkpoint in %s; starting fresh", run_dir)
    old = [p for p in (run_dir / "result.json", log_path) if p.exists()]
    if old or store.root.exists():
        log.info("%s: replacing the previous run's result, log and checkpoints", run_dir)
    for p in old:
        p.unlink()
    shutil.rmtree(store.root, ignore_errors=True)
    jlog.open()
    for r in rejected:
        jlog.write("checkpoint_rejected", **r)
    if resume:
        jlog.write("resume", from_task=0, checkpoint=None, reason="no usable checkpoint; starting fresh")
