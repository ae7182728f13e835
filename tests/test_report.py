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
