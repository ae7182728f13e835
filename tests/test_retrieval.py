"""Retrieval index: FAISS backends against the exact torch reference, removal, padding, persistence, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from cl.registries import INDEXES
from cl.retrieval import AdapterIndex, FaissIndex, IndexConfig, TorchIndex, build_index, load_index

BACKENDS = ("torch", "flat", "hnsw", "ivf")
METRICS = ("ip", "l2", "cosine")


def _random(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) / dim**0.5


def _clustered(n: int, dim: int, num_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Gaussian clusters around random centres (prototype-like keys); overlapping when ``spread`` is near 1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim))
    labels = rng.integers(0, num_clusters, n)
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def _small_cfg(backend: str, metric: str = "ip") -> IndexConfig:
    # few keys in the small tests: let IVF train right away so that the trained path is exercised
    return IndexConfig(backend=backend, metric=metric, ivf_nlist=8, ivf_nprobe=8, ivf_min_train_keys=16)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """3000 keys and 500 fresh queries from the same 60 overlapping gaussian clusters (64-d)."""
    points = _clustered(3500, 64, num_clusters=60, spread=0.7, seed=0)
    return points[:3000], points[3000:]


def test_registry_and_protocol():
    assert set(BACKENDS) <= set(INDEXES.names())
    for backend in BACKENDS:
        index = build_index(IndexConfig(backend=backend), 8)
        assert isinstance(index, AdapterIndex)
        assert index.dim == 8 and len(index) == 0
    with pytest.raises(ValueError, match="valid choices: .*flat.*hnsw"):
        IndexConfig(backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric.*valid choices: ip, l2, cosine"):
        IndexConfig(metric="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hnsw_m"):
        IndexConfig(hnsw_m=0)
    with pytest.raises(ValueError, match="valid choices: flat, hnsw, ivf"):
        FaissIndex(8, IndexConfig(backend="torch"))


def test_import_is_lazy():
    code = "import sys, cl.retrieval; assert 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("metric", METRICS)
def test_flat_matches_torch_exactly(metric):
    keys, queries = _random(500, 32, seed=0), _random(50, 32, seed=1)
    ids = torch.arange(500) * 3 + 7
    ref, flat = TorchIndex(32, IndexConfig(backend="torch", metric=metric)), FaissIndex(32, IndexConfig(metric=metric))
    for index in (ref, flat):
        index.add(keys[:300], ids[:300])
        index.add(keys[300:].numpy(), ids[300:].tolist())  # tensors, arrays and lists all accepted
    ref_ids, ref_scores = ref.search(queries, 10)
    got_ids, got_scores = flat.search(queries, 10)
    assert got_ids.dtype == torch.int64 and got_scores.dtype == torch.float32
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_scores, ref_scores, rtol=1e-5, atol=1e-5)
    # scores mean what the metric says (higher = better)
    top_keys = keys[(ref_ids[:, 0] - 7) // 3]
    q = queries
    if metric == "cosine":
        q, top_keys = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(top_keys, dim=1)
    expected = -(q - top_keys).pow(2).sum(1) if metric == "l2" else (q * top_keys).sum(1)
    torch.testing.assert_close(ref_scores[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert bool((ref_scores[:, :-1] >= ref_scores[:, 1:]).all())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ("hnsw", "ivf"))
def test_approximate_recall(backend, metric, clustered):
    keys, queries = clustered
    ids = np.arange(len(keys), dtype=np.int64)
    ref = TorchIndex(64, IndexConfig(backend="torch", metric=metric))
    index = build_index(IndexConfig(backend=backend, metric=metric), 64)  # default settings
    ref.add(keys, ids)
    index.add(keys, ids)
    assert getattr(index, "is_trained", True)
    exact, _ = ref.search(queries, 1)
    got, _ = index.search(queries, 1)
    recall = (got[:, 0] == exact[:, 0]).float().mean().item()
    assert recall >= 0.9, f"{backend}/{metric} recall@1 {recall:.3f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove(backend):
    keys = _random(200, 16, seed=2)
    ids = torch.arange(200) % 50  # four keys per id
    index = build_index(_small_cfg(backend), 16)
    index.add(keys, ids)
    removed = index.remove([3, 10, 49, 1000])
    assert removed == 12 and len(index) == 188
    found, _ = index.search(keys, 200)
    assert not bool(torch.isin(found, torch.tensor([3, 10, 49])).any())
    assert set(found[found >= 0].tolist()) == set(range(50)) - {3, 10, 49}
    assert index.remove(np.array([], dtype=np.int64)) == 0
    new_key = 10 * _random(1, 16, seed=12)
    index.add(new_key, [3])  # an id can come back after removal
    assert index.search(new_key, 1)[0].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_padding_when_k_exceeds_ntotal(backend, metric):
    index = build_index(_small_cfg(backend, metric), 8)
    index.add(_random(5, 8, seed=3), [10, 11, 12, 13, 14])
    ids, scores = index.search(_random(4, 8, seed=4), 7)
    assert ids.shape == scores.shape == (4, 7)
    assert bool((ids[:, 5:] == -1).all()) and bool(torch.isneginf(scores[:, 5:]).all())
    assert bool((ids[:, :5] >= 10).all()) and bool(torch.isfinite(scores[:, :5]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index(backend):
    index = build_index(_small_cfg(backend), 8)
    ids, scores = index.search(torch.zeros(3, 8), 2)
    assert bool((ids == -1).all()) and bool(torch.isneginf(scores).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dim(backend):
    index = build_index(_small_cfg(backend), 8)
    with pytest.raises(ValueError, match="dimension 9.*dim=8"):
        index.add(torch.zeros(2, 9), [0, 1])
    index.add(torch.ones(2, 8), [0, 1])
    with pytest.raises(ValueError, match="dimension 7.*dim=8"):
        index.search(np.zeros((1, 7), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="2 keys but 3 ids"):
        index.add(torch.ones(2, 8), [0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_save_load_round_trip(backend, metric, tmp_path):
    keys, queries = _random(300, 16, seed=5), _random(40, 16, seed=6)
    index = build_index(_small_cfg(backend, metric), 16)
    index.add(keys, torch.arange(300))
    index.remove([0, 1])
    expected = index.search(queries, 5)

    path = tmp_path / "index.safetensors"
    index.save(path)
    for loaded in (load_index(path), build_index(_small_cfg(backend, metric), 16)):
        if len(loaded) == 0:
            loaded.load(path)
        assert type(loaded) is type(index) and len(loaded) == 298
        got = loaded.search(queries, 5)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="dim=16"):
        build_index(_small_cfg(backend, metric), 17).load(path)


def test_state_dict_is_portable_across_backends():
    keys, queries = _random(100, 16, seed=7), _random(10, 16, seed=8)
    source = build_index(_small_cfg("hnsw", "cosine"), 16)
    source.add(keys, torch.arange(100))
    state = source.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    target = TorchIndex(16, IndexConfig(backend="torch", metric="cosine"))
    target.load_state_dict(state)
    flat = FaissIndex(16, IndexConfig(backend="flat", metric="cosine"))
    flat.load_state_dict(state)
    assert torch.equal(target.search(queries, 3)[0], flat.search(queries, 3)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_round_trip(backend):
    keys, queries = _random(100, 16, seed=9), _random(10, 16, seed=10)
    index = build_index(_small_cfg(backend, "l2"), 16)
    index.add(keys, torch.arange(100) + 5)
    clone = pickle.loads(pickle.dumps(index))
    assert clone.cfg == index.cfg and len(clone) == 100
    for a, b in zip(index.search(queries, 4), clone.search(queries, 4), strict=True):
        assert torch.equal(a, b)
    clone.add(keys[:1], [999])  # the clone is a working, independent index
    assert len(clone) == 101 and len(index) == 100


def test_ivf_pending_buffer_then_training():
    cfg = IndexConfig(backend="ivf", metric="l2", ivf_nlist=500, ivf_min_train_keys=64)
    index = FaissIndex(8, cfg)
    keys = _random(100, 8, seed=11)
    ref = TorchIndex(8, IndexConfig(backend="torch", metric="l2"))
    ref.add(keys, torch.arange(100))
    index.add(keys[:40], torch.arange(40))
    assert not index.is_trained and len(index) == 40
    ids, _ = index.search(keys[:40], 1)  # exact search over the pending buffer
    assert torch.equal(ids[:, 0], torch.arange(40))
    index.add(keys[40:], torch.arange(40, 100))
    assert index.is_trained and index._index.nlist == 100  # nlist clipped to the 100 training keys
    ids, _ = index.search(keys, 1)
    assert torch.equal(ids[:, 0], torch.arange(100))


def test_torch_index_device(device):
    index = TorchIndex(8, device=device)
    index.add(torch.eye(8), torch.arange(8))
    ids, scores = index.search(torch.eye(8)[:3], 1)
    assert ids.device == torch.device("cpu") and ids[:, 0].tolist() == [0, 1, 2]
    torch.testing.assert_close(scores[:, 0], torch.ones(3))


# --- k results whenever the index holds >= k keys (issue 11) ----------------------------------------------------------
def _issue_cfg(backend: str, metric: str) -> IndexConfig:
    """The issue's settings: default HNSW (efSearch 64 < k), IVF trained on 100 keys with nlist 20 and nprobe 2."""
    return IndexConfig(backend=backend, metric=metric, ivf_nlist=20, ivf_nprobe=2, ivf_min_train_keys=100)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_results_whenever_at_least_k_keys(backend, metric):
    """200 clustered 768-d keys, k up to 200: before the fix HNSW returned ~170-188 ids per query and IVF ~20."""
    keys = _clustered(200, 768, num_clusters=10, spread=0.7, seed=0)
    queries = _clustered(40, 768, num_clusters=10, spread=0.7, seed=1)
    index = build_index(_issue_cfg(backend, metric), 768)
    index.add(keys[:100], np.arange(100))
    index.add(keys[100:], np.arange(100, 200))
    assert getattr(index, "is_trained", True)
    ref = TorchIndex(768, IndexConfig(backend="torch", metric=metric))
    ref.add(keys, np.arange(200))
    for k in (1, 64, 150, 200):
        ids, scores = index.search(queries, k)
        assert bool((ids >= 0).all()) and bool(torch.isfinite(scores).all()), f"{backend} k={k}: missing results"
        assert all(len(set(row)) == k for row in ids.tolist()), "duplicate ids"
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    ids, scores = index.search(queries, 200)  # k = every key: the full ranking, same scores as the exact reference
    assert all(sorted(row) == list(range(200)) for row in ids.tolist())
    ref_ids, ref_scores = ref.search(queries, 200)
    got = torch.gather(scores, 1, ids.argsort(1))  # scores by id
    want = torch.gather(ref_scores, 1, ref_ids.argsort(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))  # fp32 vs exact
    ids, scores = index.search(queries[:3], 230)  # more than the index holds: 200 results, then padding
    assert bool((ids[:, :200] >= 0).all()) and bool((ids[:, 200:] == -1).all())
    assert bool(torch.isneginf(scores[:, 200:]).all())


