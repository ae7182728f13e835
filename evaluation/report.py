"""Figures and comparison reports built from run folders (``runs/<experiment>/<seed>/result.json``).

This module reads files only, never live objects. Metrics are recomputed from each run's ``accuracy_matrix`` (the
stored ``metrics`` are used only when the matrix or the test sizes are missing), so old runs follow current definitions.
Every output file is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cl.runlog import atomic_write_bytes
from evaluation.metrics import compute_metrics, stage_accuracy, to_array

__all__ = ["comparison_table", "find_results", "load_runs", "make_report", "summary_table", "write_run_figures"]

logger = logging.getLogger(__name__)

GROUP_KEYS = ["experiment", "strategy"]
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
_METRIC_KEYS = ["a_last", "a_avg", "a_last_task_mean", "a_avg_task_mean", "forgetting", "bwt"]
_TABLE_COLUMNS = {  # comparison column -> report header
    "a_last": "A_last",
    "a_avg": "Ā",
    "a_last_task_mean": "A_last (task-mean)",
    "forgetting": "F",
    "bwt": "BWT",
    "expansion_rate": "ρ",  # noqa: RUF001
    "adapters_total": "adapters",
    "deployed_params": "params",
    "train_time_s": "time (s)",
}


# ----------------------------------------------------------------------------------------------------------------------
# file helpers


def _write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically with normal permissions (``cl.runlog.atomic_write_bytes``)."""
    atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> bytes:
    """Render ``fig`` to PNG, write it atomically to ``path``, close it and return the PNG bytes."""
    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    png = buf.getvalue()
    _write_atomic(path, png)
    return png


# ----------------------------------------------------------------------------------------------------------------------
# loading runs


