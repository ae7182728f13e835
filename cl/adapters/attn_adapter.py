"""LAE's Adapter: a bottleneck parallel to the *attention* branch, with a learnable output scaler.

``out = x + ls1(attn(norm1(x))) + s · up(GELU(down(norm1(x))))`` (placement ``parallel_attn``), ``down``
Kaiming-uniform (a = √5) with zero bias, ``up`` zero-initialised (weight and bias), ``s`` initialised to 1.0 and
learnable unless ``learnable_scale`` is off: the zero function at initialisation. For LayerScale models (DINOv2) the
delta is added after ``ls1``, so the adapter sits outside the layer scale.

Reference: Q. Gao et al., ICCV 2023, arXiv 2303.10070 ("Adapter5"); gqk/LAE ``libml/model/pet/adapter.py`` (mode
``parallel``, attached to ``blocks[i].attn``) and ``libml/model/misc/scaler.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, register_adapter, register_scale

__all__ = ["AttnAdapterConfig", "AttnAdapter"]


@dataclass(frozen=True)
class AttnAdapterConfig(AdapterConfig):
    """Attributes: down_sample (bottleneck width; LAE: 5), scale (initial or fixed scaler), learnable_scale."""

    down_sample: int = 5
    scale: float = 1.0
    learnable_scale: bool = True

    def __post_init__(self) -> None:
        if self.down_sample <= 0:
            raise ValueError(f"down_sample must be positive, got {self.down_sample}")


@register_adapter("attn_adapter")
class AttnAdapter(Adapter):
    placement = "parallel_attn"
    config_cls = AttnAdapterConfig
    cfg: AttnAdapterConfig
    scale: Tensor  # a 0-d parameter or buffer (register_scale)

    def __init__(self, in_features: int, out_features: int, cfg: AttnAdapterConfig) -> None:
        super().__init__(in_features, out_features, cfg)
        self.down = nn.Linear(in_features, cfg.down_sample)
        self.act = nn.GELU()
        self.up = nn.Linear(cfg.down_sample, out_features)
        register_scale(self, "scale", cfg.scale, cfg.learnable_scale)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, d) -> (B, N, d)``: the delta added after ``ls1``."""
        return self.up(self.act(self.down(x))) * self.scale
