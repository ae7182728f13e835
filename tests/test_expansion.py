"""Expansion statistics: the worked example of specs/metrics.md §9 (SEMA-like, sites = blocks 9, 10, 11)."""

from __future__ import annotations

import json

import pytest

from evaluation import summarize_result
from evaluation.expansion import (
    adapters_added_per_task,
    added_param_ratio,
    added_per_layer,
    expansion_rate,
    expansion_stats,
    mean_added_per_task,
    param_ratio,
    per_site_rate,
)

SITES = [9, 10, 11]
# K[t] over all 12 blocks: 9 fixed non-expandable adapters (blocks 0-8) + the expandable sites
K = [[1] * 9 + k for k in ([1, 1, 1], [2, 1, 2], [2, 1, 2], [2, 2, 3])]
P = [306_627, 358_885, 358_885, 411_143]
P_REF = [306_627, 385_014, 463_401, 541_788]


def test_worked_example() -> None:
    assert [row[9:] for row in added_per_layer(K)] == [[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert added_per_layer(K)[0][:9] == [1] * 9 and added_per_layer(K)[1][:9] == [0] * 9
    assert adapters_added_per_task(K, SITES) == [None, 2, 0, 2]
    assert mean_added_per_task(K, SITES) == pytest.approx(1.3333, abs=1e-4)
    assert per_site_rate(K, SITES) == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert expansion_rate(K, SITES) == pytest.approx(0.4444, abs=1e-4)
    assert param_ratio(P, P_REF) == pytest.approx(0.7589, abs=1e-4)
    assert added_param_ratio(P, P_REF) == pytest.approx(0.4444, abs=1e-4)
    assert added_param_ratio(P, P_REF) == pytest.approx(104_516 / 235_161)


def test_reference_growth_gives_rate_one_and_ratio_one() -> None:
    counts = [[t] * 3 for t in range(1, 5)]  # MOS/EASE-like: one module per site per task
    stats = expansion_stats(counts, [0, 1, 2], P_REF, P_REF)
    assert stats["expansion_rate"] == 1.0 and stats["mean_added_per_task"] == 3.0
    assert stats["param_ratio"] == 1.0 and stats["added_param_ratio"] == 1.0
    assert stats["adapters_total"] == 12


def test_expansion_stats_dict_json_ready() -> None:
    stats = expansion_stats(K, SITES, P, P_REF)
    assert set(stats) == {
        "added_per_layer", "adapters_added_per_task", "mean_added_per_task", "per_site_rate", "expansion_rate",
        "adapters_total", "param_ratio", "added_param_ratio",
    }  # fmt: skip
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats
    assert stats["adapters_total"] == 9 + 7
    assert expansion_stats(K, SITES)["param_ratio"] is None


def test_single_task() -> None:
    stats = expansion_stats([[1, 1]], [0, 1], [100], [100])
    assert stats["adapters_added_per_task"] == [None]
    for key in ("mean_added_per_task", "per_site_rate", "expansion_rate", "added_param_ratio"):
        assert stats[key] is None
    assert stats["param_ratio"] == 1.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="expandable_sites"):
        expansion_rate(K, [12])
    with pytest.raises(ValueError, match="expandable_sites"):
        expansion_rate(K, [])
    with pytest.raises(ValueError, match="deployed_params"):
        expansion_stats(K, SITES, P[:2], P_REF)


def test_summarize_result_merges_inputs() -> None:
    inputs = {
        "sites": [f"blocks.{b}" for b in range(12)],
        "expandable_sites": SITES,
        "adapters_per_layer": K,
        "deployed_params": P,
        "reference_params": P_REF,
        "trainable_params_per_task": [1, 2, 3, 4],
    }
    metrics, expansion = summarize_result([[90.0, None], [80.0, 70.0]], [100, 50], inputs)
    assert metrics["bwt"] == pytest.approx(-10)
    assert expansion["sites"] == inputs["sites"] and expansion["trainable_params_per_task"] == [1, 2, 3, 4]
    assert expansion["expansion_rate"] == pytest.approx(4 / 9)
    assert summarize_result([[50.0]], [10], None)[1] is None
    with pytest.raises(ValueError, match="adapters_per_layer"):
        summarize_result([[50.0]], [10], {"expandable_sites": [0]})
