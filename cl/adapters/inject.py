"""One injection mechanism for every adapter type: target matching, ``AdaptedSite`` wrappers, attach/delete/merge.

Placement uses forward hooks and pre-hooks on timm's own modules, so timm's module names and state-dict keys stay
unchanged and no timm code is copied. The one exception is the ``prefix`` placement: it sets an instance-level
``forward`` on the block's attention module (no module is replaced, the state dict is unchanged) that runs
:func:`cl.adapters.attention.explicit_attention` while a prefix is routed in. Each site holds an ``nn.ModuleDict`` of
named adapters and combines them according to its :class:`~cl.mixture.Route`. All checks run before the model is
touched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from cl.adapters.attention import explicit_attention, missing_attention_parts
from cl.adapters.base import Adapter, AdapterConfig, AdapterSpec
from cl.adapters.bottleneck import can_stack, mixed_bottleneck
from cl.mixture import ExpandableRouter, Route, mix
from cl.registries import ADAPTERS

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

    from cl._typing import ModuleDictOf

__all__ = ["AdaptedSite", "match_targets", "site_key", "site_features", "adapter_name"]


def adapter_name(task_id: int, expert: int | None = None) -> str:
    """Fixed-width adapter names: ``t003`` or ``t003_e1``."""
    return f"t{task_id:03d}" + (f"_e{expert}" if expert is not None else "")


def site_key(target: str, placement: str | None = None) -> str:
    """``blocks.3.attn.qkv -> blocks_3_attn_qkv``; ``prefix`` sites get a ``_prefix`` suffix (they share the
    attention module with ``parallel_attn`` sites)."""
    return target.replace(".", "_") + ("_prefix" if placement == "prefix" else "")


def site_features(backbone: nn.Module, target: str, placement: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of the site ``target`` for ``placement`` (checkpoint resume reuses this).

    Raises ``ValueError`` naming the target when the module does not fit the placement.
    """
    mod = backbone.get_submodule(target)
    if placement == "parallel_mlp":  # a timm Block: the width of its norm2
        norm2 = getattr(mod, "norm2", None)
        if norm2 is None or not hasattr(mod, "mlp") or not hasattr(norm2, "normalized_shape"):
            raise ValueError(f"{target} ({type(mod).__name__}) has no norm2/mlp for a parallel_mlp adapter")
        dim = int(norm2.normalized_shape[0])
        return dim, dim
    if placement in ("parallel_attn", "prefix"):  # a timm Attention inside a Block
        missing = missing_attention_parts(mod)
        if missing:
            raise ValueError(f"{target} ({type(mod).__name__}) is not a timm Attention: no {', '.join(missing)}")
        qkv = cast(nn.Linear, mod.qkv)
        if placement == "prefix":
            return qkv.in_features, qkv.out_features // 3
        return qkv.in_features, cast(nn.Linear, mod.proj).out_features
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"target {target} is {type(mod).__name__}, not nn.Linear")
    return mod.in_features, mod.out_features


