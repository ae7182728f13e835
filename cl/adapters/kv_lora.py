"""LAE's LoRA: low-rank updates of the fused ``qkv`` projection's **K and V rows only**, with learnable scalers.

``W_qkv + [0; s_K · B_K A_K; s_V · B_V A_V]`` on timm's ``[q | k | v]`` output layout: rows ``attn_dim .. 2·attn_dim``
(K) and ``2·attn_dim .. 3·attn_dim`` (V). A Kaiming-uniform (a = √5), B zero (the zero function at initialisation),
``s_K``, ``s_V`` initialised to 1.0 and learnable unless ``learnable_scale`` is off. No ``alpha / rank`` factor
(the official code has none). Linear-mergeable (:meth:`KvLoraAdapter.delta_weight`).

Reference: Q. Gao et al., ICCV 2023, arXiv 2303.10070 ("LoRA5"); gqk/LAE ``libml/model/pet/lora.py::KVLoRA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, register_adapter, register_scale

__all__ = ["KvLoraConfig", "KvLoraAdapter"]


@dataclass(frozen=True)
class KvLoraConfig(AdapterConfig):
    """Attributes: rank (LAE: 5), scale (initial or fixed ``s_K`` and ``s_V``), learnable_scale; targets: the fused
    qkv linear."""

    targets: tuple[str, ...] | str | None = ("attn.qkv",)
    rank: int = 5
    scale: float = 1.0
    learnable_scale: bool = True

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")


@register_adapter("kv_lora")
class KvLoraAdapter(Adapter):
    placement = "linear"
    config_cls = KvLoraConfig
    cfg: KvLoraConfig
    scale_k: Tensor  # 0-d parameters or buffers (register_scale)
    scale_v: Tensor

    @classmethod
    def check_site(cls, in_features: int, out_features: int, cfg: AdapterConfig) -> None:
        if out_features % 3:
            raise ValueError(f"kv_lora needs a fused qkv linear (out_features divisible by 3), got {out_features}")

    def __init__(self, in_features: int, out_features: int, cfg: KvLoraConfig) -> None:
        super().__init__(in_features, out_features, cfg)
        self.check_site(in_features, out_features, cfg)
        self.attn_dim = out_features // 3
        self.lora_a = nn.Parameter(torch.empty(2, cfg.rank, in_features))  # [A_K, A_V]
        self.lora_b = nn.Parameter(torch.zeros(2, self.attn_dim, cfg.rank))  # [B_K, B_V]
        for i in range(2):
            nn.init.kaiming_uniform_(self.lora_a[i], a=math.sqrt(5))
        register_scale(self, "scale_k", cfg.scale, cfg.learnable_scale)
        register_scale(self, "scale_v", cfg.scale, cfg.learnable_scale)

    def _scales(self) -> Tensor:
        return torch.stack([self.scale_k, self.scale_v])  # (2,)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., 3 · attn_dim)``: zero on the Q rows, the K and V updates on theirs."""
        hidden = torch.einsum("...i,kri->k...r", x, self.lora_a.to(x.dtype))  # (2, ..., r)
        kv = torch.einsum("k...r,kor->k...o", hidden, self.lora_b.to(x.dtype))  # (2, ..., attn_dim)
        kv = kv * self._scales().to(x.dtype).view((2,) + (1,) * (kv.ndim - 1))
        return torch.cat([x.new_zeros(x.shape[:-1] + (self.attn_dim,)), kv[0], kv[1]], dim=-1)

    def delta_weight(self) -> Tensor:
        """The equivalent dense update of the qkv weight ``(3 · attn_dim, in)`` (zero Q rows)."""
        kv = (self.lora_b @ self.lora_a) * self._scales().view(2, 1, 1)  # (2, attn_dim, in)
        return torch.cat([kv.new_zeros(self.attn_dim, self.in_features), kv[0], kv[1]], dim=0)
