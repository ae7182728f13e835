"""Sweeps: a grid over dotted config keys, expanded into a plan of runs with stable ids, then executed.

A sweep file names a base experiment config, per-strategy overrides and grids (dotted keys, as ``--set``)::

    base: quickstart.yaml            # relative to the sweep file
    report: reports/quickstart       # comparison report of the sweep's runs
    grid:                            # every combination runs (for every strategy)
      seed: [0, 1, 2]
      stream.name: [fashion_mnist, synthetic]
    resources: {num_cpus: 1, num_gpus: 0}   # per run (a Ray task's request); num_gpus defaults from train.device
    strategies:
      simplecil: {}
      sema:                          # overrides for this strategy, plus its own grid and resources
        strategy.func_epoch: 3
        grid: {strategy.exp_threshold: [0.5, 1.0, 2.0]}

Every registered strategy runs (those the file does not list run with the base config's values), so a new strategy
joins as soon as it is registered; ``grid: {strategy.name: [a, b]}`` (or ``--strategies``) restricts the set. A plain
experiment config can be swept too (no overrides, no grid).

Each run's config is ``base <- strategy overrides <- grid values <- --set``, validated with
:func:`cl.config.load_config` before anything runs (an invalid grid fails naming the key). Its id is the hash of the
resolved config (:func:`run_id`); its folder is ``<out>/<experiment>/<seed>`` with a readable experiment name:
``<base experiment or stem>_<strategy>`` plus ``__key=value`` for every grid key that varies (seed excepted).

A run whose folder holds a ``result.json`` for the same id is done and never redone; a run whose folder holds a
checkpoint of the same config resumes from it (``cl.loop.run(cfg, resume=True)``). Executors live in
:mod:`cl.executors`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cl.config import ConfigError, ExperimentConfig, config_to_dict, load_config, read_yaml_file
from cl.registries import STRATEGIES
from cl.registry import RegistryError

__all__ = [
    "Resources",
    "RunSpec",
    "SweepFile",
    "SweepPlan",
    "build_plan",
    "describe_plan",
    "load_sweep",
    "run_id",
    "run_status",
]

log = logging.getLogger(__name__)

_TOP_KEYS = ("base", "report", "grid", "resources", "strategies")
_ENTRY_KEYS = ("grid", "resources")  # reserved inside a strategy entry; everything else is a dotted override
_NOT_GRIDDABLE = ("out", "experiment")  # every run of a sweep shares one out folder; names are derived
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MAX_NAME = 150

RunState = Literal["done", "partial", "stale", "new"]


@dataclass(frozen=True)
class Resources:
    """What one run asks the executor for (a Ray task's ``num_cpus`` / ``num_gpus``; the local executor ignores it).

    ``num_gpus=None`` means 1 when the run's ``train.device`` is ``cuda``/``cuda:N``, else 0.
    """

    num_cpus: float = 1.0
    num_gpus: float | None = None

    def for_config(self, cfg: ExperimentConfig) -> Resources:
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if cfg.train.device.startswith("cuda") else 0.0)
        return Resources(self.num_cpus, gpus)


@dataclass
class StrategyEntry:
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    resources: Resources | None = None


@dataclass
class SweepFile:
    """A parsed sweep file (or a plain experiment config treated as a sweep without overrides)."""

    path: Path
    base: Path
    report: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    strategies: dict[str, StrategyEntry] = field(default_factory=dict)

    @property
    def overrides(self) -> dict[str, list[str]]:
        """Per-strategy overrides as ``--set`` strings (grids excluded)."""
        return {name: _as_sets(e.overrides) for name, e in self.strategies.items()}


@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: its validated config, id, readable name and resource request.

    Attributes:
        index: position in the plan (0-based).
        strategy: registry name.
        settings: this run's value of every grid key of its strategy (``{"seed": 0, "train.lr": 0.01}``).
        varying: the grid keys whose values differ between this strategy's runs (the name is built from them).
        config: the resolved, validated experiment config.
        run_id: hash of the resolved config (``cl.loop``'s config hash; progress bars and workers excluded).
        resources: what the run asks an executor for.
    """

    index: int
    strategy: str
    settings: dict[str, Any]
    varying: tuple[str, ...]
    config: ExperimentConfig
    run_id: str
    resources: Resources

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out) / self.config.experiment / str(self.config.seed)

    @property
    def label(self) -> str:
        shown = [k for k in self.varying if k != "seed"] + ["seed"]
        return f"{self.strategy} " + " ".join(f"{k}={_fmt_value(self.settings.get(k, self.config.seed))}"
                                              for k in shown)