def _name_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def match_targets(backbone: nn.Module, spec: AdapterSpec, cfg: AdapterConfig) -> list[tuple[str, int, int]]:
    """Resolve ``(target module path, in_features, out_features)`` for an adapter type and config.

    Raises ``ValueError`` naming the blocks and targets available when nothing (or an invalid block) matches.
    """
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(backbone).__name__} has no .blocks; adapters need a timm ViT")
    n = len(blocks)
    chosen = list(range(n)) if cfg.blocks is None else list(cfg.blocks)
    bad = [b for b in chosen if not 0 <= b < n]
    if bad:
        raise ValueError(f"blocks {bad} out of range; the backbone has blocks 0..{n - 1}")
    found: list[tuple[str, int, int]] = []
    placement = spec.adapter_cls.placement
    for b in chosen:
        block = blocks[b]
        if placement in ("parallel_mlp", "parallel_attn", "prefix"):
            target = f"blocks.{b}" if placement == "parallel_mlp" else f"blocks.{b}.attn"
            if placement != "parallel_mlp" and not all(hasattr(block, m) for m in ("attn", "norm1")):
                raise ValueError(f"block {b} ({type(block).__name__}) has no norm1/attn for a {placement} adapter")
            found.append((target, *site_features(backbone, target, placement)))
        else:
            targets = cfg.targets
            if targets is None:
                raise ValueError(f"{spec.name} adapters need targets (e.g. {('attn.qkv', 'mlp.fc1')})")
            for name, mod in block.named_modules():
                if name and _name_matches(name, targets):
                    if not isinstance(mod, nn.Linear):
                        raise ValueError(f"target blocks.{b}.{name} is {type(mod).__name__}, not nn.Linear")
                    found.append((f"blocks.{b}.{name}", mod.in_features, mod.out_features))
    if not found:
        linears = sorted({n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"targets {cfg.targets!r} matched nothing; linear modules in a block: {', '.join(linears)}")
    for target, fin, fout in found:
        try:
            spec.adapter_cls.check_site(fin, fout, cfg)
        except ValueError as err:
            raise ValueError(f"{target}: {err}") from None
    return found


class AdaptedSite(nn.Module):
    """The wrapper of one adaptation site: named adapters, an optional router, and the current route.

    The site is not inserted into timm's module tree; hooks on timm's modules call :meth:`delta`.
    """

    def __init__(self, target: str, placement: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.target = target
        self.placement = placement
        self.in_features = in_features
        self.out_features = out_features
        self.adapters = cast("ModuleDictOf[Adapter]", nn.ModuleDict())
        self.router: ExpandableRouter | None = None
        self.route: Route = Route.sum()
        self._captured: Tensor | None = None
        self._handles: list = []
        #: adapters folded into the base layer's weight (``CLModel.merge``); routes skip them
        self.merged: set[str] = set()

    def add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists at {self.target}")
        self.adapters[name] = adapter

    def names(self) -> list[str]:
        return list(self.adapters.keys())

    def delta(self, x: Tensor) -> Tensor | None:
        """The combined adapter output for input ``x`` under the current route (``None`` = nothing to add)."""
        route = self.route
        if route.kind == "off" or not len(self.adapters):
            return None
        names = list(route.names) or self.names()
        if route.kind in ("soft", "per_sample") and self.merged & set(names):
            raise ValueError(f"{self.target}: merged adapters {sorted(self.merged)} cannot be routed per sample; "
                             f"unmerge them first")
        if route.kind == "skills":  # the adapter mixes its own skills (cl.adapters.skills)
            if names[0] not in self.adapters:
                return None
            routed = cast("Any", self.adapters[names[0]]).routed
            return routed(x, route.skill_mode, rows=route.index, weights=route.weights)
        if route.kind == "select":  # a site without that adapter (or with it merged) adds nothing here
            return self.adapters[names[0]](x) if names[0] in self.adapters and names[0] not in self.merged else None
        if route.kind == "sum":
            out = None
            for n in (n for n in names if n in self.adapters and n not in self.merged):
                d = self.adapters[n](x)
                out = d if out is None else out + d
            return out
        if route.kind == "per_sample":
            if route.index is None or route.index.shape[0] != x.shape[0]:
                raise ValueError(f"per_sample route at {self.target} needs an index of length {x.shape[0]}")
            out = x.new_zeros(x.shape[:-1] + (self.out_features,))
            for k, n in enumerate(names):
                sel = (route.index == k).nonzero(as_tuple=True)[0]
                if sel.numel():
                    out.index_copy_(0, sel, self.adapters[n](x.index_select(0, sel)).to(out.dtype))
            return out
        if route.kind == "soft":
            weights = route.weights
            if weights is None:
                if self.router is None:
                    raise ValueError(f"soft route at {self.target} needs weights or a router")
                weights = torch.softmax(self.router(x).float(), dim=-1)
            mods = [self.adapters[n] for n in names]
            if weights.shape[-1] != len(mods):
                raise ValueError(f"{self.target}: {weights.shape[-1]} routing weights for {len(mods)} adapters")
            if can_stack(mods, self.training):  # one fused mixture: cost flat in the batch, no (K, B, N, d) stack
                return mixed_bottleneck(mods, x, weights)
            return mix(torch.stack([m(x) for m in mods]), weights)
        raise ValueError(f"unknown route kind {route.kind!r}")

    # --- hooks -------------------------------------------------------------------------------------------------
    def install(self, backbone: nn.Module) -> None:
        if self._handles:
            return
        if self.placement == "parallel_mlp":
            block = cast("Block", backbone.get_submodule(self.target))
            out_mod = block.ls2 if hasattr(block, "ls2") else block.mlp
            self._handles.append(block.norm2.register_forward_pre_hook(self._capture))
            self._handles.append(out_mod.register_forward_hook(self._add_captured))
        elif self.placement == "parallel_attn":  # input norm1(x) = the attention's input; delta added after ls1
            block = cast("Block", backbone.get_submodule(self.target.rsplit(".", 1)[0]))
            out_mod = block.ls1 if hasattr(block, "ls1") else block.attn
            self._handles.append(block.attn.register_forward_pre_hook(self._capture))
            self._handles.append(out_mod.register_forward_hook(self._add_captured))
        elif self.placement == "prefix":
            self._handles.append(_ForwardOverride(backbone.get_submodule(self.target), self._attention_forward))
        else:
            self._handles.append(backbone.get_submodule(self.target).register_forward_hook(self._add_own))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture(self, _mod: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def _add_captured(self, _mod: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        h, self._captured = self._captured, None
        if h is None:
            return out
        d = self.delta(h)
        return out if d is None else out + d.to(out.dtype)

    def _add_own(self, _mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        d = self.delta(args[0])
        return out if d is None else out + d.to(out.dtype)

    # --- prefix placement -----------------------------------------------------------------------------------------
    def prefix(self, x: Tensor) -> tuple[Tensor, Tensor, int, bool] | None:
        """Keys, values ``(L, attn_dim)``, position and compensation of the routed prefixes (``None`` = none).

        ``select`` uses one prefix, ``sum`` concatenates the routed prefixes (one calibration over all of them);
        per-sample and soft routes are not defined for prefixes.
        """
        route = self.route
        if route.kind == "off" or not len(self.adapters):
            return None
        if route.kind not in ("select", "sum"):
            raise ValueError(f"{self.target}: prefix sites support the off, select and sum routes, not {route.kind!r}")
        names = list(route.names[:1] if route.kind == "select" else route.names) or self.names()
        mods = [self.adapters[n] for n in names if n in self.adapters]
        if not mods:
            return None
        cfgs = {(m.cfg.position, m.cfg.compensation) for m in mods}  # type: ignore[attr-defined]
        if len(cfgs) > 1:
            raise ValueError(f"{self.target}: routed prefixes disagree on position/compensation: {sorted(cfgs)}")
        position, compensation = cfgs.pop()
        tokens = torch.cat([m(x) for m in mods], dim=1)  # (2, L, attn_dim)
        return tokens[0], tokens[1], position, compensation

    def _attention_forward(self, attn: nn.Module, x: Tensor, attn_mask: Tensor | None = None,
                           is_causal: bool = False) -> Tensor:
        """The attention module's forward while this site is installed: timm's own unless a prefix is routed in."""
        p = self.prefix(x)
        if p is None:
            if attn_mask is None and not is_causal:
                return type(attn).forward(attn, x)
            return type(attn).forward(attn, x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError(f"{self.target}: prefix attention does not support attention masks")
        keys, values, position, compensation = p
        return explicit_attention(attn, x, (keys, values), position, compensation)


class _ForwardOverride:
    """An instance-level ``forward`` on a module (state dict unchanged; hooks still run); ``remove`` restores it."""

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor]) -> None:
        if "forward" in vars(module):
            raise ValueError(f"{type(module).__name__} already has an instance-level forward")
        self.module = module
        module.__dict__["forward"] = functools.partial(fn, module)

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def build_adapters(
    backbone: nn.Module, type_name: str, cfg: AdapterConfig
) -> tuple[AdapterSpec, list[tuple[str, int, int]]]:
    """Checks before mutation: resolve the type and the targets (raises without touching the model)."""
    spec: AdapterSpec = ADAPTERS.get(type_name)
    if not isinstance(cfg, spec.config_cls):
        raise TypeError(f"{type_name} adapters need a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    return spec, match_targets(backbone, spec, cfg)


def block_of(target: str) -> int:
    return int(target.split(".")[1])


def unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())
