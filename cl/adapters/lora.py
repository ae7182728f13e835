"""LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) on timm ViT linears.

``delta(x) = (alpha / rank) * B(A(dropout(x)))`` with A Kaiming-uniform (a = sqrt(5)) and B zero-initialised.
Linear-mergeable: :meth:`LoraAdapter.delta_weight` is the weight update ``(alpha / rank) * B @ A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, register_adapter

__all__ = ["LoraConfig", "LoraAdapter", "DEFAULT_LORA_TARGETS"]

DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Attributes: rank, alpha, dropout; ``targets`` defaults to qkv, proj, fc1 and fc2."""

    targets: tuple[str, ...] | str | None = DEFAULT_LORA_TARGETS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register_adapter("lora")
class LoraAdapter(Adapter):
    placement = "linear"
    config_cls = LoraConfig

    def __init__(self, in_features: int, out_features: int, cfg: LoraConfig) -> None:
        super().__init__(in_features, out_features, cfg)
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, cfg.rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = cfg.alpha / cfg.rank
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return (self.drop(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def delta_weight(self) -> Tensor:
        """The equivalent dense weight update ``(out, in)``."""
        return (self.lora_b @ self.lora_a) * self.scaling
