"""Retrieval-index benchmark: add latency, single-query latency, batched throughput and recall@1 per backend.

Every backend is measured in the same run against the exact torch path (``TorchIndex``); ratios are speedups over it.
Data are realistic prototype-like keys: gaussian clusters around random centres; queries are noisy copies of keys.

    python benchmarks/bench_retrieval.py                       # default: sizes 1e3 1e4 1e5, dims 384 768
    python benchmarks/bench_retrieval.py --sizes 10000 --dims 768 --metric l2 --hnsw-ef-construction 200
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from cl.retrieval import AdapterIndex, IndexConfig, build_index

BACKENDS = ("torch", "flat", "hnsw", "ivf")


def make_data(
    num_keys: int, dim: int, num_queries: int, rng: np.random.Generator, spread: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered gaussian keys ``(num_keys, dim)`` and queries = keys plus gaussian noise ``(num_queries, dim)``."""
    num_clusters = max(8, int(round(num_keys**0.5)))
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    labels = rng.integers(0, num_clusters, num_keys)
    keys = centres[labels] + spread * rng.standard_normal((num_keys, dim), dtype=np.float32)
    source = rng.integers(0, num_keys, num_queries)
    queries = keys[source] + noise * spread * rng.standard_normal((num_queries, dim), dtype=np.float32)
    return keys, queries


def set_threads(num_threads: int) -> None:
    """Intra-op threads of torch and of FAISS's OpenMP (process-wide; this is a script, not library code)."""
    import faiss

    torch.set_num_threads(num_threads)
    faiss.omp_set_num_threads(num_threads)


def measure(
    index: AdapterIndex,
    keys: np.ndarray,
    queries: np.ndarray,
    k: int,
    latency_queries: int,
    latency_budget: float,
    single_threads: int,
    batch_threads: int,
) -> dict[str, object]:
    """Add all keys, then time single-query calls (capped by count and seconds) and one batched call.

    Adding and the batched call use ``batch_threads``; single-query calls use ``single_threads`` (with OpenMP on a
    busy machine, one query on two threads can wait a whole scheduler tick for the second thread).
    """
    ids = np.arange(len(keys), dtype=np.int64)
    keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
    start = time.perf_counter()
    index.add(keys_t, ids)
    add_s = time.perf_counter() - start

    set_threads(single_threads)
    index.search(queries_t[:1], k)  # warm-up
    latencies = []
    deadline = time.perf_counter() + latency_budget
    for i in range(min(latency_queries, len(queries))):
        start = time.perf_counter()
        index.search(queries_t[i : i + 1], k)
        latencies.append(time.perf_counter() - start)
        if len(latencies) >= 20 and time.perf_counter() > deadline:
            break
    set_threads(batch_threads)
    start = time.perf_counter()
    found, _ = index.search(queries_t, k)
    batch_s = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {
        "add_s": add_s,
        "add_us/key": add_s / len(keys) * 1e6,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "n_single": len(latencies),
        "batch_qps": len(queries) / batch_s,
        "top1": found[:, 0],
    }


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain-text table, columns right-aligned."""
    columns = [
        ("size", "{:d}"),
        ("dim", "{:d}"),
        ("backend", "{}"),
        ("add_s", "{:.3f}"),
        ("add_us/key", "{:.2f}"),
        ("p50_ms", "{:.3f}"),
        ("p99_ms", "{:.3f}"),
        ("n_single", "{:d}"),
        ("batch_qps", "{:.0f}"),
        ("recall@1", "{:.3f}"),
        ("x_p50", "{:.1f}"),
        ("x_batch", "{:.1f}"),
    ]
    cells = [[name for name, _ in columns]]
    cells += [[fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--metric", default="cosine", choices=["ip", "l2", "cosine"])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument(
        "--hnsw-ef-construction",
        type=int,
        default=40,
        help="below the library default (80) so that 1e5 x 768 builds in about a minute on 2 cores",
    )
    parser.add_argument("--ivf-nlist", type=int, default=100)
    parser.add_argument("--ivf-nprobe", type=int, default=8)
    parser.add_argument("--latency-queries", type=int, default=200, help="at most this many single-query calls")
    parser.add_argument(
        "--latency-budget",
        type=float,
        default=3.0,
        help="stop single-query calls after this many seconds (at least 20 calls)",
    )
    parser.add_argument(
        "--single-query-threads",
        type=int,
        default=1,
        help="torch and FAISS threads during single-query calls (batched calls use all)",
    )
    parser.add_argument("--spread", type=float, default=0.5, help="cluster standard deviation (centres have 1)")
    parser.add_argument("--noise", type=float, default=0.3, help="query noise, relative to --spread")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = IndexConfig(
        metric=args.metric,
        hnsw_m=args.hnsw_m,
        hnsw_ef_search=args.hnsw_ef_search,
        hnsw_ef_construction=args.hnsw_ef_construction,
        ivf_nlist=args.ivf_nlist,
        ivf_nprobe=args.ivf_nprobe,
    )
    batch_threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}; threads: {batch_threads} for add and batched search, "
        f"{args.single_query_threads} for single-query calls; k={args.k}, queries={args.queries}"
    )
    print(f"settings: {base}")
    print(
        f"data: gaussian clusters (sqrt(size) centres ~ N(0, 1), spread {args.spread}), "
        f"queries = keys + noise {args.noise} x spread; seed {args.seed}"
    )
    print("x_p50 / x_batch: speedup over the exact torch path (single-query p50 latency / batched throughput)\n")

    rows: list[dict[str, object]] = []
    total_start = time.perf_counter()
    for size in args.sizes:
        for dim in args.dims:
            rng = np.random.default_rng([args.seed, size, dim])
            keys, queries = make_data(size, dim, args.queries, rng, args.spread, args.noise)
            results = {}
            for backend in ("torch", *[b for b in args.backends if b != "torch"]):
                index = build_index(dataclasses.replace(base, backend=backend), dim)
                results[backend] = measure(
                    index,
                    keys,
                    queries,
                    args.k,
                    args.latency_queries,
                    args.latency_budget,
                    args.single_query_threads,
                    batch_threads,
                )
                del index
            exact = results["torch"]
            for backend in args.backends:
                r = results[backend]
                r.update(
                    {
                        "size": size,
                        "dim": dim,
                        "backend": backend,
                        "recall@1": float((r["top1"] == exact["top1"]).float().mean()),
                        "x_p50": exact["p50_ms"] / r["p50_ms"],
                        "x_batch": r["batch_qps"] / exact["batch_qps"],
                    }
                )
                rows.append(r)
            print(format_table(rows[-len(args.backends) :]), "\n", flush=True)
    print(f"all results ({time.perf_counter() - total_start:.0f} s):")
    print(format_table(rows))


if __name__ == "__main__":
    main()
