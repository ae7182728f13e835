"""Helpers the Ray workers of ``tests/test_sweep_ray.py`` import (test modules are not importable by name there)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from cl.executors import execute_run
from cl.sweep import RunSpec

KILL_STRATEGY = "finetune"
KILL_SEED = 0


def kill_once_at_task_boundary(run: RunSpec) -> dict[str, Any]:
    """:func:`execute_run`, except that the first attempt of one run SIGKILLs its own worker process right after the
    checkpoint of task 0 is written (a worker dying mid-run). The marker beside the run folder records the kill."""
    marker = Path(run.run_dir).parent / f".killed-{run.config.seed}"
    if run.strategy == KILL_STRATEGY and run.config.seed == KILL_SEED and not marker.exists():
        from cl.checkpoint import CheckpointStore

        write = CheckpointStore.write

        def write_then_die(self: CheckpointStore, task_id: int, *args: Any, **kwargs: Any) -> Any:
            out = write(self, task_id, *args, **kwargs)  # the boundary is complete (renamed into place) here
            if task_id == 0:
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        CheckpointStore.write = write_then_die  # type: ignore[method-assign]
    return execute_run(run, progress=False)


def must_not_run(run: RunSpec) -> dict[str, Any]:
    raise AssertionError(f"{run.label} ran although it was done")


def always_die(run: RunSpec) -> dict[str, Any]:
    """A worker that dies on every attempt (a node lost for good)."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
