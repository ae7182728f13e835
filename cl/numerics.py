"""Numeric-fault detection: non-finite or exploding values end a run with a :class:`~cl.errors.NumericalError`.

Checks, all free of extra device synchronisation in a training step:

- every training step's loss (the loop already reads it with ``float(loss)``): NaN/inf, or ``|loss|`` above
  ``train.loss_limit`` (default ``1e6``; ``null`` disables the blow-up check) is a fault;
- every evaluation's predictions (logits of any strategy, training-free ones included, e.g. SimpleCIL on a backbone
  that produces NaN): one flag per batch stays on the device and is read once after the pass;
- every checkpoint's tensors (:func:`cl.checkpoint.save_run_checkpoint`), so a bad boundary is never written.

A fault writes a ``numerical_fault`` record (task, phase, epoch, step, value) to ``metrics.jsonl`` and raises; the
run folder keeps its last good boundary, and ``clsim`` exits with code 2 and one line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cl.errors import NumericalError

__all__ = ["check_loss", "LogitWatch"]


def _fault(log: Any, task: int, phase: str, epoch: int | None, step: int | None, value: float | None,
           what: str) -> NumericalError:
    log.write("numerical_fault", task=task, phase=phase, epoch=epoch, step=step,
              value=None if value is None or not math.isfinite(value) else value, what=what)
    where = f"task {task}, phase {phase}" + (f", epoch {epoch}" if epoch is not None else "") + (
        f", step {step}" if step is not None else "")
    return NumericalError(f"{what} ({where}); the run stopped at the last good task boundary")


def check_loss(loss: float, limit: float | None, log: Any, task: int, phase: str, epoch: int, step: int) -> None:
    """Raise :class:`NumericalError` (after logging the event) if ``loss`` is non-finite or beyond ``limit``.

    Args:
        loss: the step's loss, already a Python float. limit: ``train.loss_limit`` (``None``: no blow-up check).
        log: the run's :class:`~cl.runlog.JsonlLog`. task, phase, epoch, step: where (0-based epoch and step).
    """
    if not math.isfinite(loss):
        raise _fault(log, task, phase, epoch, step, loss, f"non-finite training loss {loss}")
    if limit is not None and abs(loss) > limit:
        raise _fault(log, task, phase, epoch, step, loss,
                     f"training loss {loss:.4g} beyond train.loss_limit={limit:g} (a blow-up)")


class LogitWatch:
    """Collects one on-device "all finite" flag per evaluation batch; :meth:`check` reads them once."""

    def __init__(self) -> None:
        self.flags: list[Tensor] = []

    def observe(self, logits: Tensor) -> None:
        """NaN and +inf are faults; -inf is a masked class (MHR's task scope, old classes) as long as every row
        keeps at least one finite score."""
        bad = torch.isnan(logits).any() | torch.isposinf(logits).any()
        self.flags.append(~bad & torch.isfinite(logits).any(dim=-1).all())

    def check(self, log: Any, task: int) -> None:
        """Raise :class:`NumericalError` naming the first batch (``step``) with a non-finite prediction."""
        if not self.flags:
            return
        ok = torch.stack(self.flags).cpu()
        self.flags = []
        if bool(ok.all()):
            return
        step = int((~ok).nonzero()[0, 0])
        raise _fault(log, task, "eval", None, step, None, f"non-finite predictions in the evaluation after task {task}")
