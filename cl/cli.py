"""The ``clsim`` command line: ``run``, ``sweep``, ``list``, ``report``.

Errors in configs, names, data, weights and run folders, and numeric faults, print one line
``clsim: error: <key or file>: <reason>`` and exit with code 2 (command-line syntax errors too); an interrupted
run exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
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
    """Run a config (or sweep file) once per strategy, then write a comparison report."""
    from cl.sweep import load_sweep, run_sweep

    plan = load_sweep(args.config, args.report)
    names = [n for n in args.strategies.split(",") if n] or None
    _, report = run_sweep(plan, strategies=names, extra=args.set, resume=args.resume, skip_done=args.skip_done,
                          echo=lambda m: print(m, flush=True))
    print(f"report: {report}")
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
    s = sub.add_parser("sweep", help="run a config or sweep file once per strategy and write a comparison report")
    s.add_argument("config")
    s.add_argument("--strategies", default="", help="comma-separated names (default: every registered strategy)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--report", default=None, help="report folder (default: the sweep file's, else reports/<stem>)")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--skip-done", action="store_true", help="reuse runs that already have a result.json")
    s.set_defaults(fn=_cmd_sweep)
    ls = sub.add_parser("list", help="list registered strategies, streams, adapters, index backends, metrics")
    ls.set_defaults(fn=_cmd_list)
    rep = sub.add_parser("report", help="comparison report over run folders")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", required=True)
    rep.set_defaults(fn=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("clsim: interrupted (the run folder keeps its last task boundary; continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