@dataclass
class SweepPlan:
    """The expanded runs of a sweep file and where its report goes."""

    file: SweepFile
    runs: list[RunSpec]
    report: Path


# ----------------------------------------------------------------------------------------------------------------------
# reading the sweep file


def _as_sets(mapping: Mapping[str, Any]) -> list[str]:
    return [f"{k}={v!r}" for k, v in mapping.items()]


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ConfigError(f"{where}: {key!r} is not a dotted config key (like train.lr or strategy.exp_threshold)")
    return key


def _parse_grid(raw: Any, where: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of dotted keys to lists of values, got {raw!r}")
    grid: dict[str, list[Any]] = {}
    for key, values in raw.items():
        key = _check_key(key, where)
        if key.split(".")[0] in _NOT_GRIDDABLE:
            raise ConfigError(f"{where}.{key}: cannot be a grid key (a sweep's runs share one out folder and get "
                              f"derived experiment names)")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
        seen = [repr(v) for v in values]
        dup = next((v for v in seen if seen.count(v) > 1), None)
        if dup is not None:
            raise ConfigError(f"{where}.{key}: value {dup} is listed twice")
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{where}.{key}: non-finite value {v!r}")
        grid[key] = list(values)
    return grid


def _parse_resources(raw: Any, where: str, default: Resources | None = None) -> Resources:
    if raw is None:
        return default or Resources()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with num_cpus and/or num_gpus, got {raw!r}")
    unknown = [k for k in raw if k not in ("num_cpus", "num_gpus")]
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}'; valid keys: num_cpus, num_gpus")
    base = default or Resources()
    values: dict[str, float | None] = {"num_cpus": base.num_cpus, "num_gpus": base.num_gpus}
    for key, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {v!r}")
        values[key] = float(v)
    if not values["num_cpus"] and not values["num_gpus"]:
        raise ConfigError(f"{where}: a run must ask for some CPU or GPU (num_cpus > 0 or num_gpus > 0)")
    return Resources(float(values["num_cpus"] or 0.0), values["num_gpus"])


def _read_yaml(path: Path) -> Any:
    """Parse a sweep or tune file: one-line :class:`ConfigError` for syntax errors, binary files, duplicate keys."""
    return read_yaml_file(path)


