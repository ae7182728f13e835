"""Reports from run folders: 2 strategies x 2 seeds of fake result.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from evaluation.metrics import compute_metrics
from evaluation.report import make_report, write_run_figures

N_TEST = [100, 50, 50]
FIGURES = ("forgetting_curves.png", "forgetting.png", "final_accuracy_per_task.png", "expansion.png")
MATRICES = {
    ("finetune", 0): [[90.0, None, None], [80.0, 70.0, None], [85.0, 72.0, 60.0]],
    ("finetune", 1): [[92.0, None, None], [60.0, 75.0, None], [40.0, 50.0, 70.0]],
    ("sema", 0): [[95.0, None, None], [90.0, 85.0, None], [88.0, 80.0, 82.0]],
    ("sema", 1): [[93.0, None, None], [91.0, 83.0, None], [90.0, 78.0, 80.0]],
}


def _result(strategy: str, seed: int) -> dict:
    matrix = MATRICES[(strategy, seed)]
    counts = [[1, 1, 1], [2, 1, 2], [2, 2 + seed, 3]] if strategy == "sema" else None
    expansion = None
    if counts is not None:
        expansion = {
            "sites": ["blocks.0", "blocks.1", "blocks.2"],
            "expandable_sites": [0, 1, 2],
            "adapters_per_layer": counts,
            "deployed_params": [10, 20, 30 + seed],
            "reference_params": [10, 20, 30],
            "expansion_rate": 0.5 + 0.1 * seed,
        }
    return {
        "experiment": "smoke",
        "strategy": strategy,
        "seed": seed,
        "stream": "synthetic",
        "tasks": [
            {"id": j, "class_ids": [2 * j, 2 * j + 1], "labels": [0, 1], "n_train": 48, "n_test": n}
            for j, n in enumerate(N_TEST)
        ],
        "accuracy_matrix": matrix,
        "metrics": compute_metrics(matrix, N_TEST),
        "task_retrieval": None,
        "expansion": expansion,
        "timing": {"total_s": 10.0 + seed, "per_task_s": [3.0, 3.0, 4.0 + seed]},
    }


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for strategy, seed in MATRICES:
        run_dir = root / f"smoke_{strategy}" / str(seed)
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps(_result(strategy, seed)))
        (run_dir / "config.json").write_text(json.dumps({"seed": seed, "strategy": {"name": strategy}}))
    return root


def test_make_report_writes_all_files(runs_root: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    report = make_report([runs_root], out_dir)
    assert report == out_dir / "report.md"
    for name in (
        "summary.csv",
        "comparison.csv",
        "report.md",
        "report.html",
        "pivot.csv",
        *FIGURES,
    ):
        assert (out_dir / name).stat().st_size > 0, name
    assert not list(out_dir.glob("*.tmp")) and not list(out_dir.glob(".*"))
    for name in FIGURES:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) and "sema" in html
    text = report.read_text()
    assert all(name in text for name in FIGURES)
    assert text.index("| smoke | sema |") < text.index("| smoke | finetune |")  # sorted by A_last


def test_csv_numbers_are_seed_means(runs_root: Path, tmp_path: Path) -> None:
    make_report([runs_root], tmp_path / "report")
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    comparison = pd.read_csv(tmp_path / "report" / "comparison.csv")
    assert len(summary) == 4 and len(comparison) == 2
    assert list(comparison["strategy"]) == ["sema", "finetune"]
    for strategy in ("finetune", "sema"):
        per_seed = [compute_metrics(MATRICES[(strategy, s)], N_TEST) for s in (0, 1)]
        row = comparison.set_index("strategy").loc[strategy]
        assert row["n_seeds"] == 2
        for key in ("a_last", "a_avg", "a_last_task_mean", "forgetting", "bwt"):
            values = pd.Series([p[key] for p in per_seed])
            assert row[f"{key}_mean"] == pytest.approx(values.mean()), key
            assert row[f"{key}_std"] == pytest.approx(values.std()), key
        assert row["train_time_s_mean"] == pytest.approx(10.5)
    sema = comparison.set_index("strategy").loc["sema"]
    assert sema["expansion_rate_mean"] == pytest.approx(0.55)
    assert sema["adapters_total_mean"] == pytest.approx((7 + 8) / 2)
    assert sema["deployed_params_mean"] == pytest.approx(30.5)
    assert pd.isna(comparison.set_index("strategy").loc["finetune", "expansion_rate_mean"])
    fine0 = summary[(summary["strategy"] == "finetune") & (summary["seed"] == 0)].iloc[0]
    assert fine0["a_last"] == pytest.approx(75.5) and fine0["forgetting"] == pytest.approx(2.5)
    assert fine0["bwt"] == pytest.approx(-1.5)


def test_single_run_folder_and_single_seed(runs_root: Path, tmp_path: Path) -> None:
    report = make_report([runs_root / "smoke_sema" / "0"], tmp_path / "one")
    comparison = pd.read_csv(tmp_path / "one" / "comparison.csv")
    assert len(comparison) == 1 and pd.isna(comparison.loc[0, "a_last_std"])
    assert "± " not in report.read_text().split("| smoke | sema |")[1].splitlines()[0]


def test_duplicate_paths_counted_once(runs_root: Path, tmp_path: Path) -> None:
    make_report([runs_root, runs_root / "smoke_sema"], tmp_path / "dup")
    assert len(pd.read_csv(tmp_path / "dup" / "summary.csv")) == 4


def test_missing_results_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match=r"no result\.json") as err:
        make_report([empty, missing], tmp_path / "out")
    assert str(empty) in str(err.value) and str(missing) in str(err.value)


def test_write_run_figures(tmp_path: Path) -> None:
    paths = write_run_figures(_result("finetune", 0), tmp_path)
    assert [p.name for p in paths] == ["forgetting_curve.png", "accuracy_matrix.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["accuracy_matrix.png", "forgetting_curve.png"]


# ----------------------------------------------------------------------------------------------------------------------
# grouping, confidence intervals, pivot, expansion series


def _groups(paths: list[Path]) -> pd.DataFrame:
    from evaluation.aggregate import comparison_table, summary_table
    from evaluation.report import load_runs

    return comparison_table(summary_table(load_runs(paths)))


def _write_run(root: Path, experiment: str, seed: int, result: dict, config: dict | None = None) -> Path:
    run_dir = root / experiment / str(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "config.json").write_text(json.dumps(config or {"seed": seed, "strategy": {"name": result["strategy"]}}))
    return run_dir


def test_ci95_is_student_t_over_seeds(runs_root: Path) -> None:
    comparison = _groups([runs_root]).set_index("strategy")
    t_975_1 = 12.706204736174698  # scipy.stats.t.ppf(0.975, 1): two seeds, one degree of freedom
    for strategy in ("finetune", "sema"):
        values = pd.Series([compute_metrics(MATRICES[(strategy, s)], N_TEST)["a_last"] for s in (0, 1)])
        assert comparison.loc[strategy, "a_last_ci95"] == pytest.approx(t_975_1 * values.std() / 2**0.5)
        assert comparison.loc[strategy, "seeds"] == "0 1"
    one = _groups([runs_root / "smoke_sema" / "0"])
    assert pd.isna(one.loc[0, "a_last_ci95"])


def test_runs_with_different_task_counts_are_not_averaged(tmp_path: Path) -> None:
    """Regression (issue 9): a 3-task and a 4-task run of one experiment averaged into "2 seeds"."""
    four = _result("finetune", 1)
    four["accuracy_matrix"] = [[90.0], [80.0, 70.0], [85.0, 72.0, 60.0], [80.0, 70.0, 60.0, 50.0]]
    four["tasks"] = [*four["tasks"], {"id": 3, "class_ids": [6, 7], "labels": [6, 7], "n_test": 50}]
    _write_run(tmp_path, "smoke_finetune", 0, _result("finetune", 0))
    _write_run(tmp_path, "smoke_finetune", 1, four)
    comparison = _groups([tmp_path])
    assert len(comparison) == 2 and list(comparison["n_seeds"]) == [1, 1]
    assert sorted(comparison["split"]) == ["3x2", "4x2"]
    assert comparison["label"].nunique() == 2  # the figures tell them apart


def test_runs_with_different_class_splits_are_not_averaged(tmp_path: Path) -> None:
    other = _result("finetune", 1)
    other["tasks"][0]["class_ids"] = [0, 1, 8, 9]  # B4 Inc2 against B2 Inc2, same task count
    _write_run(tmp_path, "smoke_finetune", 0, _result("finetune", 0))
    _write_run(tmp_path, "smoke_finetune", 1, other)
    assert sorted(_groups([tmp_path])["split"]) == ["3x2", "4+2+2"]


def test_groups_by_every_setting_but_the_seed(tmp_path: Path) -> None:
    for seed, lr in ((0, 0.01), (1, 0.01), (2, 0.1)):
        _write_run(tmp_path, "smoke_finetune", seed, {**_result("finetune", seed % 2), "seed": seed},
                   {"seed": seed, "experiment": "smoke_finetune", "strategy": {"name": "finetune"},
                    "train": {"lr": lr, "progress": seed == 1}})
    comparison = _groups([tmp_path]).set_index("settings")
    assert comparison.loc["train.lr=0.01", "n_seeds"] == 2  # train.progress never splits a group
    assert comparison.loc["train.lr=0.1", "n_seeds"] == 1


def test_pivot_strategy_by_stream(runs_root: Path) -> None:
    from evaluation.aggregate import pivot_table

    other = _result("finetune", 0)
    other["stream"] = "fashion_mnist"
    _write_run(runs_root, "fm_finetune", 0, other)
    pivot = pivot_table(_groups([runs_root])).set_index("strategy")
    assert list(pivot.columns) == ["fashion_mnist (3x2)", "synthetic (3x2)"]
    assert pivot.loc["finetune", "fashion_mnist (3x2)"].endswith("(n=1)")
    assert pivot.loc["sema", "fashion_mnist (3x2)"] == ""
    assert " ± " in pivot.loc["sema", "synthetic (3x2)"] and pivot.loc["sema", "synthetic (3x2)"].endswith("(n=2)")


def test_expansion_series_and_one_set_per_task_line() -> None:
    from evaluation.report import _expansion_series

    series = _expansion_series(_result("sema", 0)["expansion"])
    assert series["_adapters"] == [3, 5, 7]
    assert series["_adapters_ref"] == [3, 6, 9]  # K(1) + (t - 1)|S| with |S| = 3
    assert _expansion_series({}) == {"_adapters": None, "_adapters_ref": None}


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs (issue 9, `clsim report`)


BAD_RESULTS = {
    "empty": "",
    "not_json": "{not json",
    "empty_object": "{}",
    "a_list": "[1, 2]",
    "hole_in_matrix": json.dumps({**_result("finetune", 0), "accuracy_matrix": [[90.0], [None, 70.0]],
                                  "tasks": _result("finetune", 0)["tasks"][:2]}),
    "tasks_mismatch": json.dumps({**_result("finetune", 0), "tasks": _result("finetune", 0)["tasks"][:1]}),
}


def test_bad_results_are_named_and_skipped(runs_root: Path) -> None:
    from evaluation.report import load_runs

    for name, text in BAD_RESULTS.items():
        (runs_root / "bad" / name).mkdir(parents=True)
        (runs_root / "bad" / name / "result.json").write_text(text)
    unfinished = runs_root / "smoke_joint" / "0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    problems: list[tuple[str, str]] = []
    records = load_runs([runs_root], problems)
    assert len(records) == 4  # only the good runs
    named = {Path(p).parent.name if p.endswith("result.json") else Path(p).name: r for p, r in problems}
    assert set(named) == {*BAD_RESULTS, "0"}
    assert "empty file" in named["empty"] and "not valid JSON" in named["not_json"]
    assert "no accuracy_matrix" in named["empty_object"] and "no accuracy_matrix" in named["a_list"]
    assert "R[2][1]" in named["hole_in_matrix"] and "tasks" in named["tasks_mismatch"]
    assert "no result.json" in named["0"]


def test_report_lists_skipped_and_failed_runs(runs_root: Path, tmp_path: Path) -> None:
    (runs_root / "broken").mkdir()
    (runs_root / "broken" / "result.json").write_text("{}")
    report = make_report([runs_root], tmp_path / "rep", failed=[("runs/x/0", "RuntimeError: boom", "runs/x/0/run.log")])
    text = report.read_text()
    section = text.split("## Runs not included")[1]
    assert "broken" in section and "no accuracy_matrix" in section
    assert "runs/x/0: failed: RuntimeError: boom (log: runs/x/0/run.log)" in section
    assert "4 runs in 2 groups" in text


def test_only_bad_results_fail_naming_the_file(tmp_path: Path) -> None:
    from evaluation.report import NoRunsError

    (tmp_path / "r" / "0").mkdir(parents=True)
    (tmp_path / "r" / "0" / "result.json").write_text("{}")
    with pytest.raises(NoRunsError, match=r"no usable result\.json.*r/0/result\.json: skipped: not a run result"):
        make_report([tmp_path / "r"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["out_is_file", "out_under_file", "missing_path", "other_file"])
def test_cli_report_bad_input_is_one_line(case: str, runs_root: Path, tmp_path: Path, capsys) -> None:
    from cl.cli import main

    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    args = {
        "out_is_file": [str(runs_root), "--out", str(a_file)],
        "out_under_file": [str(runs_root), "--out", str(a_file / "rep")],
        "missing_path": [str(runs_root), str(tmp_path / "typo"), "--out", str(tmp_path / "rep")],
        "other_file": [str(a_file), "--out", str(tmp_path / "rep")],
    }[case]
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clsim: error: ")
    named = {"out_is_file": a_file, "out_under_file": a_file, "missing_path": tmp_path / "typo",
             "other_file": a_file}[case]
    assert str(named) in err[0]
    assert a_file.read_text() == "x" and not (tmp_path / "rep").exists()


def test_figure_groups_look_different_and_labels_drop_the_shared_prefix() -> None:
    from evaluation.report_figures import group_styles, short_labels

    for n in (3, 10, 15, 45):
        styles = [(s["color"], s["marker"]) for s in group_styles(n)]
        assert len(set(styles)) == n  # a sweep's 15 groups used to repeat tab10's colours
    labels = ["quickstart_finetune", "quickstart_sema__exp_threshold=0.5__init_lr=0.001", "quickstart_mos"]
    assert short_labels(labels) == {"quickstart_finetune": "finetune", "quickstart_mos": "mos",
                                    labels[1]: "sema exp_threshold=0.5 init_lr=0.001"}
    assert short_labels(["exp_a / sema"]) == {"exp_a / sema": "exp_a / sema"}  # one group: nothing to drop
    assert short_labels(["abc", "abd"]) == {"abc": "abc", "abd": "abd"}  # prefixes end at an underscore only
