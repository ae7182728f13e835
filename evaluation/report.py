"""Comparison reports built from run folders (``<out>/<experiment>/<seed>/result.json`` + ``config.json``).

This module reads files only, never live objects. Metrics are recomputed from each run's ``accuracy_matrix`` (the
stored ``metrics`` are used only when the test sizes are missing), so old runs follow current definitions. Runs are
grouped by every setting except the seed (:mod:`evaluation.aggregate`) and summarised by mean ± sample std and a 95%
Student-t confidence interval. ``clsim sweep`` and ``clsim report`` both end here.

Bad inputs are reported, never averaged: a ``result.json`` that is empty, not JSON, ``{}`` or without a valid
accuracy matrix is named and skipped; a run folder without ``result.json`` (started, not finished) is listed; a path
that does not exist, or an output folder that is a file, stops the report in one line before anything is written.
Every output file is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cl.errors import ClsimError
from evaluation.aggregate import (
    GROUP_COLUMNS,
    VALUE_COLUMNS,
    assign_groups,
    comparison_table,
    flatten_config,
    pivot_table,
    split_signature,
    summary_table,
)
from evaluation.metrics import compute_metrics, to_array
from evaluation.report_figures import (
    plot_expansion,
    plot_final_per_task,
    plot_forgetting_curves,
    plot_stage_curves,
    write_atomic,
    write_run_figures,
)

__all__ = [
    "NoRunsError",
    "ReportError",
    "VALUE_COLUMNS",
    "comparison_table",
    "find_results",
    "load_runs",
    "make_report",
    "pivot_table",
    "summary_table",
    "write_run_figures",
]

logger = logging.getLogger(__name__)

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
_RUN_FILES = ("config.json", "metrics.jsonl")  # a folder holding one of these is a run folder


class ReportError(ClsimError, ValueError):
    """A report cannot be written: a path that does not exist, an output folder that is a file, ..."""


class NoRunsError(ClsimError, FileNotFoundError):
    """No usable ``result.json`` under the given paths (the message names the paths and what was skipped)."""


# ----------------------------------------------------------------------------------------------------------------------
# loading runs


def find_results(paths: Sequence[Path | str]) -> list[Path]:
    """All ``result.json`` files under ``paths`` (each a run folder, a folder of run folders, or a result file).

    Raises:
        ReportError: a path is a file other than ``result.json``.
        NoRunsError: a path does not exist, or no result is found; the message names the paths.
    """
    found, _ = _scan(paths)
    if not found:
        raise NoRunsError(f"no result.json found under {', '.join(str(p) for p in paths) or '(no paths given)'}")
    return found


def _scan(paths: Sequence[Path | str]) -> tuple[list[Path], list[Path]]:
    """``(result files, run folders without result.json)`` under ``paths``."""
    found: dict[Path, None] = {}
    unfinished: dict[Path, None] = {}
    missing = [str(p) for p in map(Path, paths) if not p.exists()]
    for p in map(Path, paths):
        if not p.exists():
            continue
        if p.is_file():
            if p.name != "result.json":
                raise ReportError(f"{p}: not a run folder, a folder of runs or a result.json")
            found[p.resolve()] = None
            continue
        for f in sorted(p.rglob("result.json")):
            found[f.resolve()] = None
        for name in _RUN_FILES:
            for f in sorted(p.rglob(name)):
                if f.parent.name != "checkpoint" and not (f.parent / "result.json").exists():
                    unfinished[f.parent.resolve()] = None
    if missing:  # a mistyped path is never silently left out
        where = ", ".join(str(p) for p in paths)
        raise NoRunsError(f"no result.json found under {where} ({', '.join(missing)}: no such file or folder)"
                          if not found and not unfinished else f"{', '.join(missing)}: no such file or folder")
    return list(found), list(unfinished)


def _final_or_none(values: Sequence[Any] | None) -> Any:
    return values[-1] if values else None


def _read_result(path: Path) -> dict[str, Any]:
    """A result dictionary, or :class:`ReportError` saying why the file is not a run's result."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"unreadable ({type(err).__name__})") from None
    if not text.strip():
        raise ReportError("empty file")
    try:
        result = json.loads(text)
    except ValueError as err:
        raise ReportError(f"not valid JSON ({err})") from None
    if not isinstance(result, dict) or not result.get("accuracy_matrix"):
        raise ReportError("not a run result (no accuracy_matrix)")
    matrix = result["accuracy_matrix"]
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise ReportError("accuracy_matrix is not a list of rows")
    try:
        to_array(matrix)
    except (TypeError, ValueError) as err:
        raise ReportError(f"accuracy_matrix: {err}") from None
    tasks = result.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or len(tasks) != len(matrix)
                              or not all(isinstance(t, dict) for t in tasks)):
        raise ReportError(f"tasks does not list the {len(matrix)} tasks of accuracy_matrix")
    return result


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return flatten_config(cfg) if isinstance(cfg, dict) else {}


