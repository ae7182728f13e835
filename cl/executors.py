"""Executors for a sweep plan: ``local`` (sequential, in this process) and ``ray`` (one Ray task per run).

Both call :func:`execute_run` for every run that is not done yet. It decides from the run folder whether to resume
(a folder started with the same config) or start fresh, logs into ``<run dir>/run.log`` and appends the traceback
there when the run fails, so a failure always has a log path. Runs already done (a ``result.json`` for the same
config hash) are skipped, which makes a second invocation of a finished sweep run nothing and an interrupted one
pick up where it stopped.

The ``ray`` executor is Ray's own machinery and nothing else (no scheduler, queue or RPC of ours): each run is a
task with ``num_cpus`` / ``num_gpus`` from its :class:`cl.sweep.Resources`, ``max_retries`` for system failures (a
worker process or node that dies is retried, and the retry resumes from the run's last task checkpoint), and
``retry_exceptions=False`` (a config or data error fails the same way every time). Ray starts a local instance unless
``address`` names a cluster (``"auto"``, ``"ray://host:10001"``); run folders must then live on a filesystem every
node sees at the same path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cl.errors import ConfigError
from cl.sweep import RunSpec, SweepPlan, run_status

__all__ = ["RunOutcome", "SweepOutcome", "execute_run", "run_local", "run_ray", "run_sweep"]

log = logging.getLogger(__name__)

RunFn = Callable[[RunSpec], dict[str, Any]]
Echo = Callable[[str], None]


@dataclass
class RunOutcome:
    """What became of one run: ``finished`` (ran now), ``skipped`` (done before) or ``failed`` (after retries)."""

    run: RunSpec
    status: Literal["finished", "skipped", "failed"]
    summary: dict[str, Any] | None = None
    error: str | None = None

    @property
    def log_path(self) -> Path:
        return self.run.run_dir / "run.log"


@dataclass
class SweepOutcome:
    outcomes: list[RunOutcome] = field(default_factory=list)
    report: Path | None = None

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# ----------------------------------------------------------------------------------------------------------------------
# one run (executed in this process or in a Ray worker)


def _summary(run: RunSpec, result: dict[str, Any], resumed: bool, wall_s: float) -> dict[str, Any]:
    m = result.get("metrics") or {}
    return {
        "run_id": run.run_id, "run_dir": str(run.run_dir), "label": run.label, "strategy": run.strategy,
        "a_last": m.get("a_last"), "a_avg": m.get("a_avg"), "forgetting": m.get("forgetting"),
        "total_s": (result.get("timing") or {}).get("total_s"), "wall_s": round(wall_s, 3), "resumed": resumed,
        "host": socket.gethostname(), "pid": os.getpid(),
    }


def execute_run(run: RunSpec, *, progress: bool | None = None) -> dict[str, Any]:
    """Run one planned run to its end and return a small summary (metrics, timing, where it ran).

    Resumes when the run folder was started with the same config (``cl.loop.run(cfg, resume=True)``), starts fresh
    otherwise; returns at once when it is already done. Logs go to ``<run dir>/run.log`` (appended), and a failure's
    traceback is appended there before the exception propagates.

    Args:
        run: the planned run.
        progress: override ``train.progress`` (workers have no terminal to draw bars on); ``None`` keeps the config's.
    """
    from cl.loop import run as run_experiment
    from cl.plugins import load_builtin

    load_builtin()
    t0 = time.time()
    state = run_status(run)
    if state == "done":
        result = json.loads((run.run_dir / "result.json").read_text())
        return {**_summary(run, result, False, 0.0), "skipped": True}
    cfg = run.config
    if progress is not None and cfg.train.progress != progress:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level or logging.INFO, logging.INFO))
    try:
        log.info("run %s (%s) on %s pid %d: %s", run.run_id, run.label, socket.gethostname(), os.getpid(),
                 "resuming" if state == "partial" else "starting")
        result = run_experiment(cfg, resume=state == "partial")
        return _summary(run, result, state == "partial", time.time() - t0)
    except BaseException:
        log.error("run %s failed:\n%s", run.run_id, traceback.format_exc())
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _append_log(run: RunSpec, text: str) -> None:
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with (run.run_dir / "run.log").open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR clsim.sweep: {text}\n")
    except OSError:
        pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def _done_line(k: int, n: int, s: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return "—" if v is None else f"{v:.2f}"

    extra = ", resumed" if s.get("resumed") else ""
    return (f"[{k}/{n}] done   {s['label']}  A_last {num(s['a_last'])}  A_avg {num(s['a_avg'])}  "
            f"F {num(s['forgetting'])}  ({(s.get('total_s') or 0):.0f} s{extra})  -> {s['run_dir']}")


def _failed_line(k: int, n: int, o: RunOutcome) -> str:
    return f"[{k}/{n}] FAILED {o.run.label}: {o.error}  (log: {o.log_path})"


# ----------------------------------------------------------------------------------------------------------------------
# executors


def run_local(runs: Sequence[RunSpec], *, echo: Echo = print, run_fn: RunFn | None = None) -> list[RunOutcome]:
    """Run ``runs`` one after another in this process; a failing run is recorded and the next one starts."""
    run_fn = run_fn or execute_run
    outcomes = []
    for k, r in enumerate(runs, 1):
        echo(f"[{k}/{len(runs)}] start  {r.label}  -> {r.run_dir}")
        try:
            summary = run_fn(r)
        except Exception as err:  # a failed run must not stop the others; its traceback is in run.log
            outcomes.append(RunOutcome(r, "failed", error=_first_line(err)))
            echo(_failed_line(k, len(runs), outcomes[-1]))
            continue
        outcomes.append(RunOutcome(r, "finished", summary))
        echo(_done_line(k, len(runs), summary))
    return outcomes


def _ray_entry(run_fn: RunFn, run: RunSpec) -> dict[str, Any]:
    return run_fn(run)


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError('--executor ray: Ray is not installed; pip install -e ".[ray]"') from None


def _init_ray(ray: Any, address: str | None) -> None:
    """``ray.init`` for a driver: a local instance, or the cluster at ``address``; one-line error if unreachable."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"--address {address}" if address else "a local Ray instance"
        raise ConfigError(f"{where}: Ray did not start or connect ({_first_line(err)})") from None


