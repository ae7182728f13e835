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
    """Classes per task by LAMDA-PILOT's rule (``utils/data_manager.py``, ``DataManager.__init__``).

    The first task has ``init_classes`` (0 means ``increment``); then tasks of ``increment`` follow while a full
    one fits; the classes left over form one smaller last task (never dropped, never merged into a bigger one):
    5 classes, B4 Inc2 -> ``[4, 1]``; 7 classes, Inc2 -> ``[2, 2, 2, 1]``. Counts that divide evenly give equal tasks.

    Raises:
        ValueError: ``increment`` is not positive or ``init_classes`` exceeds ``num_classes``.
    """
    if increment <= 0:
        raise ValueError(f"increment must be positive, got {increment}")
    first = init_classes if init_classes > 0 else increment
    if first > num_classes:
        raise ValueError(f"init_classes={first} exceeds the {num_classes} classes of the dataset")
    sizes = [first]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes - sum(sizes) > 0:
        sizes.append(num_classes - sum(sizes))
    return sizes


def split_classes(order: Sequence[int], init_classes: int, increment: int) -> list[list[int]]:
    """Partition ``order`` into consecutive tasks (see :func:`task_sizes`)."""
    sizes = task_sizes(len(order), init_classes, increment)
    out, start = [], 0
    for s in sizes:
        out.append([int(c) for c in order[start : start + s]])
        start += s
    return out
