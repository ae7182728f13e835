"""Adapter contract, configs and the ``ADAPTERS`` registry entries.

An adapter maps a site's input to a *delta* added to the site's output, exactly zero at initialisation.
Placements:

- ``parallel_mlp``: the site is a transformer block; input = the residual stream h entering ``norm2`` (after the
  attention sub-block), delta added to the output of ``ls2`` (AdaptFormer / SEMA / MOS placement):
  ``out = h + ls2(mlp(norm2(h))) + delta(h)``.
- ``linear``: the site is an ``nn.Linear`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``); input = the
  linear's input, delta added to its output (LoRA, LAE's K/V LoRA).
- ``parallel_attn``: the site is a block's attention (``blocks.i.attn``); input = ``norm1(x)`` (the attention's input),
  delta added to the output of ``ls1`` (LAE's Adapter): ``out = x + ls1(attn(norm1(x))) + delta(norm1(x))``.
- ``prefix``: the site is a block's attention; the adapter's ``forward`` returns key and value tokens
  ``(2, length, attn_dim)`` that the explicit-softmax attention (``cl.adapters.attention``) inserts into the keys and
  values (LAE's Prefix). It is the one placement whose output is not a delta.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.registries import ADAPTERS

__all__ = ["AdapterConfig", "Adapter", "AdapterSpec", "register_adapter", "adapter_from_spec", "register_scale"]

Placement = Literal["parallel_mlp", "linear", "parallel_attn", "prefix"]


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
    #: the adapter leaves the model's output unchanged right after ``attach`` (false only for LAE's Prefix, whose
    #: small non-zero tokens change the attention)
    zero_at_init: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """The delta added at the site for input ``x``."""

    @classmethod
    def check_site(cls, in_features: int, out_features: int, cfg: AdapterConfig) -> None:
        """Raise ``ValueError`` if a site of these widths cannot hold this type with ``cfg`` (e.g. heads that do not
        divide the widths); called for every matched site before the model changes."""


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


def register_scale(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    """Give ``module`` an output scaler ``name``: a learnable scalar parameter, or a fixed scalar buffer.

    Both are 0-d tensors under the same state-dict key, so checkpoints do not depend on the switch (LAE's ``Scaler``,
    gqk/LAE ``libml/model/misc/scaler.py``: learnable when ``scale: null``, initialised to 1.0).
    """
    t = torch.tensor(float(value))
    if learnable:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)
