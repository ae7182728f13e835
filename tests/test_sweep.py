"""Sweep plans (grids, stable ids, readable names, validation before any run), dry runs and the local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl.cli import main
from cl.config import ConfigError
from cl.executors import execute_run, run_sweep
from cl.registries import STRATEGIES
from cl.sweep import build_plan, load_sweep, run_status
from tests.sweep_helpers import must_not_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = ["train.epochs=1", "stream.train_images_per_class=6", "stream.test_images_per_class=3", "train.progress=False"]


def _sweep(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {SMOKE}\nreport: {tmp_path / 'report'}\n{body}")
    return path


def test_quickstart_sweep_plan_every_strategy_one_run() -> None:
    sweep = load_sweep(ROOT / "configs" / "quickstart_sweep.yaml")
    plan = build_plan(sweep)
    assert [r.strategy for r in plan.runs] == STRATEGIES.names()  # a new strategy joins as soon as it registers
    assert [r.config.experiment for r in plan.runs] == [f"quickstart_{n}" for n in STRATEGIES.names()]
    sema = next(r for r in plan.runs if r.strategy == "sema").config.strategy
    assert sema.exp_threshold == 0.5 and sema.optimizer == "adamw"
    again = build_plan(load_sweep(ROOT / "configs" / "quickstart_sweep.yaml"))
    assert [r.run_id for r in again.runs] == [r.run_id for r in plan.runs]  # stable ids
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    assert sweep.overrides["sema"][0].startswith("strategy.func_epoch=")  # tests/test_end_to_end.py reads these


def test_grid_expansion_names_and_per_strategy_grids(tmp_path: Path) -> None:
    path = _sweep(tmp_path, """grid:
  strategy.name: [finetune, sema]
  seed: [0, 1]
  train.lr: [0.01, 0.1]
resources: {num_cpus: 2}
strategies:
  sema:
    strategy.rd_epoch: 1
    grid: {strategy.exp_threshold: [0.5, 1.0]}
    resources: {num_gpus: 0.5}
