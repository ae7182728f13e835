"""The ``ray`` executor on a real local Ray instance (2 CPUs): same metrics as ``local``, a worker killed mid-run is
retried and resumes from its task checkpoint, a second invocation runs nothing; and one small Ray Tune search. One Ray
session for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl.cli import main
from cl.executors import run_sweep
from cl.sweep import build_plan, describe_plan, load_sweep
from tests.sweep_helpers import KILL_SEED, KILL_STRATEGY, always_die, kill_once_at_task_boundary, must_not_run

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]" (scripts/setup.sh does)')

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "stream.train_images_per_class=6", "stream.test_images_per_class=3", "train.progress=False"]
GRID = "grid:\n  strategy.name: [simplecil, finetune, joint]\n  seed: [0, 1]\n"


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray_sweep")
    path = folder / "grid.yaml"
    path.write_text(f"base: {ROOT / 'configs' / 'smoke.yaml'}\nreport: {folder / 'report'}\n{GRID}")
    return path


def _plan(sweep_file: Path, out: str):
    return build_plan(load_sweep(sweep_file), extra=[*TINY, f"out={str(sweep_file.parent / out)!r}"])


def _results(plan) -> list[dict]:
    return [json.loads((r.run_dir / "result.json").read_text()) for r in plan.runs]


@pytest.fixture(scope="module")
def local_results(sweep_file: Path) -> list[dict]:
    import torch

    plan = _plan(sweep_file, "local")
    assert len(plan.runs) == 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray task gets (num_cpus=1): the same float reductions, bit for bit
    try:
        done = run_sweep(plan, executor="local", echo=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert not done.failed
    return _results(plan)


def test_ray_executor_matches_local_with_a_killed_worker(ray_session, sweep_file: Path, local_results) -> None:
    plan = _plan(sweep_file, "ray")
    lines: list[str] = []
    done = run_sweep(plan, executor="ray", run_fn=kill_once_at_task_boundary, echo=lines.append, progress=False)
    assert [o.status for o in done.outcomes] == ["finished"] * 6, [o.error for o in done.failed]
    assert sum(line.startswith("[") and " done " in line for line in lines) == 6  # one line per finished run

    killed = next(r for r in plan.runs if r.strategy == KILL_STRATEGY and r.config.seed == KILL_SEED)
    assert (killed.run_dir.parent / f".killed-{KILL_SEED}").exists()  # the first attempt did die
    assert next(o for o in done.outcomes if o.run is killed).summary["resumed"]
    events = [json.loads(line) for line in (killed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "from_task": 1}.items() <= next(e for e in events if e["event"] == "resume").items()

    for local, remote in zip(local_results, _results(plan), strict=True):
        assert remote["accuracy_matrix"] == local["accuracy_matrix"]
        assert remote["metrics"] == local["metrics"]

    comparison = (done.report.parent / "comparison.csv").read_text().splitlines()
    assert len(comparison) == 1 + 3  # one group per strategy, seeds averaged


def test_second_invocation_runs_nothing(ray_session, sweep_file: Path, capsys) -> None:
    plan = _plan(sweep_file, "ray")
    assert "6 done, 0 to resume, 0 to start" in describe_plan(plan)[0]
    sets = [a for item in [*TINY, f"out={str(sweep_file.parent / 'ray')!r}"] for a in ("--set", item)]
    assert main(["sweep", str(sweep_file), "--executor", "ray", *sets]) == 0  # the command line, same session
    out = capsys.readouterr().out
    assert "6 of 6 runs already done" in out and "running" not in out and "report: " in out
    done = run_sweep(plan, executor="ray", run_fn=must_not_run, echo=lambda _: None, progress=False)
    assert [o.status for o in done.outcomes] == ["skipped"] * 6 and done.report is not None


def test_run_whose_worker_always_dies_is_listed_with_its_log(ray_session, sweep_file: Path) -> None:
    plan = _plan(sweep_file, "dying")
    plan.runs = plan.runs[:1]
    lines: list[str] = []
    done = run_sweep(plan, executor="ray", run_fn=always_die, max_retries=1, echo=lines.append, progress=False)
    assert [o.status for o in done.outcomes] == ["failed"] and done.report is None  # nothing finished: no report
    failure = done.failed[0]
    assert failure.log_path == plan.runs[0].run_dir / "run.log"
    assert "failed after 1 retries" in failure.log_path.read_text()
    assert any("FAILED" in line and str(failure.log_path) in line for line in lines)


def test_tune_search_on_ray(ray_session, tmp_path: Path) -> None:
    """``clsim tune``'s machinery: two trials on the validation protocol, best config and trial table written."""
    from cl.tune import load_tune, run_tune

    path = tmp_path / "tune.yaml"
    path.write_text(f"base: {ROOT / 'configs' / 'smoke.yaml'}\nout: {tmp_path / 'tune'}\n"
                    "set: {strategy.name: simplecil, stream.train_images_per_class: 6, train.progress: false}\n"
                    "space: {stream.difficulty: {uniform: [0.1, 0.5]}}\nprotocol: {tasks: 2, val_fraction: 0.34}\n"
                    "search: {name: random, num_samples: 2}\n")
    best = run_tune(load_tune(path), echo=lambda _: None)
    assert 0.1 <= best["config"]["stream.difficulty"] <= 0.5 and best["metrics"]["task"] >= 1
    assert best["metrics"]["a_avg"] is not None
    trials = (tmp_path / "tune" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2 and json.loads((tmp_path / "tune" / "best.json").read_text())["protocol"]["tasks"] == 2
