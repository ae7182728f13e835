"""How a site combines its adapters: routes (off / sum / select / soft / per-sample) and the expandable router.

The strategy decides *when* to expand and which route a site uses; this module decides *how* the adapters combine.
Routes reach the sites through ``CLModel.routing(...)`` (a context manager) or ``site.route`` (persistent), never
through a changed timm ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

__all__ = ["Route", "ExpandableRouter", "mix"]

RouteKind = Literal["off", "sum", "select", "soft", "per_sample", "skills"]
SkillMode = Literal["rows", "soft", "mu", "arrow"]


@dataclass(frozen=True)
class Route:
    """A routing decision for one site.

    Attributes:
        kind: ``off`` (no adapter), ``sum`` (sum of ``names`` or of all adapters), ``select`` (the single adapter
            ``names[0]``), ``soft`` (weights per sample: ``weights`` (B, K) if given, else softmax of the site's
            router over ``names`` or all adapters), ``per_sample`` (sample b uses adapter ``names[index[b]]``),
            ``skills`` (the skill-inventory adapter ``names[0]`` mixes its own skills, ``skill_mode``).
        names: adapter names the route refers to (order matters for ``soft`` and ``per_sample``).
        index: ``(B,)`` long tensor for ``per_sample``; for ``skills`` / ``rows``: the routing row of each sample
            (-1 = uniform μ).
        weights: ``(B, K)`` mixture weights for ``soft`` (overrides the router); for ``skills`` / ``soft``: ``(B, R)``
            per-sample weights over the adapter's R routing rows.
        skill_mode: ``skills`` routes only: ``rows``, ``soft``, ``mu`` (uniform over all skills) or ``arrow``
            (task-free per-token routing); see ``cl.adapters.skills``.
    """

    kind: RouteKind = "sum"
    names: tuple[str, ...] = ()
    index: Tensor | None = None
    weights: Tensor | None = None
    skill_mode: SkillMode = "mu"

    @staticmethod
    def off() -> Route:
        return Route("off")

    @staticmethod
    def sum(names: tuple[str, ...] | list[str] = ()) -> Route:
        return Route("sum", tuple(names))

    @staticmethod
    def select(name: str) -> Route:
        return Route("select", (name,))

    @staticmethod
    def soft(names: tuple[str, ...] | list[str] = (), weights: Tensor | None = None) -> Route:
        return Route("soft", tuple(names), weights=weights)

    @staticmethod
    def per_sample(names: tuple[str, ...] | list[str], index: Tensor) -> Route:
        return Route("per_sample", tuple(names), index=index)

    @staticmethod
    def skills(name: str, rows: Tensor | None = None, weights: Tensor | None = None, mode: SkillMode | None = None
               ) -> Route:
        """Route a skill-inventory adapter: ``rows`` (B,) -> hard rows, ``weights`` (B, R) -> soft, else ``mode``
        (``mu`` by default, or ``arrow``)."""
        if mode is None:
            mode = "rows" if rows is not None else "soft" if weights is not None else "mu"
        return Route("skills", (name,), index=rows, weights=weights, skill_mode=mode)


class ExpandableRouter(nn.Module):
    """Softmax weighting router that grows by one column per added adapter (SEMA §3.3).

    Input: the token mean of the site input ``(B, N, d) -> (B, d)`` (or ``(B, d)`` as is). Output: ``(B, K)`` logits.
    Merged columns are frozen; columns added since the last :meth:`merge` are trainable ``Linear(d, 1)`` modules with
    PyTorch's default initialisation.
    """

    def __init__(self, in_features: int, columns: int = 0, pending: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False)
        self.pending = nn.ModuleList()
        for _ in range(columns):
            self.add_column()
        self.merge()
        for _ in range(pending):
            self.add_column()

    @property
    def num_columns(self) -> int:
        return self.weight.shape[0] + len(self.pending)

    def add_column(self) -> nn.Linear:
        col = nn.Linear(self.in_features, 1).to(self.weight.device)
        self.pending.append(col)
        return col

    def pending_columns(self) -> list[nn.Linear]:
        """The trainable columns added since the last :meth:`merge` (``pending`` holds only ``nn.Linear``)."""
        return cast("list[nn.Linear]", list(self.pending))

    def merge(self) -> None:
        """Concatenate pending columns after the frozen ones and freeze everything."""
        if not len(self.pending):
            return
        w = torch.cat([self.weight.data] + [c.weight.data for c in self.pending_columns()])
        b = torch.cat([self.bias.data] + [c.bias.data for c in self.pending_columns()])
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        self.pending = nn.ModuleList()

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(dim=1) if x.ndim == 3 else x  # (B, d) token mean
        logits = [nn.functional.linear(u, self.weight, self.bias)] + [c(u) for c in self.pending]
        return torch.cat(logits, dim=-1)


def mix(outputs: Tensor, weights: Tensor) -> Tensor:
    """Combine stacked adapter outputs ``(K, B, ..., d)`` with per-sample weights ``(B, K)``."""
    w = weights.t().to(outputs.dtype)  # (K, B)
    w = w.reshape(w.shape + (1,) * (outputs.ndim - 2))
    return (outputs * w).sum(0)
