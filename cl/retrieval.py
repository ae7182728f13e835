"""Adapter retrieval index: float32 keys (class / task prototypes, adapter descriptors) -> int64 ids.

Two implementations of one :class:`AdapterIndex` protocol:

- :class:`TorchIndex` (backend ``"torch"``): exact search by matmul + ``topk`` on the device of the keys. It is the
  reference every FAISS backend is tested against: ``l2`` scores are computed in float64, because the fp32 expansion
  ``|q|^2 + |x|^2 - 2 q.x`` cancels catastrophically at large norms (|x|^2 = 1.2e4: a distance of 0.0719 comes out
  0.0684 in fp32, ``tests/test_retrieval.py``); inner products stay in fp32 (no cancellation of that kind).
- :class:`FaissIndex` (backends ``"flat"``, ``"hnsw"``, ``"ivf"``): ``IndexFlatIP`` / ``IndexFlatL2``,
  ``IndexHNSWFlat`` and ``IndexIVFFlat``. ``faiss`` is imported lazily, so ``import cl.retrieval`` stays light.

Conventions shared by all backends:

- ``metric="cosine"`` L2-normalises keys and queries and then uses the inner product; ``"ip"`` is the raw inner
  product; ``"l2"`` reports the *negative* squared Euclidean distance, so that a higher score is always better.
- ``search(queries, k)`` returns ``(ids, scores)`` of shape ``(Q, k)`` holding exactly ``min(k, len(index))`` results
  per query, on every backend; only when fewer than ``k`` keys exist do the missing slots hold id ``-1`` and score
  ``-inf``. The approximate backends get there as follows: HNSW searches with ``efSearch = max(hnsw_ef_search, k)``
  (per call, the stored setting is not changed); IVF starts at ``ivf_nprobe`` lists and doubles ``nprobe`` (up to
  ``nlist``, which scans every list) for the queries whose probed lists held fewer than ``k`` keys; a query that
  HNSW still answers short (a graph whose reachable part is smaller than ``k``) is answered exactly from the stored
  copy of the keys. Approximation therefore changes *which* keys come back, never how many.
- Several keys may share one id (e.g. many class prototypes per task id); ``remove(ids)`` drops every key with one of
  the given ids.
- ``state_dict()`` holds tensors only: ``keys`` ``(N, D)`` float32 (normalised for cosine) and ``ids`` ``(N,)``
  int64, plus for trained HNSW / IVF indexes the serialised FAISS index as a uint8 tensor (``faiss_hnsw`` /
  ``faiss_ivf``) so that a reload gives bit-identical results without rebuilding. Any backend can load any state
  dict: without a matching FAISS blob the structure is rebuilt from the keys. ``save`` writes a safetensors file with
  a small JSON record (class, dim, config) in its metadata; no pickle is involved. Pickling goes through the same
  state dict (SWIG objects do not pickle, ``avalanche.md`` §12).

Backend notes:

- HNSW cannot remove vectors in FAISS: ``remove`` rebuilds the graph from a copy of the keys that the HNSW backend
  keeps (costs memory ``N * D * 4`` bytes and a full rebuild per call; batch removals).
- IVF needs training. Keys are kept in a pending buffer and searched exactly until at least
  ``ivf_min_train_keys`` keys have been added; then k-means (seeded by ``ivf_seed``) trains
  ``min(ivf_nlist, number of training keys)`` lists on all keys seen so far and later keys are assigned to those
  lists. The quantizer is not retrained when the collection grows; call :meth:`FaissIndex.rebuild` to retrain on the
  current keys (the IVF backend keeps a copy of them for this).
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cl.registries import INDEXES

__all__ = ["IndexConfig", "AdapterIndex", "TorchIndex", "FaissIndex", "build_index", "load_index"]

ArrayLike = Tensor | np.ndarray
IdsLike = Tensor | np.ndarray | Sequence[int]

_METRICS = ("ip", "l2", "cosine")
_FAISS_BACKENDS = ("flat", "hnsw", "ivf")
_META_KEY = "clsim_index"
_FORMAT_VERSION = 1
_CHUNK_ELEMS = 1 << 24  # score-matrix elements per exact-search chunk (64 MiB of float32)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """Settings of a retrieval index.

    Attributes:
        backend: Registered backend name (``INDEXES``): ``"torch"`` (exact reference), ``"flat"``, ``"hnsw"``,
            ``"ivf"``.
        metric: ``"ip"`` (inner product), ``"l2"`` (scores are negative squared distances) or ``"cosine"``
            (L2-normalised keys and queries, then inner product).
        hnsw_m: HNSW graph degree ``M``.
        hnsw_ef_search: HNSW candidate-list size at search time (raised to ``k`` per call when ``k`` is larger).
        hnsw_ef_construction: HNSW candidate-list size while building the graph.
        ivf_nlist: Number of IVF lists, clipped to the number of training keys.
        ivf_nprobe: Lists visited per IVF query, clipped to the number of lists; raised per query (doubling) for
            queries whose probed lists hold fewer than ``k`` keys.
        ivf_min_train_keys: The IVF index searches a pending buffer exactly until this many keys were added, then
            trains on all of them.
        ivf_seed: Seed of the IVF k-means clustering (``index.cp.seed``).
        faiss_threads: If set, ``faiss.omp_set_num_threads(faiss_threads)`` is called when a FAISS index is built.
            This is process-wide; ``None`` leaves FAISS's OpenMP setting alone.
    """

    backend: Literal["torch", "flat", "hnsw", "ivf"] = "flat"
    metric: Literal["ip", "l2", "cosine"] = "ip"
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    hnsw_ef_construction: int = 80
    ivf_nlist: int = 100
    ivf_nprobe: int = 8
    ivf_min_train_keys: int = 1000
    ivf_seed: int = 1234
    faiss_threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in INDEXES:
            raise ValueError(
                f"IndexConfig.backend={self.backend!r} is unknown; valid choices: {', '.join(INDEXES.names())}"
            )
        if self.metric not in _METRICS:
            raise ValueError(f"IndexConfig.metric={self.metric!r} is unknown; valid choices: {', '.join(_METRICS)}")
        for name in (
            "hnsw_m",
            "hnsw_ef_search",
            "hnsw_ef_construction",
            "ivf_nlist",
            "ivf_nprobe",
            "ivf_min_train_keys",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.ivf_seed, bool) or not isinstance(self.ivf_seed, int):
            raise ValueError(f"IndexConfig.ivf_seed must be an integer, got {self.ivf_seed!r}")
        threads = self.faiss_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"IndexConfig.faiss_threads must be None or an integer >= 1, got {threads!r}")


@runtime_checkable
class AdapterIndex(Protocol):
    """Keys ``(N, D)`` -> int64 ids; higher score = better match (see the module docstring)."""

    cfg: IndexConfig

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def add(self, keys: ArrayLike, ids: IdsLike) -> None: ...

    def search(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor]: ...

    def remove(self, ids: IdsLike) -> int: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def save(self, path: str | os.PathLike[str]) -> None: ...

    def load(self, path: str | os.PathLike[str]) -> None: ...


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _as_matrix(x: ArrayLike, dim: int, what: str) -> Tensor:
    """``x`` as a float32 ``(N, dim)`` tensor (device kept); raises ``ValueError`` on a wrong shape or non-finite."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())  # from_numpy warns on read-only arrays
    t = x
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{what} must have shape (N, {dim}), got {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise ValueError(f"{what} have dimension {t.shape[1]}, but the index has dim={dim}")
    t = t.detach().to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    return t


def _as_ids(ids: IdsLike, n: int | None = None) -> Tensor:
    """``ids`` as a 1-D int64 CPU tensor (of length ``n`` when given)."""
    if isinstance(ids, Tensor):
        t = ids.detach().cpu()
    else:
        arr = np.asarray(ids)
        t = torch.from_numpy(arr.reshape(-1).copy()) if arr.size else torch.empty(0, dtype=torch.int64)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if n is not None and t.numel() != n:
        raise ValueError(f"got {n} keys but {t.numel()} ids")
    if bool((t < 0).any()):
        raise ValueError("ids must be non-negative (-1 marks a missing result)")
    return t


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _empty_result(num_queries: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    ids = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    scores = torch.full((num_queries, k), float("-inf"), dtype=torch.float32, device=device)
    return ids, scores


def _exact_search(keys: Tensor, ids: Tensor, queries: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` on ``keys.device`` in chunks of queries. Scores: inner product or ``-||q - x||^2``.

    ``l2`` is computed in float64 (``-(|q|^2 + |x|^2 - 2 q.x)`` loses every significant digit of a small distance
    between large vectors in fp32); the scores are returned as float32.
    """
    out_ids, out_scores = _empty_result(queries.shape[0], k, keys.device)
    n = keys.shape[0]
    if n == 0 or queries.shape[0] == 0:
        return out_ids, out_scores
    kk = min(k, n)
    queries = queries.to(keys.device)
    keys_l2 = keys.double() if metric == "l2" else None
    key_sq = keys_l2.pow(2).sum(1) if keys_l2 is not None else None
    chunk = max(1, _CHUNK_ELEMS // n)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        if keys_l2 is not None and key_sq is not None:  # -(|q|^2 + |x|^2 - 2 q.x) in float64, clamped like FAISS
            q64 = q.double()
            scores = (2 * (q64 @ keys_l2.T) - q64.pow(2).sum(1, keepdim=True) - key_sq).clamp_max_(0)
        else:
            scores = q @ keys.T  # (q, N)
        top, pos = scores.topk(kk, dim=1)
        out_scores[start : start + chunk, :kk] = top.float()
        out_ids[start : start + chunk, :kk] = ids[pos]
    return out_ids, out_scores


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a declared dependency
        raise ImportError("the FAISS index backends need faiss: pip install faiss-cpu") from err
    return faiss


def _read_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta_text = (f.metadata() or {}).get(_META_KEY)
        if meta_text is None:
            raise ValueError(f"{path} is not a clsim index file (no {_META_KEY!r} metadata)")
        state = {name: f.get_tensor(name) for name in f.keys()}
    return state, json.loads(meta_text)


# ----------------------------------------------------------------------------------------------------------------------
# shared base


class _IndexBase(abc.ABC):
    """Input checks, metric handling, file I/O and pickling shared by the backends."""

    cfg: IndexConfig

    def __init__(self, dim: int, cfg: IndexConfig, allowed: tuple[str, ...]) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if cfg.backend not in allowed:
            raise ValueError(f"{type(self).__name__} got backend={cfg.backend!r}; valid choices: {', '.join(allowed)}")
        self._dim = dim
        self.cfg = cfg

    @property
    def dim(self) -> int:
        """Key dimension ``D``."""
        return self._dim

    def _prepare(self, x: ArrayLike, what: str) -> Tensor:
        t = _as_matrix(x, self._dim, what)
        return F.normalize(t, dim=1) if self.cfg.metric == "cosine" else t

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ...

    def _check_state(self, state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        missing = [name for name in ("keys", "ids") if name not in state]
        if missing:
            raise ValueError(f"index state dict lacks {', '.join(missing)}; present: {', '.join(sorted(state))}")
        keys, ids = state["keys"], state["ids"]
        if keys.ndim != 2 or keys.shape[1] != self._dim:
            raise ValueError(f"state keys have shape {tuple(keys.shape)}, but the index has dim={self._dim}")
        if ids.shape != (keys.shape[0],):
            raise ValueError(f"state ids have shape {tuple(ids.shape)}, expected ({keys.shape[0]},)")
        return keys.to(torch.float32), ids.to(torch.int64)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to a safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        meta = {
            "format_version": _FORMAT_VERSION,
            "class": type(self).__name__,
            "dim": self._dim,
            "config": asdict(self.cfg),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, os.fspath(tmp), metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the contents of this index by those of a file written by :meth:`save`.

        Raises:
            ValueError: If the file's dim or metric differ from this index's.
        """
        state, meta = _read_file(path)
        if meta["dim"] != self._dim:
            raise ValueError(f"{path} holds an index with dim={meta['dim']}, but this index has dim={self._dim}")
        metric = meta["config"]["metric"]
        if metric != self.cfg.metric:
            raise ValueError(f"{path} holds an index with metric={metric!r}, but this index has {self.cfg.metric!r}")
        self.load_state_dict(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"dim": self._dim, "cfg": asdict(self.cfg), "state": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        cls: Any = type(self)  # the subclass constructor (TorchIndex / FaissIndex), not _IndexBase's
        cls.__init__(self, state["dim"], IndexConfig(**state["cfg"]))
        self.load_state_dict(state["state"])

    def __repr__(self) -> str:
        cfg, size = self.cfg, len(self)
        return f"{type(self).__name__}(dim={self._dim}, backend={cfg.backend!r}, metric={cfg.metric!r}, ntotal={size})"


# ----------------------------------------------------------------------------------------------------------------------
# exact torch reference


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


# ----------------------------------------------------------------------------------------------------------------------
# FAISS backends


class FaissIndex(_IndexBase):
    """FAISS-backed index: ``flat`` (exact), ``hnsw`` or ``ivf`` (approximate); see the module docstring.

    Results are returned as CPU tensors moved to the queries' device.

    Args:
        dim: Key dimension.
        cfg: Config whose ``backend`` is ``"flat"``, ``"hnsw"`` or ``"ivf"``.
    """

    def __init__(self, dim: int, cfg: IndexConfig | None = None) -> None:
        super().__init__(dim, cfg if cfg is not None else IndexConfig(), _FAISS_BACKENDS)
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


# ----------------------------------------------------------------------------------------------------------------------
# factory and registration


def build_index(cfg: IndexConfig, dim: int) -> AdapterIndex:
    """An empty index of backend ``cfg.backend`` for keys of dimension ``dim``."""
    return INDEXES.get(cfg.backend)(dim, cfg)


def load_index(path: str | os.PathLike[str]) -> AdapterIndex:
    """Build the index recorded in a file written by ``save`` (backend and config from its metadata)."""
    state, meta = _read_file(path)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported index format_version {meta.get('format_version')!r}")
    index = build_index(IndexConfig(**meta["config"]), int(meta["dim"]))
    index.load_state_dict(state)
    return index


INDEXES.add("torch", TorchIndex)
for _name in _FAISS_BACKENDS:
    INDEXES.add(_name, FaissIndex)
del _name
