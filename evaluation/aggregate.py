"""Grouping runs into settings and summarising each over seeds: mean, sample std and a 95% t confidence interval.

A *group* is every run that shares the experiment name, the strategy, the stream, the class split (classes per task,
so runs with different task counts or splits are never averaged) and every config value that varies between the runs
of that strategy, except the seed. For a sweep this is "every grid key except the seed" (the sweep's grid keys are
exactly the config values that vary); ``clsim report`` over hand-made run folders uses the same rule.

The 95% confidence interval of a metric's mean over n seeds is ``mean ± t(0.975, n - 1) · s / sqrt(n)`` (Student's t
with n - 1 degrees of freedom, s = sample std with ddof = 1); undefined (NaN) for n < 2.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "GROUP_COLUMNS",
    "IGNORED_KEYS",
    "VALUE_COLUMNS",
    "assign_groups",
    "ci_halfwidth",
    "comparison_table",
    "flatten_config",
    "pivot_table",
    "series_stats",
    "split_signature",
    "summary_table",
]

VALUE_COLUMNS = [
    "a_last",
    "a_avg",
    "a_last_task_mean",
    "a_avg_task_mean",
    "forgetting",
    "bwt",
    "expansion_rate",
    "adapters_total",
    "deployed_params",
    "train_time_s",
]
GROUP_COLUMNS = ["experiment", "strategy", "stream", "split", "settings"]
# config keys that never make two runs different settings: the seed (what a group averages over), names and
# bookkeeping, and what cl.loop's config hash also ignores
IGNORED_KEYS = ("seed", "experiment", "out", "versions", "config_hash", "train.progress", "train.num_workers")


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists kept as values), without :data:`IGNORED_KEYS`."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted in IGNORED_KEYS:
            continue
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def split_signature(classes_per_task: Sequence[int]) -> str:
    """Classes per task in a short form: ``[2, 2, 2]`` -> ``"3x2"``, ``[4, 2, 2]`` -> ``"4+2+2"``; ``""`` if unknown."""
    if not classes_per_task:
        return ""
    if len(set(classes_per_task)) == 1:
        return f"{len(classes_per_task)}x{classes_per_task[0]}"
    return "+".join(str(c) for c in classes_per_task)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def assign_groups(records: list[dict[str, Any]]) -> None:
    """Set ``group`` (a hashable id), ``settings`` and ``label`` on every record, in place.

    ``group`` holds experiment, strategy, stream, split and the config values that vary between the runs of the
    strategy (seed excepted); ``settings`` (``"k=v, ..."``) the values that differ between groups of one experiment,
    strategy, stream and split; ``label`` is short and unique per group.
    """
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_strategy.setdefault(str(rec["strategy"]), []).append(rec)
    for recs in by_strategy.values():
        keys = sorted({k for r in recs for k in r["config"]})
        varying = [k for k in keys if len({_key(r["config"].get(k)) for r in recs}) > 1]
        for r in recs:
            r["_varying"] = {k: r["config"].get(k) for k in varying}
            r["group"] = (str(r["experiment"]), str(r["strategy"]), str(r["stream"]), str(r["split"]),
                          _key(r["_varying"]))
    # settings shown: the values that tell apart groups sharing experiment, strategy, stream and split (the names
    # of a sweep's runs already carry their grid values)
    contexts: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        contexts.setdefault(r["group"][:4], []).append(r)
    for recs in contexts.values():
        shown = [k for k in recs[0]["_varying"] if len({_key(r["_varying"].get(k)) for r in recs}) > 1]
        for r in recs:
            r["settings"] = ", ".join(f"{k}={_fmt(r['_varying'][k])}" for k in shown)
    # labels: experiment / strategy, plus the split and the settings only where needed to tell groups apart
    base: dict[str, set[Any]] = {}
    for r in records:
        name = str(r["experiment"]) if str(r["strategy"]) in str(r["experiment"]) else \
            f"{r['experiment']} / {r['strategy']}"
        r["label"] = name
        base.setdefault(name, set()).add(r["group"])
    for r in records:
        groups = base[r["label"]]
        if len(groups) > 1 and len({g[3] for g in groups}) > 1:
            r["label"] += f" [{r['split']} classes]"
    final: dict[str, set[Any]] = {}
    for r in records:
        final.setdefault(r["label"], set()).add(r["group"])
    for r in records:
        if len(final[r["label"]]) > 1 and r["settings"]:
            r["label"] += f" ({r['settings']})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def ci_halfwidth(std: Any, n: Any) -> Any:
    """Half-width of the 95% t confidence interval of a mean: ``t(0.975, n - 1) * std / sqrt(n)``; NaN for n < 2.

    Works elementwise on numbers, numpy arrays and pandas Series.
    """
    from scipy import stats

    n_arr = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(n_arr >= 2, stats.t.ppf(0.975, np.maximum(n_arr - 1, 1)), np.nan)
        out = t * np.asarray(std, dtype=float) / np.sqrt(n_arr)
    if isinstance(std, pd.Series):
        return pd.Series(out, index=std.index)
    return out if np.ndim(out) else float(out)


def series_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean, sample std and 95% CI half-width of a (runs, points) array, ignoring NaN.

    std and CI are NaN where fewer than two values exist.
    """
    count = np.sum(~np.isnan(values), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns / one value: NaN is the intended result
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1)
    std = np.where(count > 1, std, np.nan)
    return mean, std, np.asarray(ci_halfwidth(std, count))