def run_ray(runs: Sequence[RunSpec], *, address: str | None = None, max_retries: int = 3, echo: Echo = print,
            run_fn: RunFn | None = None, progress: bool = True) -> list[RunOutcome]:
    """Run every run as one Ray task; stream one line per finished run (and a progress bar over runs).

    Args:
        runs: the runs to execute.
        address: Ray cluster to join (``"auto"``, ``"ray://head:10001"``); ``None`` starts a local instance, unless
            Ray is already initialised in this process (then that session is used and left running).
        max_retries: Ray retries of a run whose worker process or node died (its retry resumes from the last task
            checkpoint). Exceptions raised by the run itself are not retried.
        echo: where lines go (through the progress bar when it is shown).
        run_fn: what a task calls (default :func:`execute_run`); must be importable by the workers.
        progress: show a tqdm bar over runs on stderr.
    """
    ray = _import_ray()
    run_fn = run_fn or functools.partial(execute_run, progress=False)  # workers have no terminal for bars
    started = False
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    if not ray.is_initialized():
        _init_ray(ray, address)
        started = True
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    say = bar.write if progress else echo
    remote = ray.remote(_ray_entry)
    pending: dict[Any, RunSpec] = {}
    outcomes: dict[int, RunOutcome] = {}
    try:
        for r in runs:
            opts = {"num_cpus": r.resources.num_cpus, "num_gpus": r.resources.num_gpus or 0,
                    "max_retries": max_retries, "retry_exceptions": False, "name": f"clsim:{r.label}"}
            pending[remote.options(**opts).remote(run_fn, r)] = r
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            r = pending.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None)
                text = _first_line(cause) if isinstance(cause, BaseException) else _first_line(err)
                if cause is None:  # the worker or node died on every attempt: no traceback reached run.log
                    _append_log(r, f"run {r.run_id} failed after {max_retries} retries: {err}")
                outcomes[r.index] = RunOutcome(r, "failed", error=text)
                say(_failed_line(len(outcomes), len(runs), outcomes[r.index]))
            else:
                outcomes[r.index] = RunOutcome(r, "finished", summary)
                say(_done_line(len(outcomes), len(runs), summary))
            bar.update(1)
    except BaseException:
        for ref in pending:  # an interrupted driver: the runs resume from their checkpoints next time
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return [outcomes[r.index] for r in runs]


def _other_code(runs: Sequence[RunSpec]) -> int:
    """How many of ``runs`` recorded a git SHA other than the current checkout's (0 when it is unknown)."""
    from cl.loop import _versions

    sha = _versions().get("git_sha", "unknown")
    if sha == "unknown":
        return 0
    count = 0
    for r in runs:
        try:
            recorded = json.loads((r.run_dir / "config.json").read_text()).get("versions", {}).get("git_sha")
        except (OSError, ValueError, AttributeError):
            continue
        count += recorded not in (None, "unknown", sha)
    return count


def run_sweep(plan: SweepPlan, *, executor: Literal["local", "ray"] = "local", address: str | None = None,
              max_retries: int = 3, echo: Echo = print, run_fn: RunFn | None = None,
              progress: bool = True, rerun: bool = False) -> SweepOutcome:
    """Execute the runs of ``plan`` that are not done, then write the report from every run that finished.

    Failures (after the retries) are listed in the report with their log path; the report is written whenever at
    least one run finished.

    Args:
        rerun: delete every planned run's folder first, so that all of them run again from scratch (e.g. after a
            code change: "done" means a result for the same *config*, whatever code produced it).
    """
    if rerun:
        for r in plan.runs:
            if r.run_dir.is_dir():
                shutil.rmtree(r.run_dir)
    todo, outcomes = [], []
    for r in plan.runs:
        if run_status(r) == "done":
            outcomes.append(RunOutcome(r, "skipped"))
        else:
            todo.append(r)
    if outcomes:
        echo(f"{len(outcomes)} of {len(plan.runs)} runs already done (result.json for the same config): skipped")
        other = _other_code([o.run for o in outcomes])
        if other:
            echo(f"  {other} of them were made by another code version (git SHA in config.json); --rerun redoes them")
    if todo:
        echo(f"running {len(todo)} runs with the {executor} executor")
        if executor == "ray":
            outcomes += run_ray(todo, address=address, max_retries=max_retries, echo=echo, run_fn=run_fn,
                                progress=progress)
        elif executor == "local":
            outcomes += run_local(todo, echo=echo, run_fn=run_fn)
        else:
            raise ConfigError(f"--executor {executor!r}; valid choices: local, ray")
    outcomes.sort(key=lambda o: o.run.index)
    result = SweepOutcome(outcomes)
    finished = [o.run.run_dir for o in outcomes if o.status != "failed"]
    if finished:
        report = importlib.import_module("evaluation.report")
        failed = [(str(o.run.run_dir), o.error or "failed", str(o.log_path)) for o in result.failed]
        result.report = report.make_report(finished, plan.report, failed=failed)
    return result
