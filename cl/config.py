"""Strict, typed experiment configuration: frozen dataclasses, YAML files and ``--set a.b=value`` overrides.

An experiment YAML has sections ``backbone``, ``stream``, ``strategy``, ``train``, ``eval`` plus ``experiment``,
``seed`` and ``out``. ``stream`` and ``strategy`` are ``name:`` plus the fields of the registered component's config
class. Unknown keys and unknown names fail with one line naming the key and the valid choices.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cl.backbone import BackboneConfig
from cl.errors import ConfigError
from cl.registries import STRATEGIES, STREAMS
from cl.registry import RegistryError

__all__ = [
    "ConfigError",
    "TrainConfig",
    "EvalConfig",
    "StrategyConfig",
    "ExperimentConfig",
    "load_config",
    "build_dataclass",
    "config_to_dict",
    "apply_overrides",
]


@dataclass(frozen=True)
class TrainConfig:
    """``train.*``: what the loop needs to run phases (strategies may override per phase).

    Attributes:
        epochs: default epochs per phase (strategies read their own epoch fields when they have them).
        batch_size / eval_batch_size: minibatch sizes.
        lr, optimizer, momentum, weight_decay, scheduler: optimiser defaults (rebuilt for every phase).
        bf16: bfloat16 autocast for forward passes (CUDA, or CPU where supported).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        num_workers: DataLoader workers.
        grad_clip: clip gradient norm (``None`` = off).
        progress: tqdm progress bars.
        checkpoint: write a checkpoint at every task boundary (enables ``--resume``).
        cache: ``auto`` = reuse frozen computation (tokens entering the first trainable block, descriptor inputs,
            test-set features) where it is exact (``cl.cache``); ``off`` = recompute everything.
        cache_mb: RAM for the cache in MiB; entries beyond it go to a memory-mapped file in ``cache_dir``.
        cache_dtype: storage type of cached values (``float32`` exact; ``bfloat16``/``float16`` halve the memory).
        cache_dir: where entries over ``cache_mb`` are spilled (``None`` = the run folder, else the temp dir).
    """

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 0.01
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "constant"] = "cosine"
    bf16: bool = False
    device: str = "auto"
    num_workers: int = 0
    grad_clip: float | None = None
    progress: bool = True
    checkpoint: bool = True
    cache: Literal["auto", "off"] = "off"
    cache_mb: float = 2048.0
    cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"train.optimizer={self.optimizer!r}; valid choices: sgd, adam, adamw")
        if self.scheduler not in ("cosine", "constant"):
            raise ConfigError(f"train.scheduler={self.scheduler!r}; valid choices: cosine, constant")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.cache not in ("auto", "off"):
            raise ConfigError(f"train.cache={self.cache!r}; valid choices: auto, off")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"train.cache_dtype={self.cache_dtype!r}; valid choices: float32, bfloat16, float16")
        if not self.cache_mb >= 0:
            raise ConfigError(f"train.cache_mb must be >= 0, got {self.cache_mb}")


@dataclass(frozen=True)
class EvalConfig:
    """``eval.*``. ``future_tasks``: also evaluate tasks not yet seen (fills R[i][j>i] for FWT; rarely meaningful
    in class-incremental learning, metrics.md section 7)."""

    future_tasks: bool = False


@dataclass(frozen=True)
class StrategyConfig:
    """Base of every strategy config (``strategy.name`` selects the registered strategy)."""

    name: str = "finetune"


@dataclass(frozen=True)
class ExperimentConfig:
    experiment: str = "experiment"
    seed: int = 0
    out: str = "runs"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    stream: Any = None
    strategy: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce YAML values to the annotated type (lists -> tuples, '1e-3' -> float); fail with the key named."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}; valid choices: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Instantiate ``cls`` from ``data`` strictly: unknown keys and bad values raise :class:`ConfigError`."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key '{section}.{unknown[0]}'; valid keys for {section}: {', '.join(sorted(valid))}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if isinstance(tp, type) and is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = build_dataclass(tp, v, f"{section}.{k}")
        else:
            kwargs[k] = _coerce(v, tp, f"{section}.{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}") from None


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("null", "none"):
            return None
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed with ``ast.literal_eval``) to a nested dict copy."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


_TOP = ("experiment", "seed", "out", "backbone", "stream", "strategy", "train", "eval")


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from a YAML path or a dict, apply overrides, and validate everything."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of sections")
    data = apply_overrides(data, overrides or [])
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(_TOP)}")
    stream_data = dict(data.get("stream") or {})
    strategy_data = dict(data.get("strategy") or {})
    try:
        stream_spec = STREAMS.get(stream_data.get("name", "synthetic"))
        strategy_cls = STRATEGIES.get(strategy_data.get("name", "finetune"))
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    stream_data.setdefault("name", "synthetic")
    strategy_data.setdefault("name", "finetune")
    stem = "experiment" if isinstance(source, dict) else Path(source).stem
    return ExperimentConfig(
        # default run folder: runs/<config stem>_<strategy>/<seed>/
        experiment=_coerce(data.get("experiment", f"{stem}_{strategy_data['name']}"), str, "experiment"),
        seed=_coerce(data.get("seed", 0), int, "seed"),
        out=_coerce(data.get("out", "runs"), str, "out"),
        backbone=build_dataclass(BackboneConfig, data.get("backbone"), "backbone"),
        stream=build_dataclass(stream_spec.config_cls, stream_data, "stream"),
        strategy=build_dataclass(strategy_cls.config_cls, strategy_data, "strategy"),
        train=build_dataclass(TrainConfig, data.get("train"), "train"),
        eval=build_dataclass(EvalConfig, data.get("eval"), "eval"),
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
