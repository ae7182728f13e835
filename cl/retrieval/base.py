"""Shared pieces of the retrieval indexes: :class:`IndexConfig`, the :class:`AdapterIndex` protocol, input checks,
exact chunked search, and the base class holding file I/O and pickling (conventions: :mod:`cl.retrieval`)."""

from __future__ import annotations

import abc
import json
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

__all__ = ["IndexConfig", "AdapterIndex", "ArrayLike", "IdsLike"]

ArrayLike = Tensor | np.ndarray
IdsLike = Tensor | np.ndarray | Sequence[int]

_METRICS = ("ip", "l2", "cosine")
_META_KEY = "clsim_index"
_FORMAT_VERSION = 1
_CHUNK_ELEMS = 1 << 24  # score-matrix elements per exact-search chunk (64 MiB of float32)


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
