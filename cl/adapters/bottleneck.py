"""Bottleneck adapter (AdaptFormer: Chen et al., NeurIPS 2022, arXiv 2205.13535), parallel to the MLP.

``delta(h) = scale * up(dropout(act(down(LN?(h)))))`` with ``down`` Kaiming-uniform (a = sqrt(5)), bias 0, and ``up``
zero-initialised, so the adapter starts as the zero function. SEMA's official code applies no scale (1.0) and no
dropout; MOS applies scale 0.1 and dropout 0.1: both are config fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard

import torch
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, register_adapter

__all__ = ["BottleneckConfig", "BottleneckAdapter", "stacked_bottleneck", "mixed_bottleneck"]


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Attributes: bottleneck (r), scale, dropout, act (relu | gelu), layernorm (none | in)."""

    bottleneck: int = 16
    scale: float = 1.0
    dropout: float = 0.0
    act: Literal["relu", "gelu"] = "relu"
    layernorm: Literal["none", "in"] = "none"

    def __post_init__(self) -> None:
        if self.bottleneck <= 0:
            raise ValueError(f"bottleneck must be positive, got {self.bottleneck}")
        if self.act not in ("relu", "gelu"):
            raise ValueError(f"act={self.act!r}; valid choices: relu, gelu")
        if self.layernorm not in ("none", "in"):
            raise ValueError(f"layernorm={self.layernorm!r}; valid choices: none, in")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register_adapter("bottleneck")
class BottleneckAdapter(Adapter):
    placement = "parallel_mlp"
    config_cls = BottleneckConfig
    cfg: BottleneckConfig

    def __init__(self, in_features: int, out_features: int, cfg: BottleneckConfig) -> None:
        super().__init__(in_features, out_features, cfg)
        self.norm = nn.LayerNorm(in_features) if cfg.layernorm == "in" else nn.Identity()
        self.down = nn.Linear(in_features, cfg.bottleneck)
        self.up = nn.Linear(cfg.bottleneck, out_features)
        self.act = nn.ReLU() if cfg.act == "relu" else nn.GELU()
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.drop(self.act(self.down(self.norm(x))))) * self.scale


def stacked_bottleneck(adapters: list[BottleneckAdapter], x: Tensor) -> Tensor:
    """All K adapters on the same input in two batched matmuls: ``(B, N, d) -> (K, B, N, d)``.

    Exactly equal (up to float reassociation) to ``torch.stack([a(x) for a in adapters])`` when the adapters share a
    config with no LayerNorm and no active dropout; the caller checks :func:`can_stack`.
    """
    wd = torch.stack([a.down.weight for a in adapters])  # (K, r, d)
    bd = torch.stack([a.down.bias for a in adapters])  # (K, r)
    wu = torch.stack([a.up.weight for a in adapters])  # (K, d, r)
    bu = torch.stack([a.up.bias for a in adapters])  # (K, d)
    hidden = torch.einsum("bnd,krd->kbnr", x, wd) + bd[:, None, None, :]
    hidden = adapters[0].act(hidden)
    out = torch.einsum("kbnr,kdr->kbnd", hidden, wu) + bu[:, None, None, :]
    return out * adapters[0].scale


def mixed_bottleneck(adapters: list[BottleneckAdapter], x: Tensor, weights: Tensor) -> Tensor:
    """Soft mixture ``sum_k weights[b, k] * adapter_k(x[b])`` in two matmuls: ``(B, ..., d), (B, K) -> (B, ..., d)``.

    Equal (up to float reassociation) to ``mix(stacked_bottleneck(adapters, x), weights)`` but never materialises the
    ``(K, B, N, d)`` stack: the weights scale each adapter's hidden units, so one up-projection over the concatenated
    ``K * r`` hidden units does the mixing. Cost per token ``2 K r d`` multiply-adds (SEMA's inference at K adapters
    per block; ViT-B: 25 K per adapter against about 7 M per block). Same conditions as :func:`stacked_bottleneck`.
    """
    k, r = len(adapters), adapters[0].down.out_features
    wd = torch.cat([a.down.weight for a in adapters])  # (K * r, d)
    bd = torch.cat([a.down.bias for a in adapters])  # (K * r,)
    wu = torch.cat([a.up.weight for a in adapters], dim=1)  # (d, K * r)
    bu = torch.stack([a.up.bias for a in adapters])  # (K, d)
    hidden = adapters[0].act(nn.functional.linear(x, wd, bd))  # (B, ..., K * r)
    w = weights.to(hidden.dtype)  # (B, K)
    view = (w.shape[0],) + (1,) * (x.ndim - 2)
    hidden = (hidden.unflatten(-1, (k, r)) * w.reshape(*view, k, 1)).flatten(-2)
    out = nn.functional.linear(hidden, wu) + (w @ bu.to(w.dtype)).reshape(*view, -1)  # (B, ..., d)
    return out * adapters[0].scale


def can_stack(adapters: Sequence[nn.Module], training: bool) -> TypeGuard[list[BottleneckAdapter]]:
    """Whether :func:`stacked_bottleneck` may replace the per-adapter forwards (narrows ``adapters`` when true)."""
    bottlenecks = [a for a in adapters if isinstance(a, BottleneckAdapter)]
    if len(adapters) < 2 or len(bottlenecks) != len(adapters):
        return False
    cfg = bottlenecks[0].cfg

    def compute(c: BottleneckConfig) -> tuple:  # placement fields (blocks, targets) do not change the computation
        return c.bottleneck, c.scale, c.dropout, c.act, c.layernorm

    same = all(compute(a.cfg) == compute(cfg) for a in bottlenecks)
    return same and cfg.layernorm == "none" and not (training and cfg.dropout > 0)
