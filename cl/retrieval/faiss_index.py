"""FAISS retrieval backends ``flat``, ``hnsw`` and ``ivf`` (conventions and backend notes: :mod:`cl.retrieval`).

``faiss`` is imported when a :class:`FaissIndex` is built, never at import time.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cl.retrieval.base import (
    ArrayLike,
    IdsLike,
    IndexConfig,
    _as_ids,
    _check_k,
    _empty_result,
    _exact_search,
    _IndexBase,
)

__all__ = ["FaissIndex", "FAISS_BACKENDS"]

FAISS_BACKENDS = ("flat", "hnsw", "ivf")

log = logging.getLogger(__name__)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a declared dependency
        raise ImportError("the FAISS index backends need faiss: pip install faiss-cpu") from err
    return faiss


class FaissIndex(_IndexBase):
    """FAISS-backed index: ``flat`` (exact), ``hnsw`` or ``ivf`` (approximate); see the module docstring.

    Results are returned as CPU tensors moved to the queries' device.

    Args:
        dim: Key dimension.
        cfg: Config whose ``backend`` is ``"flat"``, ``"hnsw"`` or ``"ivf"``.
    """

    def __init__(self, dim: int, cfg: IndexConfig | None = None) -> None:
        super().__init__(dim, cfg if cfg is not None else IndexConfig(), FAISS_BACKENDS)
        self._faiss = _import_faiss()
        if self.cfg.faiss_threads is not None:
            self._faiss.omp_set_num_threads(self.cfg.faiss_threads)
        # Copy of the keys for HNSW (removal = rebuild) and IVF (pending buffer, retraining); empty for flat.
        self._keys = np.empty((0, dim), dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._index: Any = None if self.cfg.backend == "ivf" else self._new_index()

    # -- construction ---------------------------------------------------------------------------------------------

    @property
    def _metric_type(self) -> int:
        return self._faiss.METRIC_L2 if self.cfg.metric == "l2" else self._faiss.METRIC_INNER_PRODUCT

    def _new_index(self) -> Any:
        """An empty ``IndexIDMap`` around a flat or HNSW index."""
        faiss = self._faiss
        if self.cfg.backend == "flat":
            inner = faiss.IndexFlat(self._dim, self._metric_type)
        else:
            inner = faiss.IndexHNSWFlat(self._dim, self.cfg.hnsw_m, self._metric_type)
            inner.hnsw.efConstruction = self.cfg.hnsw_ef_construction
        index = faiss.IndexIDMap(inner)
        self._configure(index)
        return index

    def _configure(self, index: Any) -> None:
        """Apply the search-time settings of ``cfg`` (also after deserialisation)."""
        if self.cfg.backend == "hnsw":
            self._faiss.downcast_index(index.index).hnsw.efSearch = self.cfg.hnsw_ef_search
        elif self.cfg.backend == "ivf":
            index.nprobe = min(self.cfg.ivf_nprobe, index.nlist)

    def _train_ivf(self, x: np.ndarray) -> Any:
        """A trained, empty ``IndexIVFFlat`` (native int64 ids) with ``min(ivf_nlist, len(x))`` lists."""
        faiss = self._faiss
        nlist = min(self.cfg.ivf_nlist, x.shape[0])
        quantizer = faiss.IndexFlat(self._dim, self._metric_type)
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, self._metric_type)
        index.cp.seed = self.cfg.ivf_seed
        index.cp.min_points_per_centroid = 1  # small training sets are expected; no warning on stderr
        index.cp.spherical = self.cfg.metric == "cosine"
        index.train(x)
        self._configure(index)
        return index

    def rebuild(self) -> None:
        """Rebuild the structure from the stored keys (HNSW: new graph; IVF: retrain k-means on the current keys).

        A no-op for ``flat``, which keeps no copy of the keys.
        """
        if self.cfg.backend == "flat":
            return
        keys, ids = self._keys, self._ids
        self._keys, self._ids = np.empty((0, self._dim), dtype=np.float32), np.empty(0, dtype=np.int64)
        self._index = None if self.cfg.backend == "ivf" else self._new_index()
        self._add_prepared(keys, ids, force_train=self.cfg.backend == "ivf" and len(keys) > 0)

    # -- protocol -------------------------------------------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        """False only for an IVF index still searching its pending buffer."""
        return self._index is not None

    def __len__(self) -> int:
        return len(self._ids) if self.cfg.backend != "flat" else int(self._index.ntotal)

    def add(self, keys: ArrayLike, ids: IdsLike) -> None:
        """Add ``keys`` ``(N, D)`` with their ``ids`` ``(N,)`` (copied to CPU float32)."""
        x = self._prepare(keys, "keys")
        i = _as_ids(ids, x.shape[0])
        self._add_prepared(np.ascontiguousarray(x.cpu().numpy()), i.numpy())

    def _add_prepared(self, x: np.ndarray, ids: np.ndarray, force_train: bool = False) -> None:
        if x.shape[0] == 0:
            return
        if self.cfg.backend == "flat":
            self._index.add_with_ids(x, ids)
            return
        self._keys = np.concatenate([self._keys, x])
        self._ids = np.concatenate([self._ids, ids])
        if self._index is None:  # IVF, still pending
            if force_train or len(self._ids) >= self.cfg.ivf_min_train_keys:
                self._index = self._train_ivf(self._keys)
                self._index.add_with_ids(self._keys, self._ids)
            return
        self._index.add_with_ids(x, ids)

    def search(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ids and scores ``(Q, k)`` per query; id ``-1`` / score ``-inf`` where fewer than ``k`` keys."""
        _check_k(k)
        q = self._prepare(queries, "queries")
        if len(self) == 0 or q.shape[0] == 0:
            return _empty_result(q.shape[0], k, q.device)
        if self._index is None:  # IVF pending buffer: exact search
            ids, scores = _exact_search(
                torch.from_numpy(self._keys), torch.from_numpy(self._ids), q.cpu(), k, self.cfg.metric
            )
            return ids.to(q.device), scores.to(q.device)
        x = np.ascontiguousarray(q.cpu().numpy())
        dist, labels = self._search_complete(x, k)
        scores = torch.from_numpy(-dist if self.cfg.metric == "l2" else dist)
        ids = torch.from_numpy(labels)
        scores[ids < 0] = float("-inf")
        return ids.to(q.device), scores.to(q.device)

    def _search_complete(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search returning ``min(k, len(self))`` results per query (module docstring: how, per backend)."""
        faiss, backend = self._faiss, self.cfg.backend
        if backend == "flat":
            return self._index.search(x, k)
        want = min(k, len(self))
        if backend == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.cfg.hnsw_ef_search, k))
            dist, labels = self._index.search(x, k, params=params)
        else:
            nprobe, nlist = self._index.nprobe, self._index.nlist
            dist, labels = self._index.search(x, k)
            short = np.flatnonzero((labels >= 0).sum(1) < want)
            while short.size and nprobe < nlist:  # visit more lists, only for the queries that came back short
                nprobe = min(2 * nprobe, nlist)
                d, lab = self._index.search(x[short], k, params=faiss.SearchParametersIVF(nprobe=nprobe))
                dist[short], labels[short] = d, lab
                short = short[(lab >= 0).sum(1) < want]
        short = np.flatnonzero((labels >= 0).sum(1) < want)
        if short.size:  # HNSW: the reachable part of the graph is smaller than k; answer these queries exactly
            log.debug("%s index: %d queries answered exactly (fewer than %d results)", backend, short.size, want)
            ids_t, scores_t = _exact_search(torch.from_numpy(self._keys), torch.from_numpy(self._ids),
                                            torch.from_numpy(x[short]), k, self.cfg.metric)
            scores_np = scores_t.numpy()
            labels[short] = ids_t.numpy()
            dist[short] = -scores_np if self.cfg.metric == "l2" else scores_np
        return dist, labels

    def remove(self, ids: IdsLike) -> int:
        """Remove every key whose id is in ``ids``; returns the number removed (HNSW: rebuilds the graph)."""
        drop_ids = _as_ids(ids).numpy()
        if drop_ids.size == 0:
            return 0
        if self.cfg.backend == "flat":
            return int(self._index.remove_ids(drop_ids))
        drop = np.isin(self._ids, drop_ids)
        removed = int(drop.sum())
        if removed == 0:
            return 0
        self._keys, self._ids = self._keys[~drop], self._ids[~drop]
        if self.cfg.backend == "hnsw":  # FAISS's HNSW cannot remove: rebuild the graph from the kept keys
            self.rebuild()
        elif self._index is not None:
            self._index.remove_ids(drop_ids)
        return removed

    def state_dict(self) -> dict[str, Tensor]:
        """``keys``, ``ids`` and, for a built HNSW / trained IVF index, ``faiss_<backend>`` (serialised, uint8)."""
        if self.cfg.backend == "flat":
            n = int(self._index.ntotal)
            inner = self._faiss.downcast_index(self._index.index)
            keys = inner.reconstruct_n(0, n) if n else np.empty((0, self._dim), dtype=np.float32)
            ids = self._faiss.vector_to_array(self._index.id_map).astype(np.int64)
            return {"keys": torch.from_numpy(keys.copy()), "ids": torch.from_numpy(ids)}
        state = {"keys": torch.from_numpy(self._keys.copy()), "ids": torch.from_numpy(self._ids.copy())}
        if self._index is not None:
            blob = self._faiss.serialize_index(self._index)
            state[f"faiss_{self.cfg.backend}"] = torch.from_numpy(np.asarray(blob, dtype=np.uint8).copy())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the contents by ``state``: deserialise the FAISS blob of this backend if present, else rebuild.

        Keys are taken as stored (already normalised for cosine), so a round trip gives identical results.
        """
        keys_t, ids_t = self._check_state(state)
        keys = np.ascontiguousarray(keys_t.cpu().numpy())
        ids = np.ascontiguousarray(ids_t.cpu().numpy())
        self._keys = np.empty((0, self._dim), dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        blob = state.get(f"faiss_{self.cfg.backend}")
        if blob is None or self.cfg.backend == "flat":
            self._index = None if self.cfg.backend == "ivf" else self._new_index()
            self._add_prepared(keys, ids)
            return
        index = self._faiss.deserialize_index(np.ascontiguousarray(blob.cpu().numpy().astype(np.uint8)))
        if index.d != self._dim or index.metric_type != self._metric_type or index.ntotal != keys.shape[0]:
            raise ValueError(
                f"serialised {self.cfg.backend} index (d={index.d}, metric_type={index.metric_type}, "
                f"ntotal={index.ntotal}) does not match dim={self._dim}, metric={self.cfg.metric!r}, "
                f"{keys.shape[0]} keys"
            )
        self._configure(index)
        self._index, self._keys, self._ids = index, keys, ids
