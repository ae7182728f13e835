"""Figures of the report: per-run curves, and per-group curves with 95% confidence bands over seeds.

Every figure is written atomically and its PNG bytes returned (the HTML page embeds them). Bands are the 95% Student-t
confidence interval of the mean over a group's seeds (:func:`evaluation.aggregate.series_stats`), drawn where a group
has at least two seeds.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl.runlog import atomic_write_bytes
from evaluation.aggregate import series_stats
from evaluation.metrics import stage_accuracy, to_array

__all__ = [
    "plot_expansion",
    "plot_final_per_task",
    "plot_forgetting_curves",
    "plot_stage_curves",
    "write_atomic",
    "write_run_figures",
]


def write_atomic(path: Path, data: bytes | str) -> Path:
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
    write_atomic(path, png)
    return png


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
        ax.plot(stages, stage_accuracy(result["accuracy_matrix"], n_test), color="black", linewidth=2.5, marker="s",
                label="A_i (all seen)")
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
            ax.text(j, i, f"{r[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if r[i, j] < 60 else "black")
    ticks = np.arange(num_tasks)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set(xlabel="evaluated task j", ylabel="after training task i", title=title)
    fig.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)
    matrix_path = run_dir / "accuracy_matrix.png"
    _save_figure(fig, matrix_path)
    return [curve_path, matrix_path]


def _stack(series: Sequence[Sequence[float | None] | None]) -> np.ndarray:
    """Stack ragged series into a (num_series, max_len) array padded with NaN."""
    rows = [list(s or []) for s in series]
    width = max((len(s) for s in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for k, s in enumerate(rows):
        out[k, : len(s)] = [np.nan if v is None else v for v in s]
    return out


def _group_series(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, np.ndarray]:
    groups: dict[str, list[Any]] = {}
    for rec in records:
        groups.setdefault(str(rec["label"]), []).append(rec.get(key))
    return {label: _stack(series) for label, series in groups.items()}


MARKERS = "osD^vP*Xph<>"


def group_styles(n: int) -> list[dict[str, Any]]:
    """``n`` distinct (colour, marker) pairs: tab10 colours up to 10 groups, tab20 up to 20, then the colours
    repeat with the next marker, so no two groups of one figure look alike."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    size = cmap.N
    return [{"color": cmap(i % size), "marker": MARKERS[(i // size) % len(MARKERS)]} for i in range(n)]


def short_labels(labels: Sequence[str]) -> dict[str, str]:
    """Legend labels without the prefix all groups share (up to a ``_``, e.g. a sweep's base name ``quickstart_``),
    grid values shown as ``key=value`` words (``sema__exp_threshold=0.5__init_lr=0.001`` -> ``sema exp_threshold=0.5
    init_lr=0.001``)."""
    labels = list(labels)
    prefix = os.path.commonprefix(labels) if len(labels) > 1 else ""
    prefix = prefix[: prefix.rfind("_") + 1]
    out = {}
    for label in labels:
        short = label[len(prefix):] if len(label) > len(prefix) else label
        out[label] = short.replace("__", " ")
    return out


def _curves(ax: Any, records: Sequence[Mapping[str, Any]], key: str, ref_key: str | None = None) -> bool:
    """Mean curve per group with a 95% CI band; a dashed reference curve in the same colour. False if nothing."""
    drawn = False
    refs = _group_series(records, ref_key) if ref_key else {}
    series = _group_series(records, key)
    names = short_labels(list(series))
    for (label, values), style in zip(series.items(), group_styles(len(series)), strict=True):
        if values.size == 0 or np.isnan(values).all():
            continue
        mean, _, ci = series_stats(values)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, markersize=4, label=f"{names[label]} (n={len(values)})", **style)
        if len(values) > 1:
            ax.fill_between(x, mean - ci, mean + ci, color=style["color"], alpha=0.15, linewidth=0)
        ref = refs.get(label)
        if ref is not None and ref.size and not np.isnan(ref).all():
            ref_mean = series_stats(ref)[0]
            ax.plot(np.arange(1, len(ref_mean) + 1), ref_mean, linestyle="--", linewidth=1, color=style["color"])
        drawn = True
    return drawn


def _legend_outside(ax: Any) -> None:
    """The legend to the right of ``ax`` (never over the curves; the figure is saved with a tight bounding box)."""
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, drawn: bool, legend: bool = True) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        _legend_outside(ax)


def _curve_figure(records: Sequence[Mapping[str, Any]], key: str, ylabel: str, title: str, path: Path) -> bytes:
    """One figure of per-stage curves ``key`` against tasks learned, per group (mean, 95% CI band)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _finish(ax, "tasks learned i", ylabel, title, _curves(ax, records, key))
    return _save_figure(fig, path)


def plot_stage_curves(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    """Stage accuracy A_i against tasks learned, per group (mean, 95% CI band)."""
    return _curve_figure(records, "_stage_accuracy", "stage accuracy A_i (%)",
                         "Stage accuracy (mean, 95% CI band over seeds)", path)


def plot_forgetting_curves(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    """Average forgetting F after each stage (PILOT definition, metrics.md §4), per group (mean, 95% CI band)."""
    return _curve_figure(records, "_forgetting_curve", "average forgetting F_i (%)",
                         "Forgetting (mean, 95% CI band over seeds)", path)


def plot_final_per_task(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    """Final accuracy R[T][j] per task j and group (bars: mean; error bars: 95% CI)."""
    plt = _pyplot()
    groups = _group_series(records, "_final_row")
    num_tasks = max((v.shape[1] for v in groups.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * num_tasks * max(len(groups), 1) ** 0.5 + 4), 4.5))
    width = 0.8 / max(len(groups), 1)
    names = short_labels(list(groups))
    for k, ((label, values), style) in enumerate(zip(groups.items(), group_styles(len(groups)), strict=True)):
        if values.size == 0:
            continue
        mean, _, ci = series_stats(values)
        tasks = np.arange(1, len(mean) + 1)
        yerr = None if len(values) < 2 else np.nan_to_num(ci)
        ax.bar(tasks + (k - (len(groups) - 1) / 2) * width, mean, width, yerr=yerr, capsize=2, label=names[label],
               color=style["color"])
    ax.set_xticks(np.arange(1, num_tasks + 1))
    ax.set(xlabel="task j", ylabel="final accuracy R[T][j] (%)",
           title="Final accuracy per task (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3, axis="y")
    _legend_outside(ax)
    return _save_figure(fig, path)


def plot_expansion(records: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    """Deployed adapter parameters P(t) and adapters sum_s K[t][s] against tasks learned, per group (mean, 95% CI
    band), each against its one-set-per-task line (dashed: P_ref(t), and K(1) + (t - 1)|S|), metrics.md §9."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = _curves(left, records, "_deployed", "_reference")
    _finish(left, "tasks learned t", "deployed adapter parameters P(t)", "Parameters (dashed: one set per task)", drawn,
            legend=False)  # the same groups and styles as the right panel, whose legend serves both
    drawn = _curves(right, records, "_adapters", "_adapters_ref")
    _finish(right, "tasks learned t", "adapters (all sites)", "Adapters (dashed: one set per task)", drawn)
    return _save_figure(fig, path)
