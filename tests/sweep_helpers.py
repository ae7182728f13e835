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
        import cl.loop

        save = cl.loop.save_run_checkpoint

        def save_then_die(ckpt_dir: Path, model: Any, strategy: Any, state: Any, task_id: int, cfg_hash: str) -> None:
            save(ckpt_dir, model, strategy, state, task_id, cfg_hash)
            if task_id == 0:
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        cl.loop.save_run_checkpoint = save_then_die  # type: ignore[assignment]
    return execute_run(run, progress=False)


def must_not_run(run: RunSpec) -> dict[str, Any]:
    raise AssertionError(f"{run.label} ran although it was done")


def always_die(run: RunSpec) -> dict[str, Any]:
    """A worker that dies on every attempt (a node lost for good)."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
