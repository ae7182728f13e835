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

Layout: ``base.py`` (:class:`IndexConfig`, the protocol, input checks, exact search, file I/O and pickling shared by
the backends), ``torch_index.py``, ``faiss_index.py``; this module builds, loads and registers them.
"""

from __future__ import annotations

import os

from cl.registries import INDEXES
from cl.retrieval.base import _FORMAT_VERSION, AdapterIndex, IndexConfig, _read_file
from cl.retrieval.faiss_index import FAISS_BACKENDS, FaissIndex
from cl.retrieval.torch_index import TorchIndex

__all__ = ["IndexConfig", "AdapterIndex", "TorchIndex", "FaissIndex", "build_index", "load_index"]


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
for _name in FAISS_BACKENDS:
    INDEXES.add(_name, FaissIndex)
del _name
