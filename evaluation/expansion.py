"""Expansion statistics of adapter-growing strategies (``specs/metrics.md`` §9).

Notation: K[t][s] = number of modules at site s after task t (t = 1..T, K[0][s] = 0), given for *all* blocks/sites;
S = the expandable sites; E[t][s] = K[t][s] - K[t-1][s]. Task 1's modules are the base: expansion counts from task 2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "adapters_added_per_task",
    "added_param_ratio",
    "added_per_layer",
    "expansion_rate",
    "expansion_stats",
    "mean_added_per_task",
    "param_ratio",
    "per_site_rate",
]

logger = logging.getLogger(__name__)


def _counts(adapters_per_layer: Sequence[Sequence[int]]) -> np.ndarray:
    counts = np.asarray(adapters_per_layer, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(
            f"adapters_per_layer must be a non-empty T x (num sites) list of lists, got shape {counts.shape}"
        )
    return counts


def _sites(expandable_sites: Sequence[int], num_sites: int) -> np.ndarray:
    sites = np.asarray(expandable_sites, dtype=np.int64).reshape(-1)
    if sites.size == 0:
        raise ValueError("expandable_sites is empty; expected the indices of the sites in S")
    if sites.min() < 0 or sites.max() >= num_sites or len(set(sites.tolist())) != sites.size:
        raise ValueError(
            f"expandable_sites must be distinct indices in 0..{num_sites - 1}, got {list(expandable_sites)}"
        )
    return sites


def added_per_layer(adapters_per_layer: Sequence[Sequence[int]]) -> list[list[int]]:
    """Modules added during each task at every site: ``E[t][s] = K[t][s] - K[t-1][s]``, with ``K[0][s] = 0``.

    Args:
        adapters_per_layer: K, T rows over all sites.

    Returns:
        E, same shape as K (row 1 = the base modules).
    """
    counts = _counts(adapters_per_layer)
    return np.diff(counts, axis=0, prepend=0).tolist()


def adapters_added_per_task(
    adapters_per_layer: Sequence[Sequence[int]], expandable_sites: Sequence[int]
) -> list[int | None]:
    """Modules added in each task over the expandable sites: ``e_t = sum_{s in S} E[t][s]``.

    Returns:
        ``[None, e_2, ..., e_T]`` (task 1's modules are the base, not expansion).
    """
    counts = _counts(adapters_per_layer)
    sites = _sites(expandable_sites, counts.shape[1])
    added = np.diff(counts, axis=0, prepend=0)
    outside = np.setdiff1d(np.arange(counts.shape[1]), sites)
    if len(counts) > 1 and added[1:, outside].any():
        logger.warning("modules were added after task 1 at sites outside expandable_sites; they are not counted")
    return [None] + [int(v) for v in added[1:, sites].sum(axis=1)]


def mean_added_per_task(adapters_per_layer: Sequence[Sequence[int]], expandable_sites: Sequence[int]) -> float | None:
    """Mean modules added per task after the first: ``e_bar = (1/(T-1)) sum_{t=2}^{T} e_t``; ``None`` when T = 1."""
    added = [e for e in adapters_added_per_task(adapters_per_layer, expandable_sites) if e is not None]
    return float(np.mean(added)) if added else None


def per_site_rate(adapters_per_layer: Sequence[Sequence[int]], expandable_sites: Sequence[int]) -> list[float] | None:
    """Per-site expansion rate ``rho_s = (1/(T-1)) sum_{t=2}^{T} E[t][s]`` for s in S (in ``expandable_sites`` order).

    Returns:
        One rate per expandable site, or ``None`` when T = 1.
    """
    counts = _counts(adapters_per_layer)
    sites = _sites(expandable_sites, counts.shape[1])
    if len(counts) < 2:
        return None
    return [float(v) for v in (counts[-1, sites] - counts[0, sites]) / (len(counts) - 1)]


def expansion_rate(adapters_per_layer: Sequence[Sequence[int]], expandable_sites: Sequence[int]) -> float | None:
    """Expansion rate ``rho = sum_{t=2}^{T} e_t / ((T-1) |S|)``: 1 = one new module per site per task, 0 = no growth.

    Returns:
        ``rho``, or ``None`` when T = 1.
    """
    rates = per_site_rate(adapters_per_layer, expandable_sites)
    return None if rates is None else float(np.mean(rates))


def param_ratio(deployed_params: Sequence[float] | None, reference_params: Sequence[float] | None) -> float | None:
    """Deployed parameters against one-module-per-site-per-task growth: ``ratio(T) = P(T) / P_ref(T)``.

    ``None`` without parameter counts.
    """
    if not deployed_params or not reference_params or reference_params[-1] == 0:
        return None
    return float(deployed_params[-1] / reference_params[-1])


def added_param_ratio(
    deployed_params: Sequence[float] | None, reference_params: Sequence[float] | None
) -> float | None:
    """Growth against the reference growth: ``added_ratio(T) = (P(T) - P(1)) / (P_ref(T) - P_ref(1))``.

    Equals ``rho`` when every module has the same size. ``None`` without parameter counts or when the reference does
    not grow (T = 1).
    """
    if not deployed_params or not reference_params:
        return None
    ref_growth = reference_params[-1] - reference_params[0]
    if ref_growth == 0:
        return None
    return float((deployed_params[-1] - deployed_params[0]) / ref_growth)


def expansion_stats(
    adapters_per_layer: Sequence[Sequence[int]],
    expandable_sites: Sequence[int],
    deployed_params: Sequence[float] | None = None,
    reference_params: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All expansion statistics as a JSON-ready dictionary (merged into ``result.json``'s ``expansion``).

    Args:
        adapters_per_layer: K[t][s], T rows over all sites.
        expandable_sites: indices (into a row of K) of the sites in S.
        deployed_params: P(t) per task (deployed adapter + routing parameters, no heads, no training-only parts).
        reference_params: P_ref(t) per task (the same if every task added one module at every site in S).

    Returns:
        ``added_per_layer`` (E), ``adapters_added_per_task`` (``[None, e_2, ...]``), ``mean_added_per_task`` (e_bar),
        ``per_site_rate`` (rho_s), ``expansion_rate`` (rho), ``adapters_total`` (sum_s K[T][s], all sites),
        ``param_ratio`` and ``added_param_ratio`` (``None`` without parameter counts).
    """
    counts = _counts(adapters_per_layer)
    for name, seq in (("deployed_params", deployed_params), ("reference_params", reference_params)):
        if seq is not None and len(seq) != len(counts):
            raise ValueError(f"{name} has {len(seq)} entries; expected one per task (T = {len(counts)})")
    if len(expandable_sites) == 0:  # a strategy without adapters (SimpleCIL): nothing can expand
        return {
            "added_per_layer": added_per_layer(adapters_per_layer),
            "adapters_added_per_task": [None] * len(counts),
            "mean_added_per_task": None,
            "per_site_rate": [],
            "expansion_rate": None,
            "adapters_total": int(counts[-1].sum()),
            "param_ratio": None,
            "added_param_ratio": None,
        }
    return {
        "added_per_layer": added_per_layer(adapters_per_layer),
        "adapters_added_per_task": adapters_added_per_task(adapters_per_layer, expandable_sites),
        "mean_added_per_task": mean_added_per_task(adapters_per_layer, expandable_sites),
        "per_site_rate": per_site_rate(adapters_per_layer, expandable_sites),
        "expansion_rate": expansion_rate(adapters_per_layer, expandable_sites),
        "adapters_total": int(counts[-1].sum()),
        "param_ratio": param_ratio(deployed_params, reference_params),
        "added_param_ratio": added_param_ratio(deployed_params, reference_params),
    }