def find_results(paths: Sequence[Path | str]) -> list[Path]:
    """All ``result.json`` files under ``paths`` (each a run folder, a folder of run folders, or a result file).

    Raises:
        FileNotFoundError: if none is found; the message names the searched paths.
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file() and p.name == "result.json":
            found[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob("result.json")):
                found[f.resolve()] = None
    if not found:
        raise FileNotFoundError(f"no result.json found under {', '.join(str(p) for p in paths) or '(no paths given)'}")
    return list(found)


def _final_or_none(values: Sequence[Any] | None) -> Any:
    return values[-1] if values else None


def _run_record(result: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """One summary row (plus series for the figures) from a result dictionary."""
    n_test = [task.get("n_test") for task in result.get("tasks", [])]
    matrix = result.get("accuracy_matrix")
    if matrix and n_test and None not in n_test:
        metrics = compute_metrics(matrix, n_test)
    else:
        metrics = dict(result.get("metrics") or {})
    expansion = result.get("expansion") or {}
    counts = expansion.get("adapters_per_layer")
    adapters_total = expansion.get("adapters_total", int(np.sum(counts[-1])) if counts else None)
    final_row = to_array(matrix)[-1].tolist() if matrix else []
    return {
        "experiment": result.get("experiment", run_dir.parent.name),
        "strategy": result.get("strategy", "unknown"),
        "seed": result.get("seed", run_dir.name),
        **{key: metrics.get(key) for key in _METRIC_KEYS},
        "expansion_rate": expansion.get("expansion_rate"),
        "adapters_total": adapters_total,
        "deployed_params": _final_or_none(expansion.get("deployed_params")),
        "train_time_s": (result.get("timing") or {}).get("total_s"),
        "num_tasks": len(matrix) if matrix else None,
        "run_dir": str(run_dir),
        "_stage_accuracy": metrics.get("stage_accuracy") or [],
        "_final_row": final_row,
    }


def load_runs(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    """Read every run under ``paths`` into one record per run (see :func:`summary_table` for the columns)."""
    records = []
    for result_path in find_results(paths):
        result = json.loads(result_path.read_text())
        records.append(_run_record(result, result_path.parent))
    return records


# ----------------------------------------------------------------------------------------------------------------------
# tables


def summary_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run: experiment, strategy, seed, the metrics of ``VALUE_COLUMNS``, num_tasks, run_dir."""
    columns = [*GROUP_KEYS, "seed", *VALUE_COLUMNS, "num_tasks", "run_dir"]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=columns)
    frame[VALUE_COLUMNS] = frame[VALUE_COLUMNS].apply(pd.to_numeric, errors="coerce")
    return frame.sort_values([*GROUP_KEYS, "seed"], key=lambda s: s.astype(str), ignore_index=True)


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Group runs by (experiment, strategy): ``n_seeds`` and ``<metric>_mean`` / ``<metric>_std`` over seeds.

    The std is the sample standard deviation (ddof = 1), NaN for a single seed. Sorted by ``a_last_mean`` descending.
    """
    grouped = summary.groupby(GROUP_KEYS, sort=False, dropna=False)
    stats = grouped[VALUE_COLUMNS].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats.insert(0, "n_seeds", grouped.size())
    stats = stats.reset_index()
    return stats.sort_values("a_last_mean", ascending=False, na_position="last", ignore_index=True)


def _fmt(mean: float, std: float, metric: str) -> str:
    if pd.isna(mean):
        return "—"
    count = metric in ("adapters_total", "deployed_params")
    digits = (
        0 if count and float(mean).is_integer() and (pd.isna(std) or float(std).is_integer()) else 1 if count else 2
    )
    text = f"{mean:,.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:,.{digits}f}"


def _display_table(comparison: pd.DataFrame) -> pd.DataFrame:
    out = comparison[GROUP_KEYS].copy()
    out["seeds"] = comparison["n_seeds"].astype(int)
    for metric, header in _TABLE_COLUMNS.items():
        out[header] = [
            _fmt(m, s, metric) for m, s in zip(comparison[f"{metric}_mean"], comparison[f"{metric}_std"], strict=True)
        ]
    return out


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# figures


def write_run_figures(result: Mapping[str, Any], run_dir: Path) -> list[Path]:
    """Write ``forgetting_curve.png`` and ``accuracy_matrix.png`` for one run into ``run_dir``.

    ``forgetting_curve.png``: R[i][j] against the number of tasks learned i, one line per task j (from stage j on),
    plus the sample-weighted stage accuracy A_i in bold. ``accuracy_matrix.png``: heatmap of R with the values written
    in, blank where undefined.

    Args:
        result: a ``result.json`` dictionary (needs ``accuracy_matrix``; ``tasks[*].n_test`` for A_i).
        run_dir: folder to write into.

    Returns:
        The paths written.
    """
    plt = _pyplot()
    run_dir = Path(run_dir)
    r = to_array(result["accuracy_matrix"])
    num_tasks = len(r)
    stages = np.arange(1, num_tasks + 1)
    title = f"{result.get('experiment', '')} / {result.get('strategy', '')} / seed {result.get('seed', '')}"

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j in range(num_tasks):
        ax.plot(stages[j:], r[j:, j], marker="o", markersize=3, linewidth=1, label=f"task {j + 1}")
    n_test = [task.get("n_test") for task in result.get("tasks", [])]
    if len(n_test) == num_tasks and None not in n_test:
        ax.plot(
            stages,
            stage_accuracy(result["accuracy_matrix"], n_test),
            color="black",
            linewidth=2.5,
            marker="s",
            label="A_i (all seen)",
        )
    ax.set(xlabel="tasks learned i", ylabel="accuracy (%)", title=title, xticks=stages)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if num_tasks > 8 else 1, loc="best")
    curve_path = run_dir / "forgetting_curve.png"
    _save_figure(fig, curve_path)

    size = max(3.5, 0.55 * num_tasks + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(r), cmap=cmap, vmin=0, vmax=100)
    if num_tasks <= 25:
        for i, j in zip(*np.nonzero(~np.isnan(r)), strict=True):
            ax.text(
                j, i, f"{r[i, j]:.1f}", ha="center", va="center", fontsize=8, color="white" if r[i, j] < 60 else "black"
            )
    ticks = np.arange(num_tasks)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set(xlabel="evaluated task j", ylabel="after training task i", title=title)
    fig.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)
    matrix_path = run_dir / "accuracy_matrix.png"
    _save_figure(fig, matrix_path)
    return [curve_path, matrix_path]


def _stack(series: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Stack ragged series into a (num_series, max_len) array padded with NaN."""
    width = max((len(s) for s in series), default=0)
    out = np.full((len(series), width), np.nan)
    for k, s in enumerate(series):
        out[k, : len(s)] = [np.nan if v is None else v for v in s]
    return out


def _group_series(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, np.ndarray]:
    groups: dict[str, list[Sequence[float]]] = {}
    for rec in records:
        groups.setdefault(f"{rec['experiment']} / {rec['strategy']}", []).append(rec[key])
    return {label: _stack(series) for label, series in groups.items()}


