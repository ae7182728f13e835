"""``joint``: the upper bound. At task t the adapter set and head train on the union of tasks 0..t.

Deviation from a from-scratch joint model: the same adapter set keeps training across tasks (on the growing union),
which reaches the same regime for a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import ConcatDataset

from cl.adapters import adapter_name
from cl.heads import IncrementalLinear
from cl.mixture import Route
from cl.model import CLModel
from cl.strategy import Strategy, masked_cross_entropy, register_strategy
from cl.types import Batch, Phase, StepOutput, Stream, Task
from strategies._common import AdapterStrategyConfig, attach_set

__all__ = ["JointConfig", "JointStrategy"]


@dataclass(frozen=True)
class JointConfig(AdapterStrategyConfig):
    name: str = "joint"


@register_strategy("joint")
class JointStrategy(Strategy):
    config_cls = JointConfig
    cfg: JointConfig

    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        attach_set(model, self.cfg, adapter_name(0))
        model.set_route(Route.select(adapter_name(0)))
        model.heads["main"] = IncrementalLinear(model.spec.num_features).to(self.ctx.device)

    def before_task(self, model: CLModel, task: Task) -> None:
        model.heads["main"].grow(task.num_classes)

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        assert self.stream is not None
        union = ConcatDataset([t.train for t in self.stream.tasks[: task.task_id + 1]])
        params = model.adapter_parameters() + list(model.heads["main"].parameters())
        yield Phase("joint", params, self.cfg.epochs or self.ctx.train.epochs, data=union, lr=self.cfg.lr)

    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        return StepOutput(masked_cross_entropy(model(batch.x), batch.y, self.ctx.num_seen))
