"""A small generic registry: one instance per extension point (adapters, strategies, streams, metrics)."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cl.errors import ClsimError

__all__ = ["Registry", "RegistryError"]

T = TypeVar("T")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistryError(ClsimError, KeyError):
    """Unknown or duplicate registry key. ``str(err)`` is one line naming the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object mapping with strict keys.

    Keys are lowercase snake_case; a duplicate raises; an unknown key raises a one-line error listing close matches
    and all valid choices.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if not _KEY.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase snake_case")
        if name in self._items:
            raise RegistryError(f"duplicate {self.kind} name {name!r}")
        self._items[name] = obj

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}{hint}; valid choices: {', '.join(self.names())}")
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @contextlib.contextmanager
    def temporary(self, name: str, obj: T) -> Iterator[T]:
        """Register ``obj`` for the duration of a ``with`` block (tests)."""
        self.add(name, obj)
        try:
            yield obj
        finally:
            del self._items[name]
