"""clsim statistics as Avalanche ``PluginMetric``s (see :mod:`cl.integrations.avalanche`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

with warnings.catch_warnings():  # avalanche warns at import that the optional QP solver (GEM) is missing
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.evaluation import PluginMetric
    from avalanche.evaluation.metric_results import MetricValue

if TYPE_CHECKING:
    from cl.integrations.avalanche.strategy import ClsimStrategy

__all__ = ["ExpansionMetric", "TaskRetrievalMetric"]


class ExpansionMetric(PluginMetric[dict]):
    """After each training experience: ``clsim/adapters_total`` (sum over blocks of K_b),
    ``clsim/adapters_per_layer/BlockXX``, ``clsim/deployed_params``, ``clsim/trained_params``.
    x = the experience index (clsim trains outside Avalanche's iteration counter)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, int] = {}

    def reset(self) -> None:
        self._last = {}

    def result(self) -> dict[str, int]:
        return dict(self._last)

    def after_training_exp(self, strategy: ClsimStrategy) -> list[MetricValue]:
        model, sess = strategy.model, strategy.session
        per_block = model.adapters_per_block()
        vals = {"clsim/adapters_total": sum(per_block),
                "clsim/deployed_params": int(sess.strategy.expansion_info(model)["deployed_params"]),
                "clsim/trained_params": strategy.trained_params[-1] if strategy.trained_params else 0}
        vals.update({f"clsim/adapters_per_layer/Block{b:02d}": k for b, k in enumerate(per_block)})
        self._last = vals
        x = strategy.clock.train_exp_counter
        return [MetricValue(self, k, v, x) for k, v in vals.items()]

    def __str__(self) -> str:
        return "clsim/expansion"


class TaskRetrievalMetric(PluginMetric[float]):
    """Task-retrieval accuracy (fraction) over the evaluated samples of trained classes, for strategies whose
    ``predict`` returns a :class:`~cl.types.Prediction` with ``task_pred``; emitted after each ``eval`` as
    ``clsim/task_retrieval_acc/eval_phase/<stream>_stream``. Nothing is emitted for other strategies."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._correct, self._total = 0, 0

    def result(self) -> float | None:
        return self._correct / self._total if self._total else None

    def before_eval(self, strategy: ClsimStrategy) -> None:
        self.reset()

    def after_eval_iteration(self, strategy: ClsimStrategy) -> None:
        pred = strategy.last_prediction
        if pred is None or pred.task_pred is None:
            return
        true = strategy.true_tasks(strategy.mb_y)
        seen = true >= 0
        self._correct += int((pred.task_pred.to(true.device)[seen] == true[seen]).sum())
        self._total += int(seen.sum())

    def after_eval(self, strategy: ClsimStrategy) -> list[MetricValue] | None:
        acc = self.result()
        if acc is None:
            return None
        name = strategy.experience.origin_stream.name
        return [MetricValue(self, f"clsim/task_retrieval_acc/eval_phase/{name}_stream", acc,
                            strategy.clock.train_exp_counter)]

    def __str__(self) -> str:
        return "clsim/task_retrieval_acc"
