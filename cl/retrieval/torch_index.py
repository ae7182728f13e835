"""Exact retrieval in pure torch (matmul + ``topk``): the reference the FAISS backends are tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from cl.retrieval.base import ArrayLike, IdsLike, IndexConfig, _as_ids, _check_k, _exact_search, _IndexBase

__all__ = ["TorchIndex"]


class TorchIndex(_IndexBase):
    """Exact search in pure torch (matmul + ``topk``), the reference for the FAISS backends.

    Keys live on ``device`` if given, else on the device of the first keys added; queries are moved there and the
    results are returned on the queries' device.

    Args:
        dim: Key dimension.
        cfg: Config with ``backend="torch"``; only ``metric`` is used.
        device: Where to keep the keys.
    """

    def __init__(self, dim: int, cfg: IndexConfig | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(dim, cfg if cfg is not None else IndexConfig(backend="torch"), ("torch",))
        self._device = torch.device(device) if device is not None else None
        self._keys = torch.empty(0, dim, dtype=torch.float32, device=self._device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self._device)

    def __len__(self) -> int:
        return self._keys.shape[0]

    def add(self, keys: ArrayLike, ids: IdsLike) -> None:
        """Add ``keys`` ``(N, D)`` with their ``ids`` ``(N,)``."""
        x = self._prepare(keys, "keys")
        i = _as_ids(ids, x.shape[0])
        if self._device is None and len(self) == 0:
            self._keys, self._ids = self._keys.to(x.device), self._ids.to(x.device)
        self._keys = torch.cat([self._keys, x.to(self._keys.device)])
        self._ids = torch.cat([self._ids, i.to(self._ids.device)])

    def search(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ids and scores ``(Q, k)`` per query; id ``-1`` / score ``-inf`` where fewer than ``k`` keys."""
        _check_k(k)
        q = self._prepare(queries, "queries")
        ids, scores = _exact_search(self._keys, self._ids, q, k, self.cfg.metric)
        return ids.to(q.device), scores.to(q.device)

    def remove(self, ids: IdsLike) -> int:
        """Remove every key whose id is in ``ids``; returns the number of keys removed."""
        drop = torch.isin(self._ids, _as_ids(ids).to(self._ids.device))
        self._keys, self._ids = self._keys[~drop], self._ids[~drop]
        return int(drop.sum())

    def state_dict(self) -> dict[str, Tensor]:
        """``{"keys": (N, D) float32, "ids": (N,) int64}``."""
        return {"keys": self._keys, "ids": self._ids}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the contents by ``state`` (any backend's state dict; extra FAISS entries are ignored)."""
        keys, ids = self._check_state(state)
        device = self._device if self._device is not None else keys.device
        self._keys, self._ids = keys.to(device).clone(), ids.to(device).clone()
