"""Generic value checks for every config dataclass, applied at load time by :func:`cl.config.build_dataclass`.

One rule table instead of an ``if`` per field: a field's *name* says what its value must satisfy, so every strategy,
stream and adapter config is covered without writing its own checks (its ``__post_init__`` still adds specifics).

| field name | rule |
|---|---|
| any float | finite (no NaN, no infinity) |
| ``lr``, ``*_lr`` | > 0 |
| ``*lr_scale`` | >= 0 |
| ``momentum``, ``*_momentum`` | in [0, 1] |
| ``weight_decay``, ``*_decay`` | >= 0 |
| ``*dropout`` | in [0, 1) |
| ``*epoch``, ``*epochs`` | >= 0 (``train.epochs`` itself > 0) |
| ``*batch_size``, ``grad_clip``, ``*_limit`` | > 0 |
| ``*workers`` | >= 0 |
| ``seed``, ``*_seed`` | in [0, 2**32 - 1] (numpy's seed range) |

A field opts out or overrides with ``dataclasses.field(metadata={"check": None})`` or ``{"check": (low, high,
low_inclusive, high_inclusive)}``. ``None`` values (optional fields) are never checked.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from cl.errors import ConfigError

__all__ = ["check_fields", "check_run_name", "check_class_split", "SEED_MAX"]

SEED_MAX = 2**32 - 1
Range = tuple[float | None, float | None, bool, bool]  # low, high, low inclusive, high inclusive

_RULES: list[tuple[re.Pattern[str], Range]] = [
    (re.compile(r"(.+_)?lr"), (0.0, None, False, True)),
    (re.compile(r".*lr_scale"), (0.0, None, True, True)),
    (re.compile(r"(.+_)?momentum"), (0.0, 1.0, True, True)),
    (re.compile(r"(.+_)?(weight_)?decay"), (0.0, None, True, True)),
    (re.compile(r"(.+_)?dropout"), (0.0, 1.0, True, False)),
    (re.compile(r"(.+_)?epochs?"), (0.0, None, True, True)),
    (re.compile(r"(.+_)?batch_size|grad_clip|(.+_)?limit"), (0.0, None, False, True)),
    (re.compile(r"(.+_)?workers"), (0.0, None, True, True)),
    (re.compile(r"(.+_)?seed"), (0.0, float(SEED_MAX), True, True)),
]


def _num(v: float | None) -> str:
    """A bound as written: integers in full (``4294967295``, not ``4.29497e+09``), other values short; no lower
    bound is ``-inf``."""
    if v is None:
        return "-inf"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _describe(r: Range) -> str:
    low, high, li, hi = r
    if high is None:
        return f"{'>=' if li else '>'} {_num(low)}"
    return f"in {'[' if li else '('}{_num(low)}, {_num(high)}{']' if hi else ')'}"


def _rule(name: str, metadata: Any) -> Range | None:
    if "check" in metadata:
        return metadata["check"]
    for pattern, r in _RULES:
        if pattern.fullmatch(name):
            return r
    return None


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, tuple):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return []


def check_fields(obj: Any, section: str) -> None:
    """Check every numeric field of a config dataclass (and of nested dataclasses) against the rule table.

    Raises:
        ConfigError: ``<section>.<field> must be <rule>, got <value>`` (one line).
    """
    if not is_dataclass(obj):
        return
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        if is_dataclass(value):
            check_fields(value, key)
            continue
        nums = _numbers(value)
        for v in nums:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key} must be a finite number, got {v}")
        r = _rule(f.name, f.metadata)
        if r is None:
            continue
        low, high, li, hi = r
        for v in nums:
            bad = (low is not None and (v < low or (v == low and not li))) or (
                high is not None and (v > high or (v == high and not hi)))
            if bad:
                raise ConfigError(f"{key} must be {_describe(r)}, got {v}")


def check_run_name(name: str, key: str = "experiment") -> None:
    """A run-folder name must stay inside ``out``: relative, no ``..``, no empty or hidden-drive parts."""
    if not name or "\x00" in name:
        raise ConfigError(f"{key} must be a non-empty name, got {name!r}")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or name.startswith(("/", "\\", "~")):
        raise ConfigError(f"{key}={name!r} must be a relative name inside out, not an absolute path")
    parts = re.split(r"[\\/]", name)
    if any(p in ("..", ".", "") for p in parts):
        raise ConfigError(f"{key}={name!r} must stay inside out: no '..', '.' or empty path parts")


def check_class_split(stream: Any, num_classes: int | None) -> None:
    """``stream.class_order`` and ``stream.init_classes`` against the class count (where it is known at load time).

    Raises:
        ConfigError: duplicates, missing or out-of-range classes in ``class_order``, or ``init_classes`` larger than
            the class count.
    """
    order = getattr(stream, "class_order", None)
    if order is not None:
        dup = sorted(c for c, n in Counter(order).items() if n > 1)
        if dup:
            raise ConfigError(f"stream.class_order lists classes {dup[:5]} more than once")
        neg = [c for c in order if c < 0]
        if neg:
            raise ConfigError(f"stream.class_order holds negative class ids {neg[:5]}")
        if num_classes is not None:
            out = [c for c in order if c >= num_classes]
            if out:
                raise ConfigError(f"stream.class_order holds ids {out[:5]} outside 0..{num_classes - 1}")
            missing = sorted(set(range(num_classes)) - set(order))
            if missing:
                raise ConfigError(f"stream.class_order misses classes {missing[:5]}; it must be a permutation of "
                                  f"0..{num_classes - 1}")
    init = getattr(stream, "init_classes", 0) or 0
    if num_classes is not None and init > num_classes:
        raise ConfigError(f"stream.init_classes={init} exceeds the {num_classes} classes of the stream")
