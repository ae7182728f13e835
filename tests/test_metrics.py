"""The worked examples of specs/metrics.md, verbatim (null entries included)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import evaluation  # noqa: F401  (registers the metrics)
from cl.registries import METRICS
from evaluation import metrics as m

# metrics.md §1: T = 3, percent, n = (100, 50, 50)
R = [[90.0, None, None], [80.0, 70.0, None], [85.0, 72.0, 60.0]]
N = [100, 50, 50]


def approx(value: float) -> pytest.approx:
    return pytest.approx(value, abs=1e-4)


def test_to_array_nan_for_null_and_ragged_rows() -> None:
    a = m.to_array(R)
    assert a.shape == (3, 3)
    assert np.isnan(a[0, 1]) and np.isnan(a[0, 2]) and np.isnan(a[1, 2])
    np.testing.assert_array_equal(m.to_array([[90.0], [80.0, 70.0], [85.0, 72.0, 60.0]]), a, strict=False)
    np.testing.assert_array_equal(m.to_array([[90.0, float("nan")], [80.0, 70.0]])[1], [80.0, 70.0])


def test_to_array_rejects_missing_lower_triangle() -> None:
    with pytest.raises(ValueError, match=r"R\[2\]\[1\]"):
        m.to_array([[90.0, None], [None, 70.0]])
    with pytest.raises(ValueError, match="empty"):
        m.to_array([])


def test_stage_accuracy_both_variants() -> None:  # §2
    assert m.stage_accuracy(R, N) == [approx(90), approx(76.6667), approx(75.5)]
    assert m.stage_accuracy_task_mean(R) == [approx(90), approx(75), approx(72.3333)]
    assert m.a_last(R, N) == approx(75.5)
    assert m.a_last_task_mean(R) == approx(72.3333)


def test_variants_coincide_for_equal_test_sizes() -> None:
    assert m.stage_accuracy(R, [50, 50, 50]) == pytest.approx(m.stage_accuracy_task_mean(R))


def test_average_incremental_accuracy() -> None:  # §3
    assert m.a_avg(R, N) == approx(80.7222)
    assert m.a_avg_task_mean(R) == approx(79.1111)


def test_forgetting_pilot_and_chaudhry() -> None:  # §4
    assert m.forgetting(R) == approx(2.5)
    assert m.forgetting_chaudhry(R) == approx(1.5)
    assert m.forgetting(R, stage=2) == approx(10)
    assert m.forgetting_curve(R) == [None, approx(10), approx(2.5)]


def test_bwt() -> None:  # §5
    assert m.bwt(R) == approx(-1.5)


def test_old_new_accuracy() -> None:  # §6
    assert m.acc_old(R, N) == [None, approx(80), approx(80.6667)]
    assert m.acc_new(R) == [approx(90), approx(70), approx(60)]


def test_fwt_none_without_future_protocol() -> None:  # §7
    assert m.fwt(R) is None
    assert m.fwt(R, [None, 10.0, 10.0]) is None  # R[1][2], R[2][3] are null in class-incremental learning


def test_fwt_future_protocol_example() -> None:  # §7
    future = [[90.0, 10.0, 5.0], [80.0, 70.0, 20.0], [85.0, 72.0, 60.0]]
    assert m.fwt(future, [None, 10.0, 10.0]) == approx(5)
    # the future entries do not change the other metrics
    assert m.compute_metrics(future, N, [None, 10.0, 10.0]) == {**m.compute_metrics(R, N), "fwt": approx(5)}


def test_task_retrieval_example() -> None:  # §8, stage 3, tasks 1..3 -> ids 0..2
    true_task = [0, 0, 1, 1, 2, 2]
    pred_task = [0, 1, 1, 1, 2, 0]
    correct = [True, False, True, False, True, False]
    assert m.task_retrieval_accuracy(true_task, pred_task) == approx(66.6667)
    assert m.task_retrieval_per_task(true_task, pred_task, num_tasks=3) == [approx(50), approx(100), approx(50)]
    assert 100 * np.mean(correct) == approx(50)
    assert m.acc_given_correct_task(true_task, pred_task, correct) == approx(75)
    # TRA(i) is the sample-weighted stage mean of the TRA matrix row
    row = m.task_retrieval_per_task(true_task, pred_task, num_tasks=3)
    assert m.stage_accuracy([[100.0, None, None], [100.0, 100.0, None], row], [2, 2, 2])[-1] == approx(66.6667)


def test_task_retrieval_edge_cases() -> None:
    assert m.task_retrieval_accuracy([], []) is None
    assert m.task_retrieval_per_task([0, 0], [0, 1], num_tasks=2) == [50.0, None]
    assert m.acc_given_correct_task([0, 1], [1, 0], [True, True]) is None
    with pytest.raises(ValueError):
        m.task_retrieval_accuracy([0, 1], [0])


def test_single_task_edge_case() -> None:
    out = m.compute_metrics([[88.0]], [10])
    assert out["a_last"] == out["a_avg"] == out["a_last_task_mean"] == out["a_avg_task_mean"] == 88.0
    for key in ("forgetting", "forgetting_chaudhry", "bwt", "fwt"):
        assert out[key] is None
    assert out["forgetting_curve"] == [None]
    assert out["acc_old"] == [None] and out["acc_new"] == [88.0]


def test_compute_metrics_keys_and_json_ready() -> None:
    out = m.compute_metrics(R, N)
    assert set(out) == {
        "a_last", "a_avg", "a_last_task_mean", "a_avg_task_mean", "forgetting", "forgetting_chaudhry",
        "forgetting_curve", "bwt", "fwt", "stage_accuracy", "stage_accuracy_task_mean", "acc_old", "acc_new",
    }  # fmt: skip
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["a_last"] == approx(75.5) and out["forgetting"] == approx(2.5) and out["fwt"] is None


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="n_test"):
        m.stage_accuracy(R, [100, 50])
    with pytest.raises(ValueError, match="stage"):
        m.forgetting(R, stage=4)


def test_registered_metrics_read_result_dict() -> None:
    result = {"accuracy_matrix": R, "tasks": [{"id": j, "n_test": n} for j, n in enumerate(N)], "task_retrieval": None}
    expected = m.compute_metrics(R, N)
    for key, value in expected.items():
        assert METRICS.get(key)(result) == value, key
    assert METRICS.get("task_retrieval_accuracy")(result) is None
    result["task_retrieval"] = {"accuracy_matrix": [[100.0, None, None], [90.0, 80.0, None], [50.0, 100.0, 50.0]]}
    assert METRICS.get("task_retrieval_accuracy")(result) == approx(62.5)


# metrics.md §10, Avalanche 0.6.0 in fractions


def test_avalanche_stream_forgetting_example() -> None:
    frac = [[None if v is None else v / 100 for v in row] for row in R]
    assert m.avalanche_stream_forgetting(frac, stage=1) is None
    assert m.avalanche_stream_forgetting(frac, stage=2) == approx(0.10)
    assert m.avalanche_stream_forgetting(frac) == approx(0.015)
    assert m.forgetting(frac) == approx(0.025)  # PILOT F differs
    assert -m.avalanche_stream_forgetting(frac) == approx(-0.015)  # StreamBWT


@pytest.mark.parametrize("seed", range(5))
def test_avalanche_stream_forgetting_at_t_is_minus_bwt(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_tasks = int(rng.integers(2, 8))
    r = np.tril(rng.uniform(0, 100, (num_tasks, num_tasks)))
    r[np.triu_indices(num_tasks, 1)] = np.nan
    mat = [[None if math.isnan(v) else float(v) for v in row] for row in r]
    assert m.avalanche_stream_forgetting(mat) == pytest.approx(-m.bwt(mat))
    # PILOT's max over stages bounds it from above and is never negative
    assert m.forgetting(mat) >= m.avalanche_stream_forgetting(mat) - 1e-9
    assert m.forgetting(mat) >= 0


def test_avalanche_accuracy_on_trained_experiences_is_stage_accuracy() -> None:
    frac = [[None if v is None else v / 100 for v in row] for row in R]
    assert m.stage_accuracy(frac, N)[1] == approx(0.766667)
    # Top1_Acc_Stream on the full stream counts task-3 samples as errors
    top1_stream = np.average([0.80, 0.70, 0.0], weights=N)
    assert top1_stream == approx(0.575)
