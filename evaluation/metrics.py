"""Continual-learning metrics as pure functions of the accuracy matrix (``specs/metrics.md``).

Conventions (metrics.md §1): ``accuracy_matrix`` is a T x T list of lists, ``accuracy_matrix[i-1][j-1]`` = R[i][j] =
accuracy on task j's test samples after training task i, over all classes seen so far. Entries with j > i are undefined
and stored as ``None`` (JSON ``null``) or NaN; rows may also be given ragged (row i holding only j <= i).
``n_test[j-1]`` = n_j, the number of test samples of task j. Functions are unit-agnostic (percent in clsim, fractions
in Avalanche): outputs carry the units of the input. Only the lower triangle (j <= i) is read, except by :func:`fwt`.

The functions returning one number return ``None`` where the quantity is undefined (e.g. forgetting with T = 1). The
functions registered in :data:`cl.registries.METRICS` are thin wrappers taking a ``result.json`` dictionary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cl.registries import METRICS

__all__ = [
    "Matrix",
    "a_avg",
    "a_avg_task_mean",
    "a_last",
    "a_last_task_mean",
    "acc_given_correct_task",
    "acc_new",
    "acc_old",
    "avalanche_stream_forgetting",
    "bwt",
    "compute_metrics",
    "forgetting",
    "forgetting_chaudhry",
    "forgetting_curve",
    "fwt",
    "stage_accuracy",
    "stage_accuracy_task_mean",
    "task_retrieval_accuracy",
    "task_retrieval_per_task",
    "to_array",
]

Matrix = Sequence[Sequence[float | None]]


# ----------------------------------------------------------------------------------------------------------------------
# array helpers


def to_array(accuracy_matrix: Matrix | np.ndarray) -> np.ndarray:
    """Convert an accuracy matrix to a square float array with NaN for undefined entries.

    Args:
        accuracy_matrix: T rows; row i (0-based) holds R[i+1][1..T], ``None``/NaN where undefined. Rows may be shorter
            than T (missing trailing entries are undefined).

    Returns:
        A (T, T) float64 array.

    Raises:
        ValueError: if the matrix is empty, a row is longer than T, or an entry of the lower triangle (j <= i) is
            missing.
    """
    rows = [list(row) for row in accuracy_matrix]
    num_tasks = len(rows)
    if num_tasks == 0:
        raise ValueError("accuracy_matrix is empty; expected T >= 1 rows")
    out = np.full((num_tasks, num_tasks), np.nan)
    for i, row in enumerate(rows):
        if len(row) > num_tasks:
            raise ValueError(f"accuracy_matrix row {i} has {len(row)} entries; expected at most T = {num_tasks}")
        out[i, : len(row)] = [np.nan if v is None else float(v) for v in row]
    lower = np.tril_indices(num_tasks)
    if np.isnan(out[lower]).any():
        i, j = next((int(a), int(b)) for a, b in zip(*lower, strict=True) if np.isnan(out[a, b]))
        raise ValueError(
            f"accuracy_matrix[{i}][{j}] (R[{i + 1}][{j + 1}]) is undefined; entries with j <= i are required"
        )
    return out


def _sizes(n_test: Sequence[float], num_tasks: int) -> np.ndarray:
    sizes = np.asarray(n_test, dtype=np.float64)
    if sizes.shape != (num_tasks,):
        raise ValueError(f"n_test has {sizes.size} entries; expected one per task (T = {num_tasks})")
    if (sizes <= 0).any():
        raise ValueError(f"n_test entries must be positive, got {list(n_test)}")
    return sizes


# ----------------------------------------------------------------------------------------------------------------------
# stage accuracy, A_last, average incremental accuracy (§2, §3)


def stage_accuracy(accuracy_matrix: Matrix, n_test: Sequence[float]) -> list[float]:
    """Sample-weighted stage accuracy (PILOT's ``total``), one value per stage.

    ``A_i^sw = sum_{j<=i} n_j R[i][j] / sum_{j<=i} n_j``

    Args:
        accuracy_matrix: R, T x T.
        n_test: n_j per task.

    Returns:
        ``[A_1^sw, ..., A_T^sw]``.
    """
    r = to_array(accuracy_matrix)
    sizes = _sizes(n_test, len(r))
    return [float(np.dot(sizes[: i + 1], r[i, : i + 1]) / sizes[: i + 1].sum()) for i in range(len(r))]


def stage_accuracy_task_mean(accuracy_matrix: Matrix) -> list[float]:
    """Task-mean stage accuracy, one value per stage.

    ``A_i^tm = (1/i) sum_{j<=i} R[i][j]``
    """
    r = to_array(accuracy_matrix)
    return [float(r[i, : i + 1].mean()) for i in range(len(r))]


def a_last(accuracy_matrix: Matrix, n_test: Sequence[float]) -> float:
    """Last accuracy, sample-weighted: ``A_last = A_T^sw``."""
    return stage_accuracy(accuracy_matrix, n_test)[-1]


def a_avg(accuracy_matrix: Matrix, n_test: Sequence[float]) -> float:
    """Average incremental accuracy, sample-weighted: ``A_avg = (1/T) sum_{i=1}^{T} A_i^sw`` (task 1 included)."""
    return float(np.mean(stage_accuracy(accuracy_matrix, n_test)))


def a_last_task_mean(accuracy_matrix: Matrix) -> float:
    """Last accuracy, task-mean (GEM's ACC): ``A_T^tm = (1/T) sum_j R[T][j]``."""
    return stage_accuracy_task_mean(accuracy_matrix)[-1]


def a_avg_task_mean(accuracy_matrix: Matrix) -> float:
    """Average incremental accuracy, task-mean: ``(1/T) sum_{i=1}^{T} A_i^tm``."""
    return float(np.mean(stage_accuracy_task_mean(accuracy_matrix)))


# ----------------------------------------------------------------------------------------------------------------------
# forgetting, backward and forward transfer (§4, §5, §7)


def forgetting(accuracy_matrix: Matrix, stage: int | None = None) -> float | None:
    """Average forgetting, PILOT / MOS definition (clsim's ``forgetting``).

    ``F_k = (1/(k-1)) sum_{j=1}^{k-1} [ max_{i=j..k} R[i][j] - R[k][j] ]``

    The max includes the final stage k, so every term is >= 0 (equivalently PILOT's max over all i with R~[i][j] = 0
    for i < j, accuracies being non-negative).

    Args:
        accuracy_matrix: R, T x T.
        stage: k, 1-based; defaults to T. Uses the leading k x k block.

    Returns:
        ``F_k``, or ``None`` when k = 1.
    """
    r = to_array(accuracy_matrix)
    k = len(r) if stage is None else _check_stage(stage, len(r))
    if k < 2:
        return None
    terms = [r[j:k, j].max() - r[k - 1, j] for j in range(k - 1)]
    return float(np.mean(terms))


def forgetting_chaudhry(accuracy_matrix: Matrix) -> float | None:
    """Average forgetting, Chaudhry et al. (2018): the max excludes the final stage.

    ``F = (1/(T-1)) sum_{j=1}^{T-1} [ max_{i=j..T-1} R[i][j] - R[T][j] ]``  (terms may be negative)

    Returns:
        ``F``, or ``None`` when T = 1.
    """
    r = to_array(accuracy_matrix)
    num_tasks = len(r)
    if num_tasks < 2:
        return None
    terms = [r[j : num_tasks - 1, j].max() - r[num_tasks - 1, j] for j in range(num_tasks - 1)]
    return float(np.mean(terms))


def forgetting_curve(accuracy_matrix: Matrix) -> list[float | None]:
    """PILOT forgetting after every stage: ``[None, F_2, ..., F_T]`` (see :func:`forgetting`)."""
    num_tasks = len(to_array(accuracy_matrix))
    return [forgetting(accuracy_matrix, stage=k) for k in range(1, num_tasks + 1)]


def bwt(accuracy_matrix: Matrix) -> float | None:
    """Backward transfer (GEM; negative = forgetting).

    ``BWT = (1/(T-1)) sum_{j=1}^{T-1} ( R[T][j] - R[j][j] )``

    Returns:
        ``BWT``, or ``None`` when T = 1.
    """
    r = to_array(accuracy_matrix)
    num_tasks = len(r)
    if num_tasks < 2:
        return None
    return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def fwt(accuracy_matrix: Matrix, initial_accuracy: Sequence[float | None] | None = None) -> float | None:
    """Forward transfer (GEM); defined only under a protocol that evaluates future tasks (metrics.md §7).

    ``FWT = (1/(T-1)) sum_{j=2}^{T} ( R[j-1][j] - b_j )``, b_j = accuracy of the initial (untrained) model on task j.

    Args:
        accuracy_matrix: R with the super-diagonal R[j-1][j] filled (``eval.future_tasks: true``).
        initial_accuracy: ``[b_1, ..., b_T]`` (b_1 is unused and may be ``None``).

    Returns:
        ``FWT``; ``None`` when T = 1, when ``initial_accuracy`` is not given, or when any R[j-1][j] or b_j (j >= 2)
        is undefined (class-incremental heads cannot predict unseen classes).
    """
    r = to_array(accuracy_matrix)
    num_tasks = len(r)
    if num_tasks < 2 or initial_accuracy is None:
        return None
    if len(initial_accuracy) != num_tasks:
        raise ValueError(
            f"initial_accuracy has {len(initial_accuracy)} entries; expected one per task (T = {num_tasks})"
        )
    base = np.array([np.nan if b is None else float(b) for b in initial_accuracy[1:]])
    before = np.array([r[j - 1, j] for j in range(1, num_tasks)])
    if np.isnan(base).any() or np.isnan(before).any():
        return None
    return float(np.mean(before - base))


def _check_stage(stage: int, num_tasks: int) -> int:
    if not 1 <= stage <= num_tasks:
        raise ValueError(f"stage must be in 1..{num_tasks} (1-based), got {stage}")
    return stage


# ----------------------------------------------------------------------------------------------------------------------
# old / new accuracy (§6)


def acc_old(accuracy_matrix: Matrix, n_test: Sequence[float]) -> list[float | None]:
    """Accuracy on the previously learned tasks, per stage.

    ``acc_old(i) = sum_{j<i} n_j R[i][j] / sum_{j<i} n_j`` for i >= 2; ``None`` at i = 1 (PILOT prints 0 there).
    """
    r = to_array(accuracy_matrix)
    sizes = _sizes(n_test, len(r))
    out: list[float | None] = [None]
    out += [float(np.dot(sizes[:i], r[i, :i]) / sizes[:i].sum()) for i in range(1, len(r))]
    return out


def acc_new(accuracy_matrix: Matrix) -> list[float]:
    """Accuracy on the task just learned, per stage: ``acc_new(i) = R[i][i]``."""
    return [float(v) for v in np.diag(to_array(accuracy_matrix))]


# ----------------------------------------------------------------------------------------------------------------------
# task retrieval (§8), from per-sample arrays


def _task_arrays(true_task: Sequence[int], pred_task: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    true_arr, pred_arr = np.asarray(true_task), np.asarray(pred_task)
    if true_arr.shape != pred_arr.shape or true_arr.ndim != 1:
        raise ValueError(f"true_task and pred_task must be 1-d of equal length, got {true_arr.shape}, {pred_arr.shape}")
    return true_arr, pred_arr


def task_retrieval_accuracy(true_task: Sequence[int], pred_task: Sequence[int]) -> float | None:
    """Task-retrieval accuracy TRA(i) in percent, over the given test samples (those of tasks <= i).

    ``TRA(i) = (100/N_i) sum_x 1[t_hat(x) = t(x)]``

    Args:
        true_task: t(x), the task that introduced each sample's class.
        pred_task: t_hat(x), the inferred task.

    Returns:
        Percent, or ``None`` for no samples.
    """
    true_arr, pred_arr = _task_arrays(true_task, pred_task)
    if true_arr.size == 0:
        return None
    return 100.0 * int(np.count_nonzero(true_arr == pred_arr)) / true_arr.size


def task_retrieval_per_task(true_task: Sequence[int], pred_task: Sequence[int], num_tasks: int) -> list[float | None]:
    """One row of the task-retrieval matrix, in percent: TRA[i][j] for j = 0 .. num_tasks - 1 (0-based task ids).

    ``TRA[i][j] = (100/n_j) sum_{x in test of task j} 1[t_hat(x) = t(x)]``; ``None`` for a task without samples.
    Stacking the rows of stages 1..T gives a matrix with the layout of R; its sample-weighted stage mean
    (:func:`stage_accuracy`) is TRA(i).
    """
    true_arr, pred_arr = _task_arrays(true_task, pred_task)
    out: list[float | None] = []
    for j in range(num_tasks):
        mask = true_arr == j
        out.append(100.0 * int(np.count_nonzero(pred_arr[mask] == j)) / int(mask.sum()) if mask.any() else None)
    return out


def acc_given_correct_task(true_task: Sequence[int], pred_task: Sequence[int], correct: Sequence[bool]) -> float | None:
    """Class accuracy in percent over the samples whose task was inferred correctly.

    ``acc_given_correct_task(i) = 100 * sum_x 1[correct(x)] 1[t_hat = t] / sum_x 1[t_hat = t]``

    Returns:
        Percent, or ``None`` if no sample had its task inferred correctly.
    """
    true_arr, pred_arr = _task_arrays(true_task, pred_task)
    correct_arr = np.asarray(correct, dtype=bool)
    if correct_arr.shape != true_arr.shape:
        raise ValueError(f"correct has shape {correct_arr.shape}; expected {true_arr.shape}")
    hit = true_arr == pred_arr
    if not hit.any():
        return None
    return 100.0 * int(np.count_nonzero(correct_arr[hit])) / int(hit.sum())


# ----------------------------------------------------------------------------------------------------------------------
# Avalanche (§10)


def avalanche_stream_forgetting(accuracy_matrix: Matrix, stage: int | None = None) -> float | None:
    """Avalanche 0.6.0 ``StreamForgetting`` after training stage i (for the Avalanche oracle tests).

    ``StreamForgetting(i) = (1/(i-1)) sum_{j<i} ( R[j][j] - R[i][j] )``: accuracy right after training j minus the
    latest, not the max. At i = T it equals ``-BWT`` (GEM); it is neither PILOT's nor Chaudhry's forgetting.
    ``StreamBWT(i) = -StreamForgetting(i)``. Avalanche reports fractions: pass ``R / 100`` to compare numbers.

    Args:
        accuracy_matrix: R, T x T.
        stage: i, 1-based; defaults to T.

    Returns:
        The value, or ``None`` when i = 1 (Avalanche emits nothing then).
    """
    r = to_array(accuracy_matrix)
    i = len(r) if stage is None else _check_stage(stage, len(r))
    if i < 2:
        return None
    return float(np.mean(np.diag(r)[: i - 1] - r[i - 1, : i - 1]))


# ----------------------------------------------------------------------------------------------------------------------
# everything at once


def compute_metrics(
    accuracy_matrix: Matrix, n_test: Sequence[float], initial_accuracy: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """All accuracy-matrix metrics as a JSON-ready dictionary (the ``metrics`` field of ``result.json``).

    Args:
        accuracy_matrix: R, T x T, percent.
        n_test: n_j per task.
        initial_accuracy: b_j of the initial model, only for :func:`fwt`.

    Returns:
        Keys ``a_last, a_avg, a_last_task_mean, a_avg_task_mean, forgetting, forgetting_chaudhry, forgetting_curve,
        bwt, fwt, stage_accuracy, stage_accuracy_task_mean, acc_old, acc_new``; values are floats, ``None`` or lists.
    """
    sw = stage_accuracy(accuracy_matrix, n_test)
    tm = stage_accuracy_task_mean(accuracy_matrix)
    return {
        "a_last": sw[-1],
        "a_avg": float(np.mean(sw)),
        "a_last_task_mean": tm[-1],
        "a_avg_task_mean": float(np.mean(tm)),
        "forgetting": forgetting(accuracy_matrix),
        "forgetting_chaudhry": forgetting_chaudhry(accuracy_matrix),
        "forgetting_curve": forgetting_curve(accuracy_matrix),
        "bwt": bwt(accuracy_matrix),
        "fwt": fwt(accuracy_matrix, initial_accuracy),
        "stage_accuracy": sw,
        "stage_accuracy_task_mean": tm,
        "acc_old": acc_old(accuracy_matrix, n_test),
        "acc_new": acc_new(accuracy_matrix),
    }


# ----------------------------------------------------------------------------------------------------------------------
# registered metrics: thin wrappers over a result.json dictionary


def _matrix(r: Mapping[str, Any]) -> Matrix:
    return r["accuracy_matrix"]


def _n_test(r: Mapping[str, Any]) -> list[float]:
    return [task["n_test"] for task in r["tasks"]]


@METRICS.register("a_last")
def _a_last_of(r: Mapping[str, Any]) -> float:
    """:func:`a_last` of a result dictionary (``A_T^sw``)."""
    return a_last(_matrix(r), _n_test(r))


@METRICS.register("a_avg")
def _a_avg_of(r: Mapping[str, Any]) -> float:
    """:func:`a_avg` of a result dictionary (``(1/T) sum_i A_i^sw``)."""
    return a_avg(_matrix(r), _n_test(r))


@METRICS.register("a_last_task_mean")
def _a_last_task_mean_of(r: Mapping[str, Any]) -> float:
    """:func:`a_last_task_mean` of a result dictionary (``A_T^tm``)."""
    return a_last_task_mean(_matrix(r))


@METRICS.register("a_avg_task_mean")
def _a_avg_task_mean_of(r: Mapping[str, Any]) -> float:
    """:func:`a_avg_task_mean` of a result dictionary (``(1/T) sum_i A_i^tm``)."""
    return a_avg_task_mean(_matrix(r))


@METRICS.register("forgetting")
def _forgetting_of(r: Mapping[str, Any]) -> float | None:
    """:func:`forgetting` (PILOT) of a result dictionary."""
    return forgetting(_matrix(r))


@METRICS.register("forgetting_chaudhry")
def _forgetting_chaudhry_of(r: Mapping[str, Any]) -> float | None:
    """:func:`forgetting_chaudhry` of a result dictionary."""
    return forgetting_chaudhry(_matrix(r))


@METRICS.register("forgetting_curve")
def _forgetting_curve_of(r: Mapping[str, Any]) -> list[float | None]:
    """:func:`forgetting_curve` of a result dictionary."""
    return forgetting_curve(_matrix(r))


@METRICS.register("bwt")
def _bwt_of(r: Mapping[str, Any]) -> float | None:
    """:func:`bwt` of a result dictionary."""
    return bwt(_matrix(r))


@METRICS.register("fwt")
def _fwt_of(r: Mapping[str, Any]) -> float | None:
    """:func:`fwt` of a result dictionary; ``None`` unless it holds ``initial_accuracy`` (b_j per task)."""
    return fwt(_matrix(r), r.get("initial_accuracy"))


@METRICS.register("stage_accuracy")
def _stage_accuracy_of(r: Mapping[str, Any]) -> list[float]:
    """:func:`stage_accuracy` (sample-weighted) of a result dictionary."""
    return stage_accuracy(_matrix(r), _n_test(r))


@METRICS.register("stage_accuracy_task_mean")
def _stage_accuracy_task_mean_of(r: Mapping[str, Any]) -> list[float]:
    """:func:`stage_accuracy_task_mean` of a result dictionary."""
    return stage_accuracy_task_mean(_matrix(r))


@METRICS.register("acc_old")
def _acc_old_of(r: Mapping[str, Any]) -> list[float | None]:
    """:func:`acc_old` of a result dictionary."""
    return acc_old(_matrix(r), _n_test(r))


@METRICS.register("acc_new")
def _acc_new_of(r: Mapping[str, Any]) -> list[float]:
    """:func:`acc_new` of a result dictionary."""
    return acc_new(_matrix(r))


@METRICS.register("task_retrieval_accuracy")
def _task_retrieval_accuracy_of(r: Mapping[str, Any]) -> float | None:
    """Final TRA(T) of a result dictionary: sample-weighted mean of the last row of ``task_retrieval.accuracy_matrix``.

    ``None`` for strategies that do not infer a task id (``task_retrieval`` is null).
    """
    retrieval = r.get("task_retrieval")
    if not retrieval or retrieval.get("accuracy_matrix") is None:
        return None
    return stage_accuracy(retrieval["accuracy_matrix"], _n_test(r))[-1]
