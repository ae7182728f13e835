"""Sweep executors: wall-clock of the ``ray`` executor (a local Ray instance with N workers) against ``local``.

One invocation runs the same grid of smoke runs (tiny ``test_vit``, synthetic stream; default 2 strategies x 4 seeds =
8 runs) through both executors, each into a fresh output folder, alternating ``--repeat`` times, and prints:

- the ratio ``ray / local`` of the sweep's wall-clock (Ray's start-up excluded, and included);
- the per-run overhead Ray adds: worker time not spent inside a run, ``(wall x workers - sum of in-run time) / runs``
  (scheduling, argument transfer, worker start-up and imports, and idle workers at the tail of the grid), next to the
  same quantity for ``local`` (1 worker);
- the overhead of an empty Ray task round trip (``--noop`` tasks) for scale.

Numbers are ratios measured in one run; absolute times on a shared machine mean little.

    python benchmarks/bench_sweep.py                     # 8 runs, 2 workers
    python benchmarks/bench_sweep.py --seeds 0 1 2 3 4 5 --workers 2 --repeat 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl.executors import run_sweep  # noqa: E402
from cl.plugins import load_builtin  # noqa: E402
from cl.sweep import build_plan, load_sweep  # noqa: E402

TINY = ["train.epochs=1", "stream.train_images_per_class=8", "stream.test_images_per_class=4", "train.progress=False"]


def _noop(x: int) -> int:
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["simplecil", "finetune"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray instance (one per run)")
    p.add_argument("--repeat", type=int, default=1, help="alternate local and ray this many times")
    p.add_argument("--noop", type=int, default=200, help="empty Ray tasks for the round-trip overhead")
    args = p.parse_args()
    load_builtin()
    import ray

    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        folder = Path(tmp)
        sweep_file = folder / "grid.yaml"
        sweep_file.write_text(f"base: {ROOT / 'configs' / 'smoke.yaml'}\nreport: {folder / 'report'}\ngrid:\n"
                              f"  strategy.name: [{', '.join(args.strategies)}]\n"
                              f"  seed: [{', '.join(map(str, args.seeds))}]\n")
        n_runs = len(args.strategies) * len(args.seeds)
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        inside: dict[str, list[float]] = {"local": [], "ray": []}
        init_s: list[float] = []
        for rep in range(args.repeat):
            for executor in ("local", "ray"):
                out = folder / f"{executor}_{rep}"
                plan = build_plan(load_sweep(sweep_file), extra=[*TINY, f"out={str(out)!r}"])
                assert len(plan.runs) == n_runs
                t_init = time.perf_counter()
                if executor == "ray":
                    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    init_s.append(time.perf_counter() - t_init)
                t0 = time.perf_counter()
                done = run_sweep(plan, executor=executor, echo=lambda _: None, progress=False)
                walls[executor].append(time.perf_counter() - t0)
                inside[executor].append(sum(o.summary["wall_s"] for o in done.outcomes if o.summary))
                assert not done.failed, [o.error for o in done.failed]
                if executor == "ray":
                    remote = ray.remote(num_cpus=1)(_noop)
                    ray.get([remote.remote(i) for i in range(args.workers)])  # warm
                    t_noop = time.perf_counter()
                    ray.get([remote.remote(i) for i in range(args.noop)])
                    noop_s = (time.perf_counter() - t_noop) / args.noop
                    ray.shutdown()
                print(f"rep {rep}: {executor:<5} wall {walls[executor][-1]:7.1f} s for {n_runs} runs "
                      f"(sum of in-run time {inside[executor][-1]:.1f} s)", flush=True)
        local, ray_wall = sum(walls["local"]), sum(walls["ray"])
        ratio = ray_wall / local
        ratio_init = (ray_wall + sum(init_s)) / local
        over_ray = (ray_wall * args.workers - sum(inside["ray"])) / (n_runs * args.repeat)
        over_local = (local - sum(inside["local"])) / (n_runs * args.repeat)
        print(f"\n{n_runs} smoke runs x {args.repeat}: ray ({args.workers} workers) / local wall-clock = {ratio:.2f} "
              f"(with Ray start-up: {ratio_init:.2f}; ideal 1/{args.workers} = {1 / args.workers:.2f})")
        print(f"per-run overhead outside the run: ray {over_ray:.2f} s (worker-seconds), local {over_local:.2f} s; "
              f"Ray adds {over_ray - over_local:.2f} s per run")
        print(f"Ray start-up {sum(init_s) / len(init_s):.1f} s; empty task round trip {noop_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