def _nan_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise mean and sample std ignoring NaN; std is NaN where fewer than two values exist."""
    count = np.sum(~np.isnan(values), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns / one value: NaN is the intended result
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1)
    return mean, np.where(count > 1, std, np.nan)


def _plot_stage_curves(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in _group_series(records, "_stage_accuracy").items():
        if values.size == 0:
            continue
        mean, std = _nan_stats(values)
        stages = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(stages, mean, marker="o", markersize=3, label=f"{label} (n={len(values)})")
        if len(values) > 1:
            ax.fill_between(stages, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="tasks learned i", ylabel="stage accuracy A_i (%)", title="Stage accuracy (mean ± std over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def _plot_final_per_task(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    plt = _pyplot()
    groups = _group_series(records, "_final_row")
    num_tasks = max((v.shape[1] for v in groups.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * num_tasks * max(len(groups), 1) ** 0.5 + 4), 4.5))
    width = 0.8 / max(len(groups), 1)
    for k, (label, values) in enumerate(groups.items()):
        if values.size == 0:
            continue
        mean, std = _nan_stats(values)
        tasks = np.arange(1, len(mean) + 1)
        yerr = None if len(values) < 2 else np.nan_to_num(std)
        ax.bar(tasks + (k - (len(groups) - 1) / 2) * width, mean, width, yerr=yerr, capsize=2, label=label)
    ax.set_xticks(np.arange(1, num_tasks + 1))
    ax.set(
        xlabel="task j", ylabel="final accuracy R[T][j] (%)", title="Final accuracy per task (mean ± std over seeds)"
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# report


def _html_page(table: pd.DataFrame, figures: Mapping[str, bytes], sources: Sequence[Path | str]) -> str:
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in figures.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}"
        "td:nth-child(-n+2){text-align:left}img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>clsim report</title>"
        f"<style>{style}</style></head><body>\n<h1>clsim report</h1>\n"
        f"<p>Runs from: {html.escape(', '.join(str(s) for s in sources))}</p>\n"
        f"{table.to_html(index=False, escape=True, border=0)}\n{images}\n</body></html>\n"
    )


def make_report(paths: Sequence[Path | str], out_dir: Path | str) -> Path:
    """Compare runs: group by (experiment, strategy), mean ± std over seeds; write tables, figures and pages.

    Writes into ``out_dir``: ``summary.csv`` (one row per run), ``comparison.csv`` (grouped mean/std),
    ``forgetting_curves.png`` (A_i vs tasks learned per group, shaded ± std), ``final_accuracy_per_task.png``
    (R[T][j] per task and group), ``report.md`` (table sorted by A_last + figure links) and ``report.html``
    (self-contained: table + base64 figures).

    Args:
        paths: run folders, folders containing run folders (searched recursively for ``result.json``), or files.
        out_dir: output folder (created).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: if no ``result.json`` exists under ``paths``.
    """
    out_dir = Path(out_dir)
    records = load_runs(paths)
    logger.info("report over %d runs from %s", len(records), ", ".join(map(str, paths)))
    summary = summary_table(records)
    comparison = comparison_table(summary)
    _write_atomic(out_dir / "summary.csv", summary.to_csv(index=False))
    _write_atomic(out_dir / "comparison.csv", comparison.to_csv(index=False))

    figures = {
        "forgetting_curves.png": _plot_stage_curves(records, out_dir / "forgetting_curves.png"),
        "final_accuracy_per_task.png": _plot_final_per_task(records, out_dir / "final_accuracy_per_task.png"),
    }
    table = _display_table(comparison)
    markdown = [
        "# clsim report",
        "",
        f"{len(records)} runs in {len(comparison)} groups from: {', '.join(f'`{p}`' for p in paths)}.",
        "Values are mean ± std over seeds (sample std); accuracies in percent, sample-weighted unless marked",
        "task-mean; F = PILOT forgetting; sorted by A_last. Per-run numbers: `summary.csv`; grouped: `comparison.csv`.",
        "",
        _markdown_table(table),
        "",
        "## Stage accuracy",
        "",
        "![stage accuracy vs tasks learned](forgetting_curves.png)",
        "",
        "## Final accuracy per task",
        "",
        "![final accuracy per task](final_accuracy_per_task.png)",
        "",
    ]
    report_path = _write_atomic(out_dir / "report.md", "\n".join(markdown))
    _write_atomic(out_dir / "report.html", _html_page(table, figures, paths))
    return report_path
