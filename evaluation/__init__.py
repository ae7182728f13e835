"""Evaluation: metrics (pure functions of the accuracy matrix), expansion statistics, reports from run folders.

Importing this package registers the metrics in :data:`cl.registries.METRICS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evaluation import expansion, metrics, report
from evaluation.expansion import expansion_stats
from evaluation.metrics import compute_metrics
from evaluation.report import make_report, write_run_figures

__all__ = [
    "compute_metrics",
    "expansion",
    "expansion_stats",
    "make_report",
    "metrics",
    "report",
    "summarize_result",
    "write_run_figures",
]

_EXPANSION_ARGS = ("adapters_per_layer", "expandable_sites", "deployed_params", "reference_params")


def summarize_result(
    accuracy_matrix: metrics.Matrix,
    n_test: Sequence[float],
    expansion_inputs: Mapping[str, Any] | None = None,
    initial_accuracy: Sequence[float | None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``metrics`` and ``expansion`` fields of ``result.json``, for the training loop.

    Args:
        accuracy_matrix: R, T x T, percent, ``None`` where undefined.
        n_test: test samples per task.
        expansion_inputs: the strategy's expansion record: ``adapters_per_layer`` and ``expandable_sites`` (required),
            optional ``deployed_params``, ``reference_params`` and any extra fields (``sites``,
            ``trainable_params_per_task``...), which are passed through. ``None`` for strategies without adapters.
        initial_accuracy: initial-model accuracy per task, only under a future-task evaluation protocol (FWT).

    Returns:
        ``(metrics, expansion)`` with ``metrics = compute_metrics(...)`` and
        ``expansion = {**expansion_inputs, **expansion_stats(...)}`` (``None`` without inputs).
    """
    run_metrics = compute_metrics(accuracy_matrix, n_test, initial_accuracy)
    if expansion_inputs is None:
        return run_metrics, None
    missing = [k for k in _EXPANSION_ARGS[:2] if k not in expansion_inputs]
    if missing:
        raise ValueError(
            f"expansion_inputs lacks {', '.join(missing)}; required keys: {', '.join(_EXPANSION_ARGS[:2])}"
        )
    stats = expansion_stats(**{k: expansion_inputs[k] for k in _EXPANSION_ARGS if expansion_inputs.get(k) is not None})
    return run_metrics, {**expansion_inputs, **stats}
