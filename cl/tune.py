"""Hyper-parameter search with Ray Tune (``clsim tune FILE``), continual-learning aware, never on test sets.

Protocol (the one used; stated in the README): a trial trains the strategy on the **first k tasks** of the stream,
with a **validation split held out of each of those tasks' training sets** (a seeded, per-class fraction, read with
the eval transform), and is scored on those validation splits after every task: stage accuracies, A_avg, A_last and
forgetting come from the validation accuracy matrix. The test sets are never read (Chaudhry et al. 2019, "Efficient
Lifelong Learning with A-GEM", tune on the first tasks; here additionally on held-out training data). Each task is one
Tune iteration, so a Tune scheduler (ASHA by default) can stop a poor trial after its first tasks.

A tune file::

    base: quickstart.yaml
    set: {strategy.name: sema, strategy.func_epoch: 3}   # fixed overrides for every trial
    space:                                                # dotted key -> {distribution: arguments}
      strategy.exp_threshold: {uniform: [0.5, 3.0]}
      strategy.init_lr: {loguniform: [0.0001, 0.01]}
      train.batch_size: {choice: [16, 32]}
    protocol: {tasks: 2, val_fraction: 0.2}
    metric: a_avg          # any key of the validation metrics; mode: max or min
    search: {name: random, num_samples: 8}              # tune.create_searcher name (+ its arguments)
    scheduler: {name: async_hyperband, grace_period: 1} # tune.create_scheduler name (+ its arguments)
    resources: {num_cpus: 1, num_gpus: 0}
    out: tune/sema          # default tune/<file stem>: Tune's storage (shared filesystem on a cluster)

Distributions: ``uniform``, ``loguniform``, ``quniform`` ``[low, high, q]``, ``randint`` ``[low, high)``, ``choice``
(a list) and ``grid`` (a list, every value tried), Ray Tune's own sampling functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cl.config import ConfigError, ExperimentConfig, load_config
from cl.registries import STRATEGIES
from cl.sweep import Resources, _check_key, _parse_resources, _read_yaml
from cl.types import Stream, Task, ViewableDataset

__all__ = ["HeldOut", "TuneSpec", "held_out_stream", "load_tune", "run_tune", "validation_protocol"]

_TOP_KEYS = ("base", "set", "space", "protocol", "metric", "mode", "search", "scheduler", "resources", "out")
_DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}
_METRICS = ("a_last", "a_avg", "a_last_task_mean", "a_avg_task_mean", "forgetting", "bwt")


# ----------------------------------------------------------------------------------------------------------------------
# the protocol: first k tasks, validation split held out of their training sets


class HeldOut(ViewableDataset):
    """The samples of ``base`` at ``positions`` (a subset that keeps the train/eval views)."""

    def __init__(self, base: ViewableDataset, positions: np.ndarray) -> None:
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = torch.as_tensor(base.labels)[torch.as_tensor(self.positions)]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.base[int(self.positions[i])]

    def view(self, kind: Literal["train", "eval"]) -> HeldOut:
        return HeldOut(self.base.view(kind), self.positions)

    @property
    def deterministic(self) -> bool:
        return self.base.deterministic


def held_out_stream(stream: Stream, tasks: int, val_fraction: float, seed: int) -> Stream:
    """The first ``tasks`` tasks of ``stream``, each split into training and validation samples per class.

    Per class, ``round(val_fraction * n)`` samples (at least 1, at most n - 1) chosen by a generator seeded from
    ``(seed, task id)`` become validation samples, read with the eval transform; the task's test set is replaced by
    them and never read.

    Raises:
        ConfigError: ``tasks`` exceeds the stream, or a class has fewer than 2 training samples.
    """
    from cl.context import derive_seed

    if not 1 <= tasks <= len(stream):
        raise ConfigError(f"protocol.tasks={tasks}: the stream has {len(stream)} tasks")
    out = []
    for task in stream.tasks[:tasks]:
        labels = torch.as_tensor(task.train.labels).numpy()
        rng = np.random.default_rng(derive_seed(seed, "validation", task.task_id))
        val = []
        for label in task.labels:
            pos = np.flatnonzero(labels == label)
            if len(pos) < 2:
                raise ConfigError(f"protocol.val_fraction: class {label} of task {task.task_id} has {len(pos)} "
                                  f"training samples; a validation split needs at least 2")
            k = min(max(1, round(val_fraction * len(pos))), len(pos) - 1)
            val.append(rng.choice(pos, size=k, replace=False))
        val_pos = np.sort(np.concatenate(val))
        train_pos = np.setdiff1d(np.arange(len(labels)), val_pos)
        out.append(Task(task.task_id, task.class_ids, task.labels, HeldOut(task.train, train_pos),
                        HeldOut(task.train.view("eval"), val_pos)))
    n_classes = sum(t.num_classes for t in out)
    return Stream(f"{stream.name}[first {tasks} tasks, validation]", out, n_classes, stream.class_order[:n_classes],
                  stream.class_names[:n_classes] if stream.class_names else None, stream.image_size,
                  {**stream.meta, "protocol": "validation split of the first k tasks"})


def validation_protocol(cfg: ExperimentConfig, tasks: int, val_fraction: float,
                        report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` on the first ``tasks`` tasks and score it on validation splits held out of their training sets.

    Args:
        cfg: the trial's experiment config (nothing is written to its run folder).
        tasks: k, the number of leading tasks used.
        val_fraction: fraction of each class's training samples held out.
        report: called after every task with the metrics so far (``task`` = tasks learned), e.g. ``tune.report``.

    Returns:
        The validation metrics after the k-th task (``evaluation.summarize_result`` keys) plus ``task`` and
        ``accuracy_matrix``.
    """
    from cl.loop import RunContext, Session, build_model_and_stream, resolve_device, rng_scope
    from cl.plugins import default_finalizers
    from cl.runlog import JsonlLog

    summarize, _ = default_finalizers()
    device = resolve_device(cfg.train.device)
    with rng_scope(cfg.seed, device):
        ctx = RunContext(cfg.train, device, cfg.seed, JsonlLog(None))
        model, full = build_model_and_stream(cfg, device)
        stream = held_out_stream(full, tasks, val_fraction, cfg.seed)
        ctx.stream = stream
        strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, ctx)
        strategy.setup(model, stream)
        sess = Session(model, stream, strategy, ctx)
        rows: list[list[float | None]] = []
        n_val = [len(t.test) for t in stream.tasks]
        metrics: dict[str, Any] = {}
        for task in stream.tasks:
            sess.train_task(task)
            rows.append(sess.evaluate(task.task_id)["row"][: task.task_id + 1])
            k = len(rows)
            square = [r + [None] * (k - len(r)) for r in rows]
            m, _ = summarize(square, n_val[:k], None)
            metrics = {**{key: m.get(key) for key in _METRICS}, "task": k, "accuracy_matrix": square}
            if report is not None:
                report({key: v for key, v in metrics.items() if key != "accuracy_matrix" and v is not None})
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# the tune file