def test_hnsw_short_graph_answer_falls_back_to_exact_search():
    """If HNSW still answers short (unreachable graph part), those queries are answered exactly from the key copy."""
    keys = _clustered(120, 32, num_clusters=6, spread=0.5, seed=3)
    index = FaissIndex(32, IndexConfig(backend="hnsw", metric="l2"))
    index.add(keys, np.arange(120))
    real = index._index

    class Truncating:  # drops the last 30 results of every other query, as a partly unreachable graph would
        def search(self, x, k, params=None):
            dist, labels = real.search(x, k, params=params)
            labels[::2, -30:] = -1
            dist[::2, -30:] = np.finfo(np.float32).max
            return dist, labels

    index._index = Truncating()
    ids, scores = index.search(keys[:10], 100)
    ref = TorchIndex(32, IndexConfig(backend="torch", metric="l2"))
    ref.add(keys, np.arange(120))
    ref_ids, ref_scores = ref.search(keys[:10], 100)
    assert bool((ids >= 0).all())
    assert torch.equal(ids[::2], ref_ids[::2])  # the exact answers replaced the short ones
    torch.testing.assert_close(scores[::2], ref_scores[::2])


def test_torch_index_l2_is_exact_at_large_norms():
    """The issue's example: |x|^2 ~ 1.2e4 and a true squared distance of 0.0719 (fp32 expansion gave 0.0684)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 768, generator=gen, dtype=torch.float64)
    x = x * (1.2e4 / x.pow(2).sum()).sqrt()
    delta = torch.randn(1, 768, generator=gen, dtype=torch.float64)
    delta = delta * (0.0719 / delta.pow(2).sum()).sqrt()
    key, query = x.float(), (x + delta).float()
    true = float((query.double() - key.double()).pow(2).sum())  # the distance between the stored fp32 vectors
    assert true == pytest.approx(0.0719, rel=1e-3)
    naive = float(query.pow(2).sum() + key.pow(2).sum() - 2 * (query @ key.T).squeeze())
    assert naive != pytest.approx(true, rel=1e-3)  # the fp32 expansion is off (why the reference must not use it)
    index = TorchIndex(768, IndexConfig(backend="torch", metric="l2"))
    index.add(torch.cat([key, key + 1.0]), [7, 8])
    ids, scores = index.search(query, 2)
    assert ids[0].tolist() == [7, 8]
    assert -float(scores[0, 0]) == pytest.approx(true, rel=1e-6)
    ivf = FaissIndex(768, IndexConfig(backend="ivf", metric="l2"))  # the pending buffer uses the same exact search
    ivf.add(torch.cat([key, key + 1.0]), [7, 8])
    assert -float(ivf.search(query, 1)[1][0, 0]) == pytest.approx(true, rel=1e-6)
