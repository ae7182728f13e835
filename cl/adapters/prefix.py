"""LAE's Prefix: key and value tokens inserted into a block's attention, with the adaptation-speed calibration.

``length`` key tokens ``s_key · P_K`` and value tokens ``s_val · P_V`` (``P ~ U(0, 0.01)``, scalers initialised to 1.0
and learnable unless ``learnable_scale`` is off) are inserted at ``position`` (1: after the CLS token) of the
projected key and value sequences; queries and the output length are unchanged. With ``compensation`` the prefix
attention mass of every row is renormalised to 1 (``cl.adapters.attention.compensate_prefix``), so the block
computes ``(1 − λ) · Attn_orig + Attn_prefix``. The placement ``prefix`` routes the block's attention through
``cl.adapters.attention.explicit_attention`` while a prefix is active (timm's own forward otherwise). Unlike the other
types, Prefix is *not* the zero function at initialisation (its tokens are small but non-zero).

Reference: Q. Gao et al., ICCV 2023, arXiv 2303.10070 ("Prefix10", §3.3); gqk/LAE ``libml/model/pet/prefix.py``
and ``libml/model/pet/prompt.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, register_adapter, register_scale

__all__ = ["PrefixConfig", "PrefixAdapter"]


@dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    """Attributes: length (tokens; LAE: 10), position (insertion index; 1 = after CLS), compensation (LAE's
    calibration, ``compensatory``), scale (initial or fixed ``s_key``/``s_val``), learnable_scale, init_max (tokens
    are drawn from U(0, init_max))."""

    length: int = 10
    position: int = 1
    compensation: bool = True
    scale: float = 1.0
    learnable_scale: bool = True
    init_max: float = 0.01

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise ValueError(f"length must be positive, got {self.length}")
        if self.position < 0:
            raise ValueError(f"position must be >= 0, got {self.position}")


@register_adapter("prefix")
class PrefixAdapter(Adapter):
    placement = "prefix"
    config_cls = PrefixConfig
    zero_at_init = False
    cfg: PrefixConfig
    scale_key: Tensor  # 0-d parameters or buffers (register_scale)
    scale_val: Tensor

    def __init__(self, in_features: int, out_features: int, cfg: PrefixConfig) -> None:
        super().__init__(in_features, out_features, cfg)
        self.key = nn.Parameter(torch.empty(cfg.length, out_features).uniform_(0.0, cfg.init_max))
        self.val = nn.Parameter(torch.empty(cfg.length, out_features).uniform_(0.0, cfg.init_max))
        register_scale(self, "scale_key", cfg.scale, cfg.learnable_scale)
        register_scale(self, "scale_val", cfg.scale, cfg.learnable_scale)

    def forward(self, x: Tensor) -> Tensor:
        """The scaled prefix ``(2, length, attn_dim)``: ``[s_key · P_K, s_val · P_V]`` in ``x``'s dtype.

        ``x`` (the attention input) only sets the dtype: the prefix does not depend on the sample.
        """
        return torch.stack([self.key * self.scale_key, self.val * self.scale_val]).to(x.dtype)
