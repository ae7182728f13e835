"""Fault injection for crash drills: a process kills (or stops) itself at a named write point.

Every write of a task boundary calls :func:`fault_point` with a name (``checkpoint.tensors``, ``checkpoint.state``,
``checkpoint.manifest``, ``checkpoint.rename``, ``checkpoint.prune``, ``metrics``, ``result``, ``config``). Nothing
happens unless the environment variable ``CLSIM_FAULT`` names that point::

    CLSIM_FAULT=checkpoint.tensors@2          # SIGKILL on the 2nd time the point is reached
    CLSIM_FAULT=metrics@5:stop                 # SIGSTOP instead (the drill inspects the process, then kills it)

Writers call the point half-way through a write (after part of the bytes reached the file), so a kill leaves
exactly the torn file a power cut or ``kill -9`` would. The check costs one dictionary lookup when the variable is
unset; it is never reached in a training step.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "CLSIM_FAULT"
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, str]:
    action = "kill"
    if ":" in spec:
        spec, action = spec.rsplit(":", 1)
    name, _, nth = spec.partition("@")
    return name, int(nth or 1), action


def fault_point(name: str) -> None:
    """Kill (``SIGKILL``) or stop (``SIGSTOP``) this process if ``$CLSIM_FAULT`` names ``name`` at this occurrence."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, nth, action = _parse(spec)
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == nth:
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