def load_sweep(path: str | Path, report: str | None = None) -> SweepFile:
    """Read a sweep file, or treat a plain experiment config as a sweep without overrides.

    Raises:
        ConfigError: a missing file, unknown keys, unknown strategy names, malformed grids or resources.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must hold a mapping (keys: {', '.join(_TOP_KEYS)})")
    default_report = Path(report or data.get("report") or f"reports/{path.stem}")
    if "base" not in data:
        return SweepFile(path, path.resolve(), default_report)
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' in sweep file; valid keys: {', '.join(_TOP_KEYS)}")
    if not isinstance(data["base"], str):
        raise ConfigError(f"{path}: base must be the path of an experiment config, got {data['base']!r}")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: config file not found: {base}")
    grid = _parse_grid(data.get("grid"), "grid")
    resources = _parse_resources(data.get("resources"), "resources")
    raw_strategies = data.get("strategies") or {}
    if not isinstance(raw_strategies, dict):
        raise ConfigError(f"{path}: strategies must map strategy names to overrides, got {raw_strategies!r}")
    entries: dict[str, StrategyEntry] = {}
    for name, raw in raw_strategies.items():
        _strategy_exists(str(name), f"strategies.{name}")
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"strategies.{name} must be a mapping of dotted keys to values, got {raw!r}")
        where = f"strategies.{name}"
        sgrid = _parse_grid(raw.get("grid"), f"{where}.grid")
        if "strategy.name" in sgrid:
            raise ConfigError(f"{where}.grid.strategy.name: a strategy's own grid cannot change its name")
        both = [k for k in sgrid if k in grid]
        if both:
            raise ConfigError(f"{where}.grid.{both[0]}: already a key of the top-level grid; list it in one place")
        overrides = {_check_key(k, where): v for k, v in raw.items() if k not in _ENTRY_KEYS}
        entries[str(name)] = StrategyEntry(overrides, sgrid, _parse_resources(raw.get("resources"),
                                                                               f"{where}.resources", resources)
                                           if "resources" in raw else None)
    for name in grid.get("strategy.name", []):
        _strategy_exists(name, "grid.strategy.name")
    return SweepFile(path, base, default_report, grid, resources, entries)


def _strategy_exists(name: str, where: str) -> None:
    try:
        STRATEGIES.get(name)
    except RegistryError as err:
        raise ConfigError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# expanding the plan


def run_id(cfg: ExperimentConfig) -> str:
    """Stable id of a run: the hash of its resolved config (the ``config_hash`` that ``cl.loop.run`` records)."""
    from cl.loop import _config_hash

    return _config_hash(config_to_dict(cfg))


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt_value(x) for x in v)
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "x"


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _experiment_name(prefix: str, strategy: str, varying: Sequence[str], values: Mapping[str, Any]) -> str:
    shown = [k for k in varying if k not in ("seed", "strategy.name")]
    short = _short_names(shown)
    name = _slug(f"{prefix}_{strategy}") + "".join(f"__{_slug(short[k])}={_slug(_fmt_value(values[k]))}"
                                                   for k in shown)
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(repr(sorted((k, repr(values[k])) for k in shown)).encode()).hexdigest()[:12]
    return f"{name[: _MAX_NAME - 14]}__{digest}"


def _strategy_names(sweep: SweepFile, only: Sequence[str] | None) -> list[str]:
    names = list(sweep.grid.get("strategy.name") or STRATEGIES.names())
    if only:
        for n in only:
            _strategy_exists(n, "--strategies")
        names = [n for n in only if n in names] if "strategy.name" in sweep.grid else list(only)
        if not names:
            raise ConfigError(f"--strategies {','.join(only)}: none of them is in the sweep's grid.strategy.name")
    return names


def build_plan(sweep: SweepFile, *, strategies: Sequence[str] | None = None,
               extra: Sequence[str] | None = None) -> SweepPlan:
    """Expand a sweep file into its runs and validate every run's config before anything runs.

    Args:
        sweep: the parsed sweep file.
        strategies: restrict to these names (``--strategies``).
        extra: ``--set`` overrides applied to every run after the grid; they may not override a grid key.

    Raises:
        ConfigError: naming the key, for an invalid value in any run, two runs resolving to one folder, or a
            ``--set`` that collapses a grid key.
    """
    extra = list(extra or [])
    extra_keys = {item.split("=", 1)[0].strip() for item in extra}
    if "experiment" in extra_keys:
        raise ConfigError("--set experiment: a sweep derives each run's experiment name; set the base config's "
                          "experiment (the name prefix) instead")
    base_data = _read_yaml(sweep.base) or {}
    if not isinstance(base_data, dict):
        raise ConfigError(f"{sweep.base}: a config file must hold a mapping of sections")
    prefix = str(base_data.get("experiment") or sweep.base.stem)
    missing = [n for n in STRATEGIES.names() if sweep.strategies and n not in sweep.strategies]
    if missing and "strategy.name" not in sweep.grid and not strategies:
        log.info("sweep file has no overrides for %s: they run with the base config", ", ".join(missing))
    runs: list[RunSpec] = []
    by_dir: dict[Path, RunSpec] = {}
    for name in _strategy_names(sweep, strategies):
        entry = sweep.strategies.get(name, StrategyEntry())
        grid = {k: v for k, v in sweep.grid.items() if k != "strategy.name"}
        grid.update(entry.grid)
        keys = [k for k in grid if k != "seed"] + (["seed"] if "seed" in grid else [])
        clash = [k for k in keys if k in extra_keys]
        if clash:
            raise ConfigError(f"--set {clash[0]}: {clash[0]} is a grid key of the sweep; change the grid instead")
        both = [k for k in entry.overrides if k in grid]
        if both:
            raise ConfigError(f"strategies.{name}.{both[0]}: also a grid key; set it in one place")
        varying = tuple(k for k in keys if len(grid[k]) > 1)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            sets = [f"strategy.name={name}", *_as_sets(entry.overrides), *_as_sets(values)]
            experiment = _experiment_name(prefix, name, varying, values)
            cfg = _load(sweep, [*sets, f"experiment={experiment!r}", *extra], name, values)
            spec = RunSpec(len(runs), name, values, varying, cfg, run_id(cfg),
                           (entry.resources or sweep.resources).for_config(cfg))
            other = by_dir.get(spec.run_dir)
            if other is not None:
                raise ConfigError(f"{sweep.path}: runs '{other.label}' and '{spec.label}' resolve to one folder "
                                  f"{spec.run_dir}; make their grid values distinct")
            by_dir[spec.run_dir] = spec
            runs.append(spec)
    return SweepPlan(sweep, runs, sweep.report)


def _load(sweep: SweepFile, sets: list[str], strategy: str, values: Mapping[str, Any]) -> ExperimentConfig:
    try:
        return load_config(sweep.base, sets)
    except ConfigError as err:
        where = " ".join(f"{k}={_fmt_value(v)}" for k, v in values.items())
        raise ConfigError(f"{sweep.path}: run {strategy}{' ' + where if where else ''}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# run folders


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_status(run: RunSpec) -> RunState:
    """Where a run's folder stands: ``done`` (a result for this id), ``partial`` (started with this config: resume),
    ``stale`` (holds another config's files: a fresh run overwrites them) or ``new``."""
    folder = run.run_dir
    cfg = _read_json(folder / "config.json")
    result = _read_json(folder / "result.json")
    if result is not None and result.get("accuracy_matrix"):
        result_hash = result.get("config_hash")
        if result_hash is None and cfg is not None and \
                (folder / "result.json").stat().st_mtime >= (folder / "config.json").stat().st_mtime:
            result_hash = cfg.get("config_hash")  # results written before result.json recorded its config hash
        if result_hash == run.run_id:
            return "done"
    if cfg is None:
        return "stale" if folder.exists() and any(folder.iterdir()) else "new"
    if cfg.get("config_hash") != run.run_id:
        return "stale"
    state = _read_json(folder / "checkpoint" / "state.json")
    if state is not None and state.get("config_hash") not in (None, run.run_id):
        return "stale"
    return "partial"


def describe_plan(plan: SweepPlan) -> list[str]:
    """Lines for ``--dry-run``: the count, what differs per run, and each run's state, folder and id."""
    states = [run_status(r) for r in plan.runs]
    counts = {s: states.count(s) for s in ("done", "partial", "stale", "new")}
    strategies = list(dict.fromkeys(r.strategy for r in plan.runs))
    stale = f", {counts['stale']} overwriting another config's folder" if counts["stale"] else ""
    lines = [f"{plan.file.path}: {len(plan.runs)} runs over {len(strategies)} strategies "
             f"({counts['done']} done, {counts['partial']} to resume, {counts['new'] + counts['stale']} to start"
             f"{stale})"]
    for name in strategies:
        first = next(r for r in plan.runs if r.strategy == name)
        n = sum(r.strategy == name for r in plan.runs)
        grid = {k: list(dict.fromkeys(_fmt_value(r.settings[k]) for r in plan.runs if r.strategy == name))
                for k in first.varying}
        what = "; ".join(f"{k} in {{{', '.join(v)}}}" for k, v in grid.items()) or "one run"
        lines.append(f"  {name}: {n} run{'s' if n != 1 else ''}: {what}")
    width = max((len(r.label) for r in plan.runs), default=0)
    for r, s in zip(plan.runs, states, strict=True):
        lines.append(f"  [{r.index + 1:>{len(str(len(plan.runs)))}}] {s:<7} {r.label:<{width}}  {r.run_dir}  "
                     f"id {r.run_id}")
    lines.append(f"report: {plan.report}")
    return lines
