"""What a cached value depends on, and whether reusing it is exact (rules: :mod:`cl.cache`).

:func:`prefix_fingerprint` / :class:`Fingerprint` record the tensors and route structure the tokens entering a block
are computed from; :func:`prefix_problems` says why such tokens may not be a fixed function of the image;
:func:`declared_hook` marks hooks a strategy accounts for; :func:`is_deterministic` tells whether a dataset's items
are the same tensors every time they are read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

if TYPE_CHECKING:
    from cl.adapters.inject import AdaptedSite
    from cl.model import CLModel

__all__ = ["Fingerprint", "fingerprint", "prefix_fingerprint", "prefix_problems", "declared_hook", "is_deterministic"]

_DECLARED = "__clsim_cache_declared__"


def declared_hook(hook: Any) -> Any:
    """Mark a forward (pre-)hook whose effects its strategy accounts for in ``Phase.trainable_from`` and
    ``Strategy.frozen_prefix``; the cache refuses prefixes holding any *other* hook (it could observe the skipped
    computation). Returns ``hook`` (a function or ``functools.partial``)."""
    setattr(hook, _DECLARED, True)
    return hook


def is_deterministic(data: Dataset) -> bool:
    """``ViewableDataset.deterministic``; a ``ConcatDataset`` is deterministic when all its parts are."""
    if isinstance(data, ConcatDataset):
        return all(is_deterministic(d) for d in data.datasets)
    return bool(getattr(data, "deterministic", False))


# --- what a prefix depends on ------------------------------------------------------------------------------------
def _prefix_state(model: CLModel, block: int) -> tuple[list[tuple[str, Tensor]], tuple, list[AdaptedSite]]:
    """Named tensors, route structure and sites of everything the tokens entering ``block`` depend on.

    ``block >= len(blocks)`` means the pooled features (final norm and pooling included).
    """
    from cl.adapters.inject import block_of

    n = len(model.backbone.blocks)
    full = block >= n
    late = tuple(f"blocks.{i}." for i in range(block, n)) + (() if full else ("norm.", "fc_norm.", "head.",
                                                                               "attn_pool."))
    named = [(f"backbone.{k}", t) for k, t in [*model.backbone.named_parameters(), *model.backbone.named_buffers()]
             if not k.startswith(late)]
    named += [("mean", model.mean), ("std", model.std)]
    structure: list[Any] = [("block", min(block, n))]
    sites = []
    for key, site in model.sites.items():
        if not full and block_of(site.target) >= block:
            continue
        sites.append(site)
        route = site.route
        structure.append((key, route.kind, route.names, route.index is None, route.weights is None,
                          tuple(site.adapters.keys()), tuple(sorted(site.merged))))
        named += [(f"sites.{key}.{k}", t) for k, t in [*site.named_parameters(), *site.named_buffers()]]
    return named, tuple(structure), sites


@dataclass(frozen=True)
class Fingerprint:
    """What a cached value was computed from: names/shapes/structure and per-tensor float64 (sum, L2 norm)."""

    structure: tuple
    values: Tensor  # (n, 2) float64 on CPU

    def matches(self, other: Fingerprint) -> bool:
        return self.structure == other.structure and torch.equal(self.values, other.values)


@torch.no_grad()
def fingerprint(named: Iterable[tuple[str, Tensor]], structure: tuple = ()) -> Fingerprint:
    """Fingerprint of named tensors (one reduction pair per tensor: called per epoch or evaluation, not per step)."""
    items = list(named)
    stats = [torch.stack([t.detach().sum(dtype=torch.float64), torch.linalg.vector_norm(t.detach(),
                                                                                        dtype=torch.float64)])
             if t.is_floating_point() else t.detach().double().sum().repeat(2) for _, t in items]
    meta = tuple((k, tuple(t.shape), str(t.dtype)) for k, t in items)
    values = torch.stack(stats).cpu() if stats else torch.zeros(0, 2, dtype=torch.float64)
    return Fingerprint((structure, meta), values)


def prefix_fingerprint(model: CLModel, block: int) -> Fingerprint:
    """Fingerprint of the embedding, blocks ``< block`` and their sites (routes included)."""
    named, structure, _ = _prefix_state(model, block)
    return fingerprint(named, structure)


def prefix_problems(model: CLModel, block: int, training: bool) -> str | None:
    """Why the tokens entering ``block`` may not be a fixed function of the image (``None`` = they are).

    Checks: per-batch routes (``per_sample`` / given ``weights``), active dropout or drop-path in the prefix's
    adapters when ``training``, and forward hooks on prefix modules other than adapter sites' own and
    :func:`declared_hook` ones.
    """
    from cl.adapters.inject import AdaptedSite

    _, _, sites = _prefix_state(model, block)
    for site in sites:
        if site.route.index is not None or site.route.weights is not None:
            return f"per-batch route at {site.target}"
        if training:
            for m in site.modules():
                p = getattr(m, "p", None) if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", None)
                if p:
                    return f"active dropout in the adapters at {site.target}"
    bb = model.backbone
    n = len(bb.blocks)
    mods: list[nn.Module] = [bb.patch_embed, bb.norm_pre, *bb.blocks[: min(block, n)]]
    if block >= n:
        mods += [m for m in (bb.norm, getattr(bb, "fc_norm", None), getattr(bb, "attn_pool", None)) if m is not None]
    for top in mods:
        for m in top.modules():
            for hook in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
                owner = getattr(getattr(hook, "func", hook), "__self__", None)
                if not isinstance(owner, AdaptedSite) and not getattr(hook, _DECLARED, False):
                    return f"undeclared forward hook {getattr(hook, '__qualname__', hook)!r} in the frozen prefix"
    return None
