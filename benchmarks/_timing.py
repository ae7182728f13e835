"""Interleaved timing shared by the benchmarks: the candidates alternate within every round, so the load of a shared
machine falls on all of them alike; report medians and the ratios between them, not absolute times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA work included: synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate over ``repeats`` rounds, after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}
