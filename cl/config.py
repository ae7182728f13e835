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
from cl.validate import check_class_split, check_fields, check_run_name

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
    "read_yaml_file",
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
        loss_limit: a training loss with ``|loss|`` above this is a numeric fault (a blow-up; the run stops at the
            last good boundary, ``cl.numerics``); ``null`` disables the check (NaN/inf are always faults).
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
    loss_limit: float | None = 1e6
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
        if not self.lr > 0:  # also refuses NaN
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"train.device={self.device!r} is not a device; valid: auto, cpu, cuda, cuda:N, "
                                  f"mps") from None
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
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e3 in YAML
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str) or "\x00" in value:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Instantiate ``cls`` from ``data`` strictly: unknown keys and bad values raise :class:`ConfigError`."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {_kind(data)}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key '{section}.{unknown[0]}'; valid keys for {section}: {', '.join(sorted(valid))}")
    # the ``name`` field selects the class; it is not a value of the component
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if isinstance(tp, type) and is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = build_dataclass(tp, v, f"{section}.{k}")
        else:
            kwargs[k] = _coerce(v, tp, f"{section}.{k}")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}") from None
    check_fields(obj, section)
    return obj


def _kind(value: Any) -> str:
    return f"a list {value!r}"[:80] if isinstance(value, list) else f"{type(value).__name__} {value!r}"[:80]


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
        if not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


_TOP = ("experiment", "seed", "out", "backbone", "stream", "strategy", "train", "eval")
_SECTIONS = ("backbone", "stream", "strategy", "train", "eval")
_REQUIRED = ("backbone", "stream")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"line {line}: duplicate key {key!r}")
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def read_yaml_file(path: str | Path) -> Any:
    """Parse a YAML file; every problem is a one-line :class:`ConfigError` naming the file (and the line).

    Refused: a missing path or a folder, unreadable files, binary or non-UTF-8 content, YAML syntax errors,
    duplicate keys.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    if b"\x00" in raw:
        raise ConfigError(f"{path}: binary file, not a YAML config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML at {where}{problem}") from None


def _registered(registry: Any, section: str, data: dict[str, Any], default: str) -> Any:
    name = data.get("name", default)
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name must be a string, got {name!r}")
    try:
        return registry.get(name)
    except RegistryError as err:
        raise ConfigError(f"{section}.name: {err}") from None


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from a YAML path or a dict, apply overrides, and validate everything.

    Every value is checked here, before any backbone, data or run-folder work: types, ranges (the rule table of
    :mod:`cl.validate`), the run name, and the class split where the class count is known from the config. A config
    *file* must hold the ``backbone`` and ``stream`` sections (a dict, e.g. the Avalanche bridge's, may rely on
    defaults).

    Raises:
        ConfigError: one line naming the file or the key.
    """
    if isinstance(source, dict):
        data: Any = source
        origin = "config"
    else:
        data = read_yaml_file(source)
        origin = str(source)
        if data is None or data == {}:
            raise ConfigError(f"{origin}: empty config; it needs at least the backbone and stream sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config must hold a mapping of sections, got {_kind(data)}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{origin}: section names must be strings, got {bad_keys[0]!r}")
    data = apply_overrides(data, overrides or [])
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(_TOP)}")
    for sec in _SECTIONS:
        if data.get(sec) is not None and not isinstance(data[sec], dict):
            raise ConfigError(f"{sec} must be a mapping of keys to values, got {_kind(data[sec])}")
    if not isinstance(source, dict):
        missing = [sec for sec in _REQUIRED if not data.get(sec)]
        if missing:
            raise ConfigError(f"{origin}: no '{missing[0]}' section; a config names at least its backbone and stream "
                              f"(see configs/smoke.yaml)")
    stream_data = dict(data.get("stream") or {})
    strategy_data = dict(data.get("strategy") or {})
    stream_spec = _registered(STREAMS, "stream", stream_data, "synthetic")
    strategy_cls = _registered(STRATEGIES, "strategy", strategy_data, "finetune")
    stream_data.setdefault("name", "synthetic")
    strategy_data.setdefault("name", "finetune")
    stem = "experiment" if isinstance(source, dict) else Path(source).stem
    experiment = _coerce(data.get("experiment", f"{stem}_{strategy_data['name']}"), str, "experiment")
    check_run_name(experiment)
    cfg = ExperimentConfig(
        # default run folder: runs/<config stem>_<strategy>/<seed>/
        experiment=experiment,
        seed=_coerce(data.get("seed", 0), int, "seed"),
        out=_coerce(data.get("out", "runs"), str, "out"),
        backbone=build_dataclass(BackboneConfig, data.get("backbone"), "backbone"),
        stream=build_dataclass(stream_spec.config_cls, stream_data, "stream"),
        strategy=build_dataclass(strategy_cls.config_cls, strategy_data, "strategy"),
        train=build_dataclass(TrainConfig, data.get("train"), "train"),
        eval=build_dataclass(EvalConfig, data.get("eval"), "eval"),
    )
    check_fields(cfg, "")
    num_classes = getattr(cfg.stream, "num_classes", None)
    check_class_split(cfg.stream, num_classes if isinstance(num_classes, int) else None)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
