"""Classifier heads: a linear head that grows as classes arrive, a cosine head, and a prototype classifier."""

from __future__ import annotations

import math
from typing import TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IncrementalLinear", "CosineHead", "PrototypeHead", "TaskHeads", "head_from_spec"]


class IncrementalLinear(nn.Module):
    """Linear head over all classes seen so far; :meth:`grow` appends rows and keeps the old ones.

    New rows use Kaiming-uniform (a = sqrt(5)) weights and zero bias (SEMA/PILOT's ``Linear`` init).
    """

    def __init__(self, in_features: int, out_features: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None
        if out_features:
            self.grow(out_features)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def grow(self, n_new: int, generator: torch.Generator | None = None) -> None:
        w = torch.empty(n_new, self.in_features, device=self.weight.device)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
        w.uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            b = torch.zeros(n_new, device=self.bias.device)
            self.bias = nn.Parameter(torch.cat([self.bias.data, b]), requires_grad=self.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def spec(self) -> dict:
        return {
            "type": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }


class CosineHead(IncrementalLinear):
    """Cosine classifier: ``sigma * cos(x, w_c)`` (SimpleCIL/PILOT ``CosineLinear``); ``sigma`` learnable or fixed."""

    def __init__(self, in_features: int, out_features: int = 0, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learn_sigma)

    def forward(self, x: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))

    def spec(self) -> dict:
        return {"type": "cosine", "in_features": self.in_features, "out_features": self.out_features}


class PrototypeHead(nn.Module):
    """Prototype (class-mean) classifier. ``metric='cosine'`` gives cosine scores, ``'euclidean'`` negative distances.

    Prototypes are buffers (never trained); :meth:`set_prototypes` writes rows for the given labels, growing as needed.
    """

    prototypes: Tensor  # a buffer

    def __init__(self, in_features: int, metric: str = "cosine") -> None:
        super().__init__()
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric={metric!r}; valid choices: cosine, euclidean")
        self.in_features = in_features
        self.metric = metric
        self.register_buffer("prototypes", torch.zeros(0, in_features))

    @property
    def out_features(self) -> int:
        return self.prototypes.shape[0]

    def set_prototypes(self, labels: Tensor, means: Tensor) -> None:
        need = int(labels.max()) + 1 if labels.numel() else 0
        if need > self.out_features:
            extra = torch.zeros(need - self.out_features, self.in_features, device=self.prototypes.device)
            self.prototypes = torch.cat([self.prototypes, extra])
        self.prototypes[labels.to(self.prototypes.device)] = means.to(self.prototypes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.metric == "cosine":
            return F.normalize(x, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return -torch.cdist(x, self.prototypes).pow(2)

    def spec(self) -> dict:
        return {
            "type": "prototype",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "metric": self.metric,
        }


class TaskHeads(nn.Module):
    """One linear head per task over that task's classes; ``forward`` concatenates the logits of every task head.

    LAE's ``DynamicSimpleHead`` (gqk/LAE ``libml/model/head/dynamic_simple.py``) and MHR-CIL's per-task heads
    (mhr.md B.3). Task ``t``'s logits are columns :meth:`task_slice` ``(t)`` of the output, so a task's head can be
    trained, frozen and excluded from weight decay on its own (:meth:`task_parameters`).

    Args:
        in_features: feature width d.
        init_std: ``None`` = ``nn.Linear``'s default init; otherwise weights ~ N(0, init_std^2) and zero bias (LAE:
            0.001).
        bias: whether the task heads have a bias.
    """

    def __init__(self, in_features: int, init_std: float | None = None, bias: bool = True) -> None:
        super().__init__()
        if init_std is not None and not init_std > 0:
            raise ValueError(f"init_std must be positive or None, got {init_std}")
        self.in_features = in_features
        self.init_std = init_std
        self.bias = bias
        self.heads = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    @property
    def sizes(self) -> list[int]:
        return [cast(nn.Linear, h).out_features for h in self.heads]

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def add_task(self, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Append the head of a new task with ``num_classes`` outputs; returns it (trainable)."""
        if num_classes <= 0:
            raise ValueError(f"a task head needs at least one class, got {num_classes}")
        device = next(iter(self.parameters()), torch.empty(0)).device
        head = nn.Linear(self.in_features, num_classes, bias=self.bias, device=device)
        if self.init_std is not None:
            with torch.no_grad():
                head.weight.normal_(0.0, self.init_std, generator=generator)
                if head.bias is not None:
                    head.bias.zero_()
        self.heads.append(head)
        return head

    def task_slice(self, task_id: int) -> slice:
        """Columns of task ``task_id`` in the concatenated logits."""
        start = sum(self.sizes[:task_id])
        return slice(start, start + self.sizes[task_id])

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return list(self.heads[task_id].parameters())

    def forward(self, x: Tensor) -> Tensor:
        """``(B, d) -> (B, sum of task sizes)``: every task head's logits, in task order."""
        if not len(self.heads):
            return x.new_zeros(x.shape[0], 0)
        return torch.cat([cast(nn.Linear, h)(x) for h in self.heads], dim=-1)

    def spec(self) -> dict:
        return {"type": "task_linear", "in_features": self.in_features, "sizes": self.sizes, "bias": self.bias,
                "init_std": self.init_std}


#: what ``CLModel.heads`` holds (``CosineHead`` is an ``IncrementalLinear``)
Head: TypeAlias = IncrementalLinear | PrototypeHead | TaskHeads


def head_from_spec(spec: dict) -> Head:
    """Rebuild an (empty-valued) head of the right shape from :meth:`spec` (checkpoint resume)."""
    kind = spec["type"]
    if kind == "linear":
        return IncrementalLinear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
    if kind == "cosine":
        return CosineHead(spec["in_features"], spec["out_features"])
    if kind == "task_linear":
        heads = TaskHeads(spec["in_features"], spec.get("init_std"), bias=spec.get("bias", True))
        for n in spec["sizes"]:
            heads.add_task(n)
        return heads
    if kind == "prototype":
        head = PrototypeHead(spec["in_features"], spec.get("metric", "cosine"))
        head.prototypes = torch.zeros(spec["out_features"], spec["in_features"])
        return head
    raise ValueError(f"unknown head type {kind!r}; valid choices: linear, cosine, prototype, task_linear")
