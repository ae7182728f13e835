"""``joint``: the upper bound. At task t the adapter set and head train on the union of tasks 0..t.

Shares ``finetune``'s model (one adapter set, a growing linear head); only the data differs. Deviation from a
from-scratch joint model: the same adapter set keeps training across tasks (on the growing union), which reaches
the same regime for a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import ConcatDataset

from cl.model import CLModel
from cl.strategy import register_strategy
from cl.types import Phase, Task
from strategies._common import AdapterStrategyConfig
from strategies.finetune import FinetuneStrategy

__all__ = ["JointConfig", "JointStrategy"]


@dataclass(frozen=True)
class JointConfig(AdapterStrategyConfig):
    name: str = "joint"
    mask_old: bool = False  # never masked: old classes are in the training data


@register_strategy("joint")
class JointStrategy(FinetuneStrategy):
    config_cls = JointConfig

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        assert self.stream is not None
        seen = [t.train for t in self.stream.tasks[: task.task_id + 1]]
        union: ConcatDataset[tuple[Tensor, int]] = ConcatDataset(seen)
        params = model.adapter_parameters() + list(model.heads["main"].parameters())
        yield Phase("joint", params, self.cfg.epochs or self.ctx.train.epochs, data=union, lr=self.cfg.lr,
                    trainable_from=self.frozen_prefix(model))
