"""Storage of the frozen-computation cache: values in RAM or in an unlinked memory-mapped spill file, and the
datasets that hand them to the loop (rules and memory costs: :mod:`cl.cache`)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cl.cache.prefix import Fingerprint

__all__ = ["CachedInputs"]


class _Store:
    """``(N, *shape)`` values in RAM or in an unlinked memory-mapped file; reads return float32."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, spill: Path | None) -> None:
        self.path: Path | None = None
        if spill is None:
            self.data = torch.empty((n, *shape), dtype=dtype)
        else:
            spill.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="clsim-cache-", suffix=".bin", dir=spill)
            os.close(fd)
            np_dtype = np.float32 if dtype == torch.float32 else np.int16
            mm = np.memmap(name, dtype=np_dtype, mode="w+", shape=(n, *shape))
            data = torch.from_numpy(mm)
            self.data = data if dtype == torch.float32 else data.view(dtype)
            try:  # the mapping stays valid; the disk space is freed when it is released, even after a crash
                Path(name).unlink()
            except OSError:  # Windows: removed in release()
                self.path = Path(name)
        self.on_disk = spill is not None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, start: int, values: Tensor) -> None:
        self.data[start : start + len(values)] = values.detach().to("cpu", self.data.dtype)

    def release(self) -> None:
        self.data = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class CachedInputs(Dataset):
    """``(cached value i (float32), label i)``: what a phase, a detection pass or an evaluation iterates instead of
    images. ``block`` is the block the values enter (``len(blocks)`` = pooled features; ``None`` for derived
    inputs)."""

    deterministic = True

    def __init__(self, store: _Store, labels: Tensor, block: int | None, entry: _Entry | None = None) -> None:
        self.store, self.labels, self.block, self.entry = store, labels, block, entry

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.store.data[i].float(), int(self.labels[i])


@dataclass
class _Entry:
    dataset: Any  # keeps the dataset alive, so its id() stays unique while the entry exists
    key: tuple
    store: _Store
    labels: Tensor
    guard_block: int
    fp: Fingerprint
    scope: Literal["task", "run"]
    hits: int = 0

    def view(self, block: int | None) -> CachedInputs:
        return CachedInputs(self.store, self.labels, block, self)


@dataclass
class _RowMemo:
    filled: Tensor  # (N,) bool
    values: Tensor | None = None  # (N, ...) once the first rows arrive