def _expansion_series(expansion: Mapping[str, Any]) -> dict[str, Any]:
    counts = expansion.get("adapters_per_layer")
    if not counts:
        return {"_adapters": None, "_adapters_ref": None}
    totals = [int(np.sum(row)) for row in counts]
    sites = expansion.get("expandable_sites") or []
    ref = [totals[0] + t * len(sites) for t in range(len(totals))] if sites else None
    return {"_adapters": totals, "_adapters_ref": ref}


def _run_record(result: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """One summary row (plus series for the figures) from a result dictionary."""
    tasks = result.get("tasks") or []
    n_test = [task.get("n_test") for task in tasks]
    matrix = result["accuracy_matrix"]
    if n_test and None not in n_test:
        metrics = compute_metrics(matrix, n_test)
    else:
        metrics = dict(result.get("metrics") or {})
    expansion = result.get("expansion") or {}
    counts = expansion.get("adapters_per_layer")
    adapters_total = expansion.get("adapters_total", int(np.sum(counts[-1])) if counts else None)
    classes = [len(t.get("class_ids") or t.get("labels") or []) for t in tasks]
    return {
        "experiment": result.get("experiment", run_dir.parent.name),
        "strategy": result.get("strategy", "unknown"),
        "seed": result.get("seed", run_dir.name),
        "stream": result.get("stream", ""),
        "split": split_signature(classes) if tasks and all(classes) else f"{len(matrix)} tasks",
        "config": _read_config(run_dir),
        **{key: metrics.get(key) for key in _METRIC_KEYS},
        "expansion_rate": expansion.get("expansion_rate"),
        "adapters_total": adapters_total,
        "deployed_params": _final_or_none(expansion.get("deployed_params")),
        "train_time_s": (result.get("timing") or {}).get("total_s"),
        "num_tasks": len(matrix),
        "run_dir": str(run_dir),
        "_stage_accuracy": metrics.get("stage_accuracy") or [],
        "_forgetting_curve": metrics.get("forgetting_curve") or [],
        "_final_row": to_array(matrix)[-1].tolist(),
        "_deployed": expansion.get("deployed_params"),
        "_reference": expansion.get("reference_params"),
        **_expansion_series(expansion),
    }


def load_runs(paths: Sequence[Path | str],
              problems: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Read every run under ``paths`` into one record per run (see :func:`summary_table` for the columns).

    Args:
        paths: run folders, folders of run folders, or ``result.json`` files.
        problems: if given, receives ``(path, reason)`` for every result file skipped and every run folder without
            ``result.json``; each is also logged as a warning.

    Raises:
        ReportError: a path is a file other than ``result.json``.
        NoRunsError: a path does not exist, or no usable result (the message names the paths and the files skipped).
    """
    found, unfinished = _scan(paths)
    records, skipped = [], []
    for result_path in found:
        try:
            result = _read_result(result_path)
        except ReportError as err:
            skipped.append((str(result_path), f"skipped: {err}"))
            continue
        records.append(_run_record(result, result_path.parent))
    skipped += [(str(folder), "no result.json (unfinished or failed run)") for folder in unfinished]
    for path, reason in skipped:
        logger.warning("report: %s: %s", path, reason)
    if problems is not None:
        problems.extend(skipped)
    if not records:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        detail = f"; {'; '.join(f'{p}: {r}' for p, r in skipped[:3])}" if skipped else ""
        raise NoRunsError(f"no result.json found under {where}{detail}" if not found else
                          f"no usable result.json under {where}{detail}")
    assign_groups(records)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# tables and pages


def _fmt(mean: float, std: float, ci: float, metric: str) -> str:
    if pd.isna(mean):
        return "—"
    count = metric in ("adapters_total", "deployed_params")
    digits = (
        0 if count and float(mean).is_integer() and (pd.isna(std) or float(std).is_integer()) else 1 if count else 2
    )
    text = f"{mean:,.{digits}f}"
    if pd.isna(std):
        return text
    text += f" ± {std:,.{digits}f}"
    return text if pd.isna(ci) else f"{text} [{mean - ci:,.{digits}f}, {mean + ci:,.{digits}f}]"


def _display_table(comparison: pd.DataFrame) -> pd.DataFrame:
    shown = [c for c in GROUP_COLUMNS if c != "settings" or comparison["settings"].astype(bool).any()]
    out = comparison[shown].copy()
    out["seeds"] = comparison["n_seeds"].astype(int)
    for metric, header in _TABLE_COLUMNS.items():
        out[header] = [_fmt(m, s, c, metric) for m, s, c in zip(
            comparison[f"{metric}_mean"], comparison[f"{metric}_std"], comparison[f"{metric}_ci95"], strict=True)]
    return out


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _html_page(tables: Mapping[str, pd.DataFrame], figures: Mapping[str, bytes], sources: Sequence[Path | str],
               notes: Sequence[str]) -> str:
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in figures.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}"
        "td:nth-child(-n+2){text-align:left}img{max-width:100%}"
    )
    body = "\n".join(f"<h2>{html.escape(title)}</h2>\n{table.to_html(index=False, escape=True, border=0)}"
                     for title, table in tables.items())
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>clsim report</title>"
        f"<style>{style}</style></head><body>\n<h1>clsim report</h1>\n"
        f"<p>Runs from: {html.escape(', '.join(str(s) for s in sources))}</p>\n"
        f"<p>Mean ± sample std [95% Student-t confidence interval of the mean] over seeds.</p>\n{body}\n"
        + (f"<h2>Runs not included</h2><ul>{listed}</ul>\n" if notes else "")
        + f"{images}\n</body></html>\n"
    )


def _check_out_dir(out_dir: Path) -> None:
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ReportError(f"{out_dir}: {'is' if folder == out_dir else f'{folder} is'} a file, not a folder "
                                  f"(the report needs an output folder)")
            return


def make_report(paths: Sequence[Path | str], out_dir: Path | str,
                failed: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Compare runs grouped by setting (mean ± std and 95% CI over seeds); write tables, figures and pages.

    Writes into ``out_dir``: ``summary.csv`` (one row per run), ``comparison.csv`` (per group: ``n_seeds``, ``seeds``,
    ``<metric>_mean/_std/_ci95``), ``pivot.csv`` (strategy x stream, A_last mean ± CI), ``forgetting_curves.png``
    (A_i vs tasks learned), ``forgetting.png`` (F_i vs tasks learned), ``final_accuracy_per_task.png``,
    ``expansion.png`` (deployed parameters and adapters vs tasks learned against the one-set-per-task line),
    ``report.md`` and ``report.html`` (self-contained).

    Args:
        paths: run folders, folders containing run folders (searched recursively for ``result.json``), or files.
        out_dir: output folder (created).
        failed: ``(run folder, error, log path)`` of runs that failed (a sweep's), listed in the report.

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: ``out_dir`` (or a folder above it) is a file.
        NoRunsError: a path does not exist, or no usable ``result.json`` under ``paths``.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    problems: list[tuple[str, str]] = []
    records = load_runs(paths, problems)
    logger.info("report over %d runs from %s", len(records), ", ".join(map(str, paths)))
    summary = summary_table(records)
    comparison = comparison_table(summary)
    pivot = pivot_table(comparison)
    try:
        write_atomic(out_dir / "summary.csv", summary.to_csv(index=False))
    except OSError as err:
        raise ReportError(f"{out_dir}: cannot write the report ({err.strerror or err})") from None
    write_atomic(out_dir / "comparison.csv", comparison.to_csv(index=False))
    write_atomic(out_dir / "pivot.csv", pivot.to_csv(index=False))

    figures = {
        "forgetting_curves.png": plot_stage_curves(records, out_dir / "forgetting_curves.png"),
        "forgetting.png": plot_forgetting_curves(records, out_dir / "forgetting.png"),
        "final_accuracy_per_task.png": plot_final_per_task(records, out_dir / "final_accuracy_per_task.png"),
        "expansion.png": plot_expansion(records, out_dir / "expansion.png"),
    }
    table = _display_table(comparison)
    notes = [f"{run}: failed: {error} (log: {log})" for run, error, log in failed]
    notes += [f"{path}: {reason}" for path, reason in problems]
    markdown = [
        "# clsim report",
        "",
        f"{len(records)} runs in {len(comparison)} groups from: {', '.join(f'`{p}`' for p in paths)}.",
        "A group is every run sharing experiment, strategy, stream, class split (classes per task) and every setting",
        "except the seed. Values: mean ± sample std [95% confidence interval of the mean, Student t with n − 1",
        "degrees of freedom] over seeds; accuracies in percent, sample-weighted unless marked task-mean; F = PILOT",
        "forgetting; sorted by A_last. Per-run numbers: `summary.csv`; per group: `comparison.csv`.",
        "",
        _markdown_table(table),
        "",
        "## A_last by strategy and stream",
        "",
        "Mean ± 95% CI half-width (n seeds); `pivot.csv`.",
        "",
        _markdown_table(pivot) if not pivot.empty else "(empty)",
        "",
        "## Stage accuracy",
        "",
        "![stage accuracy vs tasks learned](forgetting_curves.png)",
        "",
        "## Forgetting",
        "",
        "![forgetting vs tasks learned](forgetting.png)",
        "",
        "## Final accuracy per task",
        "",
        "![final accuracy per task](final_accuracy_per_task.png)",
        "",
        "## Expansion",
        "",
        "Deployed adapter parameters and adapters against tasks learned; dashed: the same strategy if every task had",
        "added one module at every expandable site (metrics.md §9).",
        "",
        "![expansion vs tasks learned](expansion.png)",
        "",
    ]
    if notes:
        markdown += ["## Runs not included", "", *[f"- {n}" for n in notes], ""]
    report_path = write_atomic(out_dir / "report.md", "\n".join(markdown))
    write_atomic(out_dir / "report.html", _html_page({"Comparison": table, "A_last by strategy and stream": pivot},
                                                     figures, paths, notes))
    return report_path

