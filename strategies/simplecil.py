"""``simplecil``: frozen backbone + prototype (class-mean) classifier, no training.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are
All You Need" (IJCV 2024, arXiv 2303.07338), SimpleCIL: class prototypes of the frozen pre-trained features replace
the classifier; prediction by cosine similarity. Features are computed with the eval transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cl.config import StrategyConfig
from cl.heads import PrototypeHead
from cl.model import CLModel
from cl.strategy import Strategy, register_strategy
from cl.types import Stream, Task

__all__ = ["SimplecilConfig", "SimplecilStrategy"]


@dataclass(frozen=True)
class SimplecilConfig(StrategyConfig):
    name: str = "simplecil"
    metric: Literal["cosine", "euclidean"] = "cosine"


@register_strategy("simplecil")
class SimplecilStrategy(Strategy):
    config_cls = SimplecilConfig
    cfg: SimplecilConfig

    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        model.heads["proto"] = PrototypeHead(model.spec.num_features, self.cfg.metric).to(self.ctx.device)

    def loss_classes(self, stream: Stream, task: Task) -> int | None:
        return None  # nothing is trained: prototypes only

    def after_task(self, model: CLModel, task: Task) -> None:
        feats, labels = self.ctx.extract(model, task.train.view("eval"), desc=f"prototypes task {task.task_id}")
        uniq = labels.unique()
        means = torch.stack([feats[labels == c].mean(0) for c in uniq])
        model.head("proto", PrototypeHead).set_prototypes(uniq, means)

    def frozen_prefix(self, model: CLModel) -> int:
        """Nothing ever trains: test-set features are computed once per run (``train.cache: auto``)."""
        return len(model.backbone.blocks)

    def predict(self, model: CLModel, x: Tensor) -> Tensor:
        return model.heads["proto"](model.features(x))[:, : self.ctx.num_seen]
