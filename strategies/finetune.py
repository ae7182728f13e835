"""``finetune``: one adapter set and a growing linear head trained sequentially on each task.

The forgetting lower bound of adapter-based class-incremental learning ("FT Adapter" in SEMA's Table 1): no replay,
no regulariser, no expansion. By default the loss is CE over all seen classes (old-class logits are pushed down,
as in plain sequential fine-tuning); ``mask_old: true`` masks old classes as the PILOT-family methods do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from cl.adapters import adapter_name
from cl.config import StrategyConfig
from cl.heads import IncrementalLinear
from cl.mixture import Route
from cl.model import CLModel
from cl.strategy import Strategy, masked_cross_entropy, register_strategy
from cl.types import Batch, Phase, StepOutput, Stream, Task
from strategies._common import AdapterStrategyConfig, attach_set

if TYPE_CHECKING:
    from strategies.joint import JointConfig

__all__ = ["FinetuneConfig", "FinetuneStrategy"]


@dataclass(frozen=True)
class FinetuneConfig(AdapterStrategyConfig):
    """Attributes: mask_old (mask old-class logits in the CE); the adapter fields of AdapterStrategyConfig."""

    name: str = "finetune"
    mask_old: bool = False


@register_strategy("finetune")
class FinetuneStrategy(Strategy):
    config_cls: ClassVar[type[StrategyConfig]] = FinetuneConfig
    cfg: FinetuneConfig | JointConfig  # JointStrategy reuses this class with a JointConfig

    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        attach_set(model, self.cfg, adapter_name(0))
        model.set_route(Route.select(adapter_name(0)))
        model.heads["main"] = IncrementalLinear(model.spec.num_features).to(self.ctx.device)

    def before_task(self, model: CLModel, task: Task) -> None:
        model.head("main", IncrementalLinear).grow(task.num_classes)

    def frozen_prefix(self, model: CLModel) -> int:
        """Blocks before the first adapted one never change (0 when every block is adapted)."""
        return min(self.cfg.adapter_blocks) if self.cfg.adapter_blocks else 0

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        params = model.adapter_parameters() + list(model.heads["main"].parameters())
        yield Phase("adapters", params, self.cfg.epochs or self.ctx.train.epochs, lr=self.cfg.lr,
                    trainable_from=self.frozen_prefix(model))

    def loss_classes(self, stream: Stream, task: Task) -> int | None:
        return task.num_classes if self.cfg.mask_old else stream.seen_labels(task.task_id)

    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        task = self.ctx.task
        assert task is not None  # the loop sets ctx.task before training
        old = task.label_offset if self.cfg.mask_old else 0
        return StepOutput(masked_cross_entropy(model(batch.x), batch.y, self.ctx.num_seen, old))
