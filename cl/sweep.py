"""Sweeps: run one experiment config once per strategy, then write a comparison report.

A sweep file names a base config and per-strategy overrides (dotted keys, as ``--set``)::

    base: quickstart.yaml          # relative to the sweep file
    report: reports/quickstart
    strategies:
      simplecil: {}
      finetune: {train.optimizer: adamw, train.lr: 0.001}

Every registered strategy runs (those the file does not list run with the base config's values), so a new strategy
joins the comparison as soon as it is registered. A plain experiment config can be swept too (no per-strategy
overrides).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cl.config import ConfigError, load_config
from cl.registries import STRATEGIES

__all__ = ["SweepPlan", "load_sweep", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    base: Path
    report: Path
    overrides: dict[str, list[str]] = field(default_factory=dict)


def _as_sets(name: str, mapping: Any) -> list[str]:
    if mapping in (None, {}):
        return []
    if not isinstance(mapping, dict):
        raise ConfigError(f"sweep: strategies.{name} must be a mapping of dotted keys to values")
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in mapping.items()]


def load_sweep(path: str | Path, report: str | None = None) -> SweepPlan:
    """Read a sweep file (or treat a plain experiment config as a sweep without overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if "base" not in data:
        return SweepPlan(path, Path(report or f"reports/{path.stem}"))
    unknown = [k for k in data if k not in ("base", "report", "strategies")]
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in sweep file; valid keys: base, report, strategies")
    strategies = data.get("strategies") or {}
    for name in strategies:
        STRATEGIES.get(name)  # unknown names fail with the valid choices
    return SweepPlan(
        base=(path.parent / data["base"]).resolve(),
        report=Path(report or data.get("report") or f"reports/{path.stem}"),
        overrides={n: _as_sets(n, m) for n, m in strategies.items()},
    )


def run_sweep(plan: SweepPlan, *, strategies: list[str] | None = None, extra: list[str] | None = None,
              resume: bool = False, skip_done: bool = False,
              echo: Callable[[str], None] = print) -> tuple[list[Path], Path]:
    """Run the plan; returns ``(run folders, report path)``."""
    from cl.loop import run, run_dir_of
    from evaluation.report import make_report

    names = strategies or STRATEGIES.names()
    for n in names:
        STRATEGIES.get(n)
    missing = [n for n in names if n not in plan.overrides and plan.overrides]
    if missing:
        log.warning("sweep file has no overrides for %s: running with the base config", ", ".join(missing))
    run_dirs = []
    for i, name in enumerate(names):
        sets = [f"strategy.name={name}", *plan.overrides.get(name, []), *(extra or [])]
        cfg = load_config(plan.base, sets)
        out = run_dir_of(cfg)
        echo(f"[{i + 1}/{len(names)}] {name} -> {out}")
        if skip_done and (out / "result.json").exists():
            echo("    already done (result.json exists)")
        else:
            result = run(cfg, resume=resume)
            m = result["metrics"]
            forgetting = "—" if m["forgetting"] is None else f"{m['forgetting']:.2f}"  # undefined: null in result.json
            echo(f"    A_last {m['a_last']:.2f}  A_avg {m['a_avg']:.2f}  forgetting {forgetting}  "
                 f"({result['timing']['total_s']:.0f} s)")
        run_dirs.append(out)
    return run_dirs, make_report(run_dirs, plan.report)
