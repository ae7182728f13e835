"""Pieces shared by several strategies (internal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cl.adapters import BottleneckConfig, LoraConfig
from cl.adapters.base import AdapterConfig
from cl.config import StrategyConfig
from cl.model import CLModel

__all__ = ["AdapterStrategyConfig", "adapter_config", "attach_set"]


@dataclass(frozen=True)
class AdapterStrategyConfig(StrategyConfig):
    """Fields of strategies that train one adapter set.

    Attributes:
        adapter: adapter type (``bottleneck`` parallel to the MLP, or ``lora`` on qkv/proj/fc1/fc2).
        adapter_blocks: blocks to adapt (``None`` = all).
        bottleneck / adapter_scale / adapter_dropout: bottleneck adapter settings.
        lora_rank / lora_alpha: LoRA settings.
        epochs / lr: per-task epochs and learning rate (``None`` = ``train.epochs`` / ``train.lr``).
    """

    adapter: Literal["bottleneck", "lora"] = "bottleneck"
    adapter_blocks: tuple[int, ...] | None = None
    bottleneck: int = 16
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ("bottleneck", "lora"):
            raise ValueError(f"strategy.adapter={self.adapter!r}; valid choices: bottleneck, lora")


def adapter_config(cfg: AdapterStrategyConfig) -> AdapterConfig:
    if cfg.adapter == "bottleneck":
        return BottleneckConfig(blocks=cfg.adapter_blocks, bottleneck=cfg.bottleneck, scale=cfg.adapter_scale,
                                dropout=cfg.adapter_dropout)
    return LoraConfig(blocks=cfg.adapter_blocks, rank=cfg.lora_rank, alpha=cfg.lora_alpha)


def attach_set(model: CLModel, cfg: AdapterStrategyConfig, name: str) -> list[str]:
    return model.attach(cfg.adapter, adapter_config(cfg), name)