@dataclass
class TuneSpec:
    path: Path
    base: Path
    sets: list[str]
    space: dict[str, tuple[str, list[Any]]]
    tasks: int
    val_fraction: float
    metric: str = "a_avg"
    mode: Literal["max", "min"] = "max"
    search: dict[str, Any] = field(default_factory=lambda: {"name": "random", "num_samples": 8})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "async_hyperband", "grace_period": 1})
    resources: Resources = field(default_factory=Resources)
    out: Path = Path("tune")

    def config(self, values: dict[str, Any]) -> ExperimentConfig:
        """The experiment config of a trial with ``values`` for the space's keys."""
        return load_config(self.base, [*self.sets, *(f"{k}={v!r}" for k, v in values.items())])

    def describe(self) -> list[str]:
        lines = [f"{self.path}: tune {', '.join(self.space)} on {self.base.name}",
                 f"  protocol: first {self.tasks} tasks, validation split {self.val_fraction:g} of their training "
                 f"samples (test sets never read)",
                 f"  objective: {self.mode} validation {self.metric}",
                 f"  search: {self.search}; scheduler: {self.scheduler}; resources per trial: "
                 f"{self.resources.num_cpus:g} CPU, {self.resources.num_gpus or 0:g} GPU",
                 f"  results: {self.out}"]
        lines += [f"  {k}: {dist} {args}" for k, (dist, args) in self.space.items()]
        return lines