def summary_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run: the group columns, seed, the metrics of :data:`VALUE_COLUMNS`, num_tasks, run_dir."""
    columns = [*GROUP_COLUMNS, "seed", *VALUE_COLUMNS, "num_tasks", "run_dir"]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=columns)
    frame[VALUE_COLUMNS] = frame[VALUE_COLUMNS].apply(pd.to_numeric, errors="coerce")
    frame["label"] = [r.get("label") for r in records]
    return frame.sort_values([*GROUP_COLUMNS, "seed"], key=lambda s: s.astype(str), ignore_index=True)


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per group: ``n_seeds``, ``seeds`` and ``<metric>_mean`` / ``_std`` / ``_ci95`` (CI half-width).

    std is the sample standard deviation (ddof = 1) and the CI the 95% Student-t interval; both NaN for one seed.
    Sorted by ``a_last_mean`` descending.
    """
    frame = summary.fillna({c: "" for c in ("stream", "split", "settings")})
    grouped = frame.groupby([*GROUP_COLUMNS, "label"], sort=False, dropna=False)
    stats = grouped[VALUE_COLUMNS].agg(["mean", "std", "count"])
    out = pd.DataFrame(index=stats.index)
    out["n_seeds"] = grouped.size()
    out["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s, key=str)))
    for metric in VALUE_COLUMNS:
        out[f"{metric}_mean"] = stats[(metric, "mean")]
        out[f"{metric}_std"] = stats[(metric, "std")]
        out[f"{metric}_ci95"] = ci_halfwidth(stats[(metric, "std")], stats[(metric, "count")])
    out = out.reset_index()
    return out.sort_values("a_last_mean", ascending=False, na_position="last", ignore_index=True)


def _row_label(row: Mapping[str, Any], with_experiment: bool) -> str:
    settings = ", ".join(s for s in str(row["settings"] or "").split(", ") if s and not s.startswith("stream."))
    label = str(row["strategy"]) + (f" ({settings})" if settings else "")
    return f"{row['experiment']}: {label}" if with_experiment else label


def pivot_table(comparison: pd.DataFrame, metric: str = "a_last") -> pd.DataFrame:
    """Strategy (with its non-stream settings) x stream (with its split): ``mean ± CI`` of ``metric`` per cell.

    Rows carry the experiment name too when two groups would otherwise share a cell.
    """
    if comparison.empty:
        return pd.DataFrame()
    cols = [f"{s} ({sp})" if sp else str(s) for s, sp in zip(comparison["stream"], comparison["split"], strict=True)]
    rows = [_row_label(r, False) for r in comparison.to_dict("records")]
    if len(set(zip(rows, cols, strict=True))) < len(rows):
        rows = [_row_label(r, True) for r in comparison.to_dict("records")]
    cells = {}
    for row, col, mean, ci, n in zip(rows, cols, comparison[f"{metric}_mean"], comparison[f"{metric}_ci95"],
                                     comparison["n_seeds"], strict=True):
        if pd.isna(mean):
            text = "—"
        else:
            text = f"{mean:.2f}" + ("" if pd.isna(ci) else f" ± {ci:.2f}") + f" (n={int(n)})"
        cells[(row, col)] = text
    table = pd.DataFrame("", index=list(dict.fromkeys(rows)), columns=sorted(set(cols)))
    for (row, col), text in cells.items():
        table.loc[row, col] = text
    table.index.name = "strategy"
    return table.reset_index()