""")
    plan = build_plan(load_sweep(path), extra=[f"out={str(tmp_path / 'runs')!r}"])
    assert len(plan.runs) == 2 * 2 + 2 * 2 * 2
    names = {(r.config.experiment, r.config.seed) for r in plan.runs}
    assert ("smoke_finetune__lr=0.1", 1) in names
    assert ("smoke_sema__lr=0.01__exp_threshold=1.0", 0) in names
    sema = [r for r in plan.runs if r.strategy == "sema"]
    assert {r.config.strategy.exp_threshold for r in sema} == {0.5, 1.0}
    assert all(r.config.strategy.rd_epoch == 1 for r in sema)
    assert sema[0].resources.num_gpus == 0.5 and sema[0].resources.num_cpus == 2.0
    assert plan.runs[0].resources.num_gpus == 0.0  # train.device is not cuda
    assert [r.config.seed for r in plan.runs[:2]] == [0, 1]  # seeds of one setting are neighbours
    assert len({r.run_dir for r in plan.runs}) == len(plan.runs)
    assert plan.runs[0].run_dir == tmp_path / "runs" / "smoke_finetune__lr=0.01" / "0"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("grid: {train.lrr: [0.1]}\n", "train.lrr"),
        ("grid: {train.lr: 0.1}\n", "grid.train.lr"),
        ("grid: {train.lr: []}\n", "grid.train.lr"),
        ("grid: {train.lr: [0.1, 0.1]}\n", "grid.train.lr"),
        ("grid: {train.lr: [fast]}\n", "train.lr"),
        ("grid: {train.lr: [-1.0]}\n", "train.lr"),
        ("grid: {out: [a, b]}\n", "grid.out"),
        ("grid: {'train lr': [1]}\n", "'train lr'"),
        ("grid: {strategy.exp_threshold: [1.0]}\n", "strategy.exp_threshold"),  # not a key of every strategy
        ("grid: {strategy.name: [sema, nope]}\n", "nope"),
        ("grid: [1, 2]\n", "grid"),
        ("strategies: {nope: {}}\n", "strategies.nope"),
        ("strategies: {sema: {grid: {strategy.name: [finetune]}}}\n", "strategies.sema.grid.strategy.name"),
        ("grid: {seed: [0]}\nstrategies: {sema: {grid: {seed: [1]}}}\n", "strategies.sema.grid.seed"),
        ("resources: {num_cpus: -1}\n", "resources.num_cpus"),
        ("resources: {cpus: 1}\n", "resources.cpus"),
        ("grids: {}\n", "grids"),
    ],
)
def test_invalid_grids_fail_before_any_run_naming_the_key(tmp_path: Path, body: str, named: str, capsys) -> None:
    out = tmp_path / "runs"
    path = _sweep(tmp_path, body)
    with pytest.raises(ConfigError, match=None) as err:
        build_plan(load_sweep(path), extra=[f"out={str(out)!r}"])
    assert named in str(err.value) and "\n" not in str(err.value)
    assert main(["sweep", str(path), "--set", f"out={str(out)!r}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clsim: error: ") and named in lines[0]
    assert not out.exists() and not (tmp_path / "report").exists()


def test_set_may_not_collapse_a_grid_key_or_rename_runs(tmp_path: Path) -> None:
    path = _sweep(tmp_path, "grid: {seed: [0, 1]}\n")
    with pytest.raises(ConfigError, match="--set seed"):
        build_plan(load_sweep(path), extra=["seed=3"])
    with pytest.raises(ConfigError, match="--set experiment"):
        build_plan(load_sweep(path), extra=["experiment='../../elsewhere'"])
    with pytest.raises(ConfigError, match="strategies.finetune.train.lr: also a grid key"):
        build_plan(load_sweep(_sweep(tmp_path, "grid: {train.lr: [0.1, 0.2]}\n"
                                               "strategies: {finetune: {train.lr: 0.3}}\n")))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:
    path = _sweep(tmp_path, "grid:\n  strategy.name: [simplecil, finetune, joint]\n  seed: [0, 1]\n"
                            "strategies:\n  finetune: {grid: {train.lr: [0.01, 0.1]}}\n")
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--dry-run", "--set", f"out={str(out)!r}"]) == 0
    text = capsys.readouterr().out
    assert "8 runs over 3 strategies (0 done, 0 to resume, 8 to start)" in text
    assert "finetune: 4 runs: train.lr in {0.01, 0.1}; seed in {0, 1}" in text
    assert "simplecil: 2 runs: seed in {0, 1}" in text
    assert text.count(" new ") == 8 and "smoke_finetune__lr=0.1" in text
    assert not out.exists() and not (tmp_path / "report").exists()


def test_local_sweep_skips_done_runs_resumes_partial_ones_and_reports_failures(tmp_path: Path) -> None:
    path = _sweep(tmp_path, "grid:\n  strategy.name: [simplecil]\n  seed: [0, 1]\n")
    plan = build_plan(load_sweep(path), extra=[*TINY, f"out={str(tmp_path / 'runs')!r}"])
    lines: list[str] = []
    first = run_sweep(plan, echo=lines.append)
    assert [o.status for o in first.outcomes] == ["finished", "finished"] and first.report is not None
    assert sum("done   simplecil" in line for line in lines) == 2
    results = [json.loads((r.run_dir / "result.json").read_text()) for r in plan.runs]
    assert all(res["config_hash"] == r.run_id for res, r in zip(results, plan.runs, strict=True))
    assert (plan.runs[0].run_dir / "run.log").read_text().count("starting") == 1

    again = run_sweep(plan, run_fn=must_not_run, echo=lines.append)  # a second invocation runs nothing
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"] and again.report is not None

    one = build_plan(load_sweep(path), extra=[*TINY, f"out={str(tmp_path / 'runs')!r}"])
    one.runs = one.runs[:1]
    (one.runs[0].run_dir / "stray.txt").write_text("x")
    redo = run_sweep(one, rerun=True, echo=lines.append)  # --rerun: the folder is cleared and the run redone
    assert [o.status for o in redo.outcomes] == ["finished"] and not redo.outcomes[0].summary["resumed"]
    assert not (one.runs[0].run_dir / "stray.txt").exists()
    assert json.loads((one.runs[0].run_dir / "result.json").read_text())["accuracy_matrix"] == \
        results[0]["accuracy_matrix"]

    # interrupted after its last checkpoint, before result.json: picked up from the checkpoint, same result
    (plan.runs[1].run_dir / "result.json").unlink()
    assert run_status(plan.runs[1]) == "partial"
    summary = execute_run(plan.runs[1])
    assert summary["resumed"] and run_status(plan.runs[1]) == "done"
    resumed = json.loads((plan.runs[1].run_dir / "result.json").read_text())
    assert resumed["accuracy_matrix"] == results[1]["accuracy_matrix"]
    events = [json.loads(line)["event"] for line in (plan.runs[1].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events

    # another config into the same folders: not done; the failure of one run is listed, the report still written
    changed = build_plan(load_sweep(path), extra=[*TINY, "stream.difficulty=0.5", f"out={str(tmp_path / 'runs')!r}"])
    assert [run_status(r) for r in changed.runs] == ["stale", "stale"]

    def fail_seed_1(run):
        if run.config.seed == 1:
            raise RuntimeError("boom")
        return execute_run(run)

    failed = run_sweep(changed, run_fn=fail_seed_1, echo=lines.append)
    assert [o.status for o in failed.outcomes] == ["finished", "failed"]
    assert failed.failed[0].error == "RuntimeError: boom" and failed.report is not None
    assert "RuntimeError: boom" in failed.report.read_text() and str(changed.runs[1].run_dir / "run.log") in \
        failed.report.read_text()


def test_sensitivity_grid_uses_the_quickstart_settings():
    """The sensitivity grid shares the quickstart's run folders (same base): every strategy must carry the quickstart
    sweep's overrides (minus its own grid keys), or its seed-0 run would overwrite the quickstart's."""
    quick = load_sweep(ROOT / "configs" / "quickstart_sweep.yaml")
    grid = load_sweep(ROOT / "configs" / "sensitivity_fashion_mnist.yaml")
    assert set(grid.strategies) == set(quick.strategies) == set(STRATEGIES.names())
    for name, entry in grid.strategies.items():
        mine = {k: v for k, v in entry.overrides.items() if k not in entry.grid}
        theirs = {k: v for k, v in quick.strategies[name].overrides.items() if k not in entry.grid}
        assert mine == theirs, name
    plan = build_plan(grid)
    assert len(plan.runs) == 3 * (len(STRATEGIES.names()) - 1) + 27
