"""Composition root: imports the built-in component packages so that their registrations run.

This is the one place where ``cl`` reaches the sibling packages, lazily and by name, so that ``import cl`` stays
light and the dependency direction (strategies/streams/evaluation -> cl) holds for all library code.
"""

from __future__ import annotations

import importlib

__all__ = ["load_builtin"]

_BUILTIN = ("cl.adapters", "cl.retrieval", "streams", "strategies", "evaluation")
_loaded = False


def load_builtin() -> None:
    """Import the built-in adapters, streams, strategies and metrics (idempotent)."""
    global _loaded
    if _loaded:
        return
    for mod in _BUILTIN:
        importlib.import_module(mod)
    _loaded = True


def default_finalizers():
    """``(summarize, write_run_figures)`` from the ``evaluation`` package (imported lazily)."""
    evaluation = importlib.import_module("evaluation")
    report = importlib.import_module("evaluation.report")
    return evaluation.summarize_result, report.write_run_figures
