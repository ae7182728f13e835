"""The ``clsim`` command line: ``run``, ``sweep``, ``tune``, ``list``, ``report``.

Errors in configs, names, data, weights and run folders, and numeric faults, print one line
``clsim: error: <key or file>: <reason>`` and exit with code 2 (command-line syntax errors too); a run interrupted
with Ctrl-C exits with 130, one stopped with SIGTERM (``kill``, a SLURM preemption or time limit) with 143 -- both
release the run folder's lock and keep its last task boundary, so ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing
from pathlib import Path

__all__ = ["main", "format_metric"]

log = logging.getLogger("clsim")


def _user_errors() -> tuple[type[BaseException], ...]:
    from cl.errors import ClsimError

    # FileNotFoundError: e.g. `clsim report` on folders without result.json
    return ClsimError, FileNotFoundError


def format_metric(value: float | None) -> str:
    """A summary number with two decimals, or ``—`` where the metric is undefined (``null`` in result.json)."""
    return "\u2014" if value is None else f"{value:.2f}"


def _cmd_run(args: argparse.Namespace) -> int:
    from cl.config import load_config
    from cl.loop import run, run_dir_of

    cfg = load_config(args.config, args.set)
    result = run(cfg, resume=args.resume)
    m = result["metrics"]
    print(f"{cfg.strategy.name}: A_last {format_metric(m['a_last'])}  A_avg {format_metric(m['a_avg'])}  forgetting "
          f"{format_metric(m['forgetting'])}  -> {run_dir_of(cfg)}/result.json")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Expand a sweep file (or a config) into its runs, run those not done yet, then write the comparison report."""
    from cl.executors import run_sweep
    from cl.sweep import build_plan, describe_plan, load_sweep

    sweep = load_sweep(args.config, args.report)
    names = [n for n in args.strategies.split(",") if n] or None
    plan = build_plan(sweep, strategies=names, extra=args.set)  # every run validated before any starts
    if args.runs:
        plan.runs = [plan.runs[i] for i in _run_numbers(args.runs, len(plan.runs))]
    if args.dry_run:
        print("\n".join(describe_plan(plan)))
        return 0
    done = run_sweep(plan, executor=args.executor, address=args.address, max_retries=args.max_retries,
                     echo=lambda m: print(m, flush=True), progress=sys.stderr.isatty(), rerun=args.rerun)
    if done.failed:
        print(f"{len(done.failed)} of {len(plan.runs)} runs failed:")
        for o in done.failed:
            print(f"  {o.run.label}: {o.error}  log: {o.log_path}")
    print(f"report: {done.report}" if done.report else "report: none (no run finished)")
    return 1 if done.failed else 0


def _run_numbers(text: str, count: int) -> list[int]:
    """``"1,3-5"`` -> ``[0, 2, 3, 4]`` (the 1-based numbers of ``--dry-run``'s listing)."""
    from cl.errors import ConfigError

    picked: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--runs {text}: expected numbers and ranges like 1,3-5") from None
        if not 1 <= first <= last <= count:
            raise ConfigError(f"--runs {text}: the plan has runs 1-{count}")
        picked += [i - 1 for i in range(first, last + 1) if i - 1 not in picked]
    return picked


def _cmd_tune(args: argparse.Namespace) -> int:
    from cl.tune import load_tune, run_tune

    spec = load_tune(args.config, extra=args.set)
    if args.dry_run:
        print("\n".join(spec.describe()))
        return 0
    best = run_tune(spec, address=args.address, echo=lambda m: print(m, flush=True))
    print(f"best ({spec.metric}, {spec.mode}): {best['metrics'].get(spec.metric)}  config: {best['config']}")
    print(f"results: {best['results']}")
    return 0


def _cmd_list(_args: argparse.Namespace) -> int:
    from cl.registries import ADAPTERS, INDEXES, METRICS, STRATEGIES, STREAMS

    for title, reg in (("strategies", STRATEGIES), ("streams", STREAMS), ("adapter types", ADAPTERS),
                       ("index backends", INDEXES), ("metrics", METRICS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evaluation.report import make_report

    path = make_report([Path(p) for p in args.run_dirs], Path(args.out))
    print(f"report: {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other user error (exit 2, no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"clsim: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clsim", description="Continual-learning simulation on frozen ViTs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one experiment config")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.01")
    r.add_argument("--resume", action="store_true", help="continue from the last task-boundary checkpoint")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("sweep", help="run a grid of experiments (sweep file or config) and write a comparison report")
    s.add_argument("config")
    s.add_argument("--strategies", default="", help="comma-separated names (default: every registered strategy)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    s.add_argument("--report", default=None, help="report folder (default: the sweep file's, else reports/<stem>)")
    s.add_argument("--dry-run", action="store_true", help="print the plan (count, what differs, state) and exit")
    s.add_argument("--runs", default="", help="only these runs of the plan, by --dry-run number: 1,3-5")
    s.add_argument("--rerun", action="store_true",
                   help="delete the planned runs' folders and run them again (default: finished runs are skipped)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another here; ray: one Ray task per run")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, ray://head:10001); default: start a local Ray instance")
    s.add_argument("--max-retries", type=int, default=3, help="Ray retries of a run whose worker or node died")
    # runs already done are always skipped and started runs always resume: both flags are kept as no-ops
    s.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--skip-done", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=_cmd_sweep)
    t = sub.add_parser("tune", help="hyper-parameter search with Ray Tune (validation split of the first k tasks)")
    t.add_argument("config", help="tune file (base config, search space, protocol, search algorithm, scheduler)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    t.add_argument("--dry-run", action="store_true", help="print the search space and protocol and exit")
    t.add_argument("--address", default=None, help="Ray cluster to join; default: a local Ray instance")
    t.set_defaults(fn=_cmd_tune)
    ls = sub.add_parser("list", help="list registered strategies, streams, adapters, index backends, metrics")
    ls.set_defaults(fn=_cmd_list)
    rep = sub.add_parser("report", help="comparison report over run folders")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", required=True)
    rep.set_defaults(fn=_cmd_report)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread and handled like Ctrl-C: locks are released by the same ``finally`` paths."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command and return its exit code (0, 2 for bad input, 130 on Ctrl-C, 143 on SIGTERM)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every SIMD build it could not load
    from cl.plugins import load_builtin

    load_builtin()
    try:
        return args.fn(args)
    except _user_errors() as err:
        print(f"clsim: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"clsim: {what} (the run folder keeps its last task boundary; continue with --resume)", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