def load_tune(path: str | Path, extra: Sequence[str] | None = None) -> TuneSpec:
    """Read and validate a tune file: every key of the space is tried in a config before Ray starts.

    Raises:
        ConfigError: naming the key, for unknown keys, malformed distributions, protocol values or configs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path) or {}
    if not isinstance(data, dict) or "base" not in data or "space" not in data:
        raise ConfigError(f"{path}: a tune file needs base and space (keys: {', '.join(_TOP_KEYS)})")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' in tune file; valid keys: {', '.join(_TOP_KEYS)}")
    base = (path.parent / str(data["base"])).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: config file not found: {base}")
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: set must map dotted keys to values, got {fixed!r}")
    sets = [f"{_check_key(k, 'set')}={v!r}" for k, v in fixed.items()] + list(extra or [])
    space = _parse_space(data["space"])
    protocol = data.get("protocol") or {}
    if not isinstance(protocol, dict) or any(k not in ("tasks", "val_fraction") for k in protocol):
        raise ConfigError(f"{path}: protocol takes tasks and val_fraction, got {protocol!r}")
    tasks = protocol.get("tasks", 2)
    frac = protocol.get("val_fraction", 0.2)
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ConfigError(f"protocol.tasks must be a positive integer, got {tasks!r}")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise ConfigError(f"protocol.val_fraction must be in (0, 1), got {frac!r}")
    metric, mode = data.get("metric", "a_avg"), data.get("mode", "max")
    if metric not in _METRICS:
        raise ConfigError(f"metric={metric!r}; valid choices: {', '.join(_METRICS)}")
    if mode not in ("max", "min"):
        raise ConfigError(f"mode={mode!r}; valid choices: max, min")
    spec = TuneSpec(path, base, sets, space, tasks, float(frac), metric, mode,
                    resources=_parse_resources(data.get("resources"), "resources"),
                    out=Path(str(data.get("out") or f"tune/{path.stem}")))
    for key, default in (("search", spec.search), ("scheduler", spec.scheduler)):
        raw = data.get(key, default)
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{key} must be a mapping with a name (a Ray Tune {key} name), got {raw!r}")
        setattr(spec, key, dict(raw))
    try:
        cfg = spec.config({k: args[0] for k, (_, args) in space.items()})  # every key tried once
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    spec.resources = spec.resources.for_config(cfg)
    return spec


def _parse_space(raw: Any) -> dict[str, tuple[str, list[Any]]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space must map dotted keys to distributions, got {raw!r}")
    space = {}
    for key, dist in raw.items():
        key = _check_key(key, "space")
        if key.split(".")[0] in ("out", "experiment", "seed") or key == "strategy.name":
            raise ConfigError(f"space.{key}: not a hyper-parameter (tune one strategy on one seed per trial)")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in _DISTRIBUTIONS:
            raise ConfigError(f"space.{key} must be one of {{{', '.join(_DISTRIBUTIONS)}: [...]}}, got {dist!r}")
        name, args = next(iter(dist.items()))
        arity = _DISTRIBUTIONS[name]
        if not isinstance(args, list) or not args or (arity is not None and len(args) != arity):
            raise ConfigError(f"space.{key}.{name} takes {arity or 'a non-empty list of'} values, got {args!r}")
        if arity is not None:
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
                raise ConfigError(f"space.{key}.{name} takes numbers, got {args!r}")
            if args[0] >= args[1] or (name == "loguniform" and args[0] <= 0):
                raise ConfigError(f"space.{key}.{name}: need 0 < low < high for loguniform, low < high otherwise, "
                                  f"got {args!r}")
        space[key] = (name, list(args))
    return space


# ----------------------------------------------------------------------------------------------------------------------
# running it on Ray Tune


def _tune_space(tune: Any, space: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
            "randint": tune.randint, "choice": tune.choice, "grid": tune.grid_search}
    return {key: (make[name](args) if name in ("choice", "grid") else make[name](*args))
            for key, (name, args) in space.items()}


def _trial(values: dict[str, Any], spec: TuneSpec) -> None:
    from ray import tune

    from cl.plugins import load_builtin

    load_builtin()
    cfg = spec.config(values)
    validation_protocol(cfg, spec.tasks, spec.val_fraction, report=tune.report)


def run_tune(spec: TuneSpec, *, address: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the search; write ``trials.csv`` (one row per trial) and ``best.json`` into ``spec.out``.

    Returns:
        ``{"config": best values, "metrics": its validation metrics, "results": spec.out}``.
    """
    from cl.executors import _import_ray, _init_ray

    ray = _import_ray()
    from ray import tune

    started = False
    if not ray.is_initialized():
        _init_ray(ray, address)
        started = True
    try:
        search = dict(spec.search)
        num_samples = int(search.pop("num_samples", 8))
        searcher = tune.create_searcher(search.pop("name"), **search)
        sched = dict(spec.scheduler)
        sched_name = sched.pop("name")
        if sched_name in ("async_hyperband", "asynchyperband", "hyperband"):
            sched.setdefault("max_t", spec.tasks)
        scheduler = tune.create_scheduler(sched_name, **sched)
        trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec),
                                        {"cpu": spec.resources.num_cpus, "gpu": spec.resources.num_gpus or 0})
        out = spec.out.resolve()
        tuner = tune.Tuner(
            trainable, param_space=_tune_space(tune, spec.space),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher,
                                        scheduler=scheduler, num_samples=num_samples),
            run_config=tune.RunConfig(name="trials", storage_path=str(out), verbose=0),
        )
        echo(f"tuning {', '.join(spec.space)}: {num_samples} samples, first {spec.tasks} tasks, validation "
             f"{spec.metric} ({spec.mode})")
        grid = tuner.fit()
        frame = grid.get_dataframe()
        out.mkdir(parents=True, exist_ok=True)
        from cl.runlog import atomic_write_json, atomic_write_text

        atomic_write_text(out / "trials.csv", frame.to_csv(index=False))
        best = grid.get_best_result(spec.metric, spec.mode)
        summary = {"config": best.config, "metrics": {k: v for k, v in (best.metrics or {}).items()
                                                      if k in (*_METRICS, "task")},
                   "protocol": {"tasks": spec.tasks, "val_fraction": spec.val_fraction}, "results": str(out)}
        atomic_write_json(out / "best.json", json.loads(json.dumps(summary, default=str)))
        if grid.errors:
            echo(f"{len(grid.errors)} trials failed; first: {grid.errors[0]}")
        return summary
    finally:
        if started:
            ray.shutdown()
