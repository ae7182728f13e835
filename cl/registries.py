"""The registry instances (one per extension point).

Components register themselves when their package is imported (``strategies``, ``streams``, ``cl.adapters``,
``evaluation``); :func:`cl.plugins.load_builtin` imports the built-in packages.
"""

from __future__ import annotations

from typing import Any

from cl.registry import Registry

__all__ = ["STRATEGIES", "STREAMS", "ADAPTERS", "METRICS", "INDEXES"]

STRATEGIES: Registry[Any] = Registry("strategy")
STREAMS: Registry[Any] = Registry("stream")
ADAPTERS: Registry[Any] = Registry("adapter type")
METRICS: Registry[Any] = Registry("metric")
INDEXES: Registry[Any] = Registry("index backend")
