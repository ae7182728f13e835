"""Adapter contract, configs and the ``ADAPTERS`` registry entries.

An adapter maps a site's input to a *delta* added to the site's output, exactly zero at initialisation.
Placements:

- ``parallel_mlp``: the site is a transformer block; input = the residual stream h entering ``norm2`` (after the
  attention sub-block), delta added to the output of ``ls2`` (AdaptFormer / SEMA / MOS placement):
  ``out = h + ls2(mlp(norm2(h))) + delta(h)``.
- ``linear``: the site is an ``nn.Linear`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``); input = the
  linear's input, delta added to its output (LoRA).
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from cl.registries import ADAPTERS

__all__ = ["AdapterConfig", "Adapter", "AdapterSpec", "register_adapter", "adapter_from_spec"]

Placement = Literal["parallel_mlp", "linear"]


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by all adapter types.

    Attributes:
        blocks: block indices to adapt (``None`` = all blocks).
        targets: module-name targets inside a block for ``linear`` placements (PEFT matching: exact or ``.suffix``
            for tuples, ``re.fullmatch`` for a string). Ignored by ``parallel_mlp`` types.
    """

    blocks: tuple[int, ...] | None = None
    targets: tuple[str, ...] | str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Adapter(nn.Module, abc.ABC):
    """Base class: ``forward(x)`` returns the delta added at the site (zero at initialisation)."""

    placement: ClassVar[Placement]
    config_cls: ClassVar[type[AdapterConfig]]
    type_name: ClassVar[str]  # set by @register_adapter

    def __init__(self, in_features: int, out_features: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """The delta added at the site for input ``x``."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    config_cls: type[AdapterConfig]
    adapter_cls: type[Adapter]


def register_adapter(name: str):
    """Class decorator: ``@register_adapter("lora")`` on an :class:`Adapter` subclass with ``config_cls`` set."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        ADAPTERS.add(name, AdapterSpec(name, cls.config_cls, cls))
        cls.type_name = name
        return cls

    return deco


def adapter_from_spec(type_name: str, config: dict[str, Any], in_features: int, out_features: int) -> Adapter:
    """Rebuild an adapter from its registry name and config dict (checkpoint resume)."""
    spec: AdapterSpec = ADAPTERS.get(type_name)
    cfg_dict = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return spec.adapter_cls(in_features, out_features, spec.config_cls(**cfg_dict))
