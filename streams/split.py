"""Pure class-incremental splitting on label arrays (no images involved)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["class_order", "task_sizes", "split_classes"]


def class_order(num_classes: int, order_seed: int | None = 1993, explicit: Sequence[int] | None = None) -> list[int]:
    """The order in which classes arrive.

    Args:
        num_classes: number of classes C (ids ``0..C-1``).
        order_seed: seed of the permutation; ``None`` keeps the natural order. The default 1993 reproduces the
            PILOT-family order (``np.random.seed(1993); np.random.permutation(C)``).
        explicit: a given order (a permutation of ``0..C-1``); overrides ``order_seed``.
    """
    if explicit is not None:
        order = [int(c) for c in explicit]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {order}")
        return order
    if order_seed is None:
        return list(range(num_classes))
    # RandomState (not default_rng) because it reproduces np.random.seed(s); np.random.permutation(C).
    return [int(c) for c in np.random.RandomState(order_seed).permutation(num_classes)]


def task_sizes(num_classes: int, init_classes: int, increment: int) -> list[int]:
    """Classes per task: ``init_classes`` first (0 means ``increment``), then ``increment`` each.

    A remainder smaller than ``increment`` is added to the last task (never dropped).
    """
    if increment <= 0:
        raise ValueError(f"increment must be positive, got {increment}")
    first = init_classes if init_classes > 0 else increment
    if first > num_classes:
        raise ValueError(f"init_classes={first} exceeds the {num_classes} classes of the dataset")
    sizes = [first]
    left = num_classes - first
    while left >= increment:
        sizes.append(increment)
        left -= increment
    if left:
        sizes[-1] += left
    return sizes


def split_classes(order: Sequence[int], init_classes: int, increment: int) -> list[list[int]]:
    """Partition ``order`` into consecutive tasks (see :func:`task_sizes`)."""
    sizes = task_sizes(len(order), init_classes, increment)
    out, start = [], 0
    for s in sizes:
        out.append([int(c) for c in order[start : start + s]])
        start += s
    return out
