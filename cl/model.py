"""``CLModel``: a frozen timm ViT plus adapter sites, heads and strategy modules, with routing and structure I/O."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, AdapterSpec, adapter_from_spec
from cl.adapters.inject import AdaptedSite, block_of, build_adapters, site_features, site_key, unique_params
from cl.backbone import DataSpec
from cl.heads import Head, head_from_spec
from cl.mixture import ExpandableRouter, Route
from cl.registries import ADAPTERS

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from cl._typing import ModuleDictOf

__all__ = ["CLModel"]

H = TypeVar("H", bound=nn.Module)


class CLModel(nn.Module):
    """Frozen backbone + ``sites`` (adapters, routers) + ``heads`` + ``extras`` (strategy-owned modules).

    Inputs may be uint8 images ``(B, 3, S, S)`` (normalised here, on the device) or float tensors already in [0, 1].
    The backbone stays in eval mode and ``requires_grad=False`` whatever ``train()`` is called with.
    """

    mean: Tensor  # buffers registered in __init__
    std: Tensor

    def __init__(self, backbone: nn.Module, spec: DataSpec) -> None:
        super().__init__()
        # a timm ViT (``create_backbone``): embed/run_blocks/pool use its patch_embed, blocks, norm, forward_head
        self.backbone = cast("VisionTransformer", backbone)
        self.spec = spec
        self.sites = cast("ModuleDictOf[AdaptedSite]", nn.ModuleDict())
        self.heads = cast("ModuleDictOf[Head]", nn.ModuleDict())
        self.extras = nn.ModuleDict()
        self._original_weights: dict[str, Tensor] = {}  # base weights of linears with merged adapters
        self.input_block = 0  # what ``features`` receives: images (0), cached tokens entering block k (``input_at``)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    # --- modes --------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> CLModel:
        super().train(mode)
        self.backbone.eval()
        return self

    # --- forward ------------------------------------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std

    def embed(self, x: Tensor) -> Tensor:
        """Image -> tokens entering block 0 ``(B, N, d)`` (timm's own patch/pos embedding)."""
        bb = self.backbone
        t = bb.patch_embed(self.preprocess(x))
        t = bb._pos_embed(t)
        t = bb.patch_drop(t)
        return bb.norm_pre(t)

    def run_blocks(self, tokens: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        for blk in self.backbone.blocks[start:stop]:
            tokens = blk(tokens)
        return tokens

    def pool(self, tokens: Tensor) -> Tensor:
        """Final norm + timm's pooling (``pre_logits``): the feature vector ``(B, num_features)``."""
        return self.backbone.forward_head(self.backbone.norm(tokens), pre_logits=True)

    def features(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, S, S)`` -> features ``(B, num_features)``; under :meth:`input_at` ``(k)`` the input is
        the tokens entering block k (``k = len(blocks)``: the features themselves), as cached by ``cl.cache``."""
        k = self.input_block
        if k == 0:
            return self.pool(self.run_blocks(self.embed(x)))
        if k >= len(self.backbone.blocks):
            return x
        return self.pool(self.run_blocks(x, k))

    @contextlib.contextmanager
    def input_at(self, block: int) -> Iterator[None]:
        """Within the block, ``features``/``forward`` take the tokens entering ``block`` instead of images (0 = images).

        The loop sets it while it feeds a phase, a detection pass or an evaluation from the frozen-computation cache
        (``cl.cache``); strategies that declare a frozen prefix must read their inputs through ``features``.
        """
        saved, self.input_block = self.input_block, block
        try:
            yield
        finally:
            self.input_block = saved

    def forward(self, x: Tensor, head: str = "main") -> Tensor:
        return self.heads[head](self.features(x))

    def head(self, key: str, kind: type[H]) -> H:
        """``heads[key]`` typed as the head class the strategy put there (a static cast: no runtime check)."""
        return cast(H, self.heads[key])

    # --- adapters -----------------------------------------------------------------------------------------------
    def attach(self, type_name: str, cfg: AdapterConfig, name: str) -> list[str]:
        """Add adapter ``name`` of ``type_name`` at every site ``cfg`` targets; returns the site keys.

        Every check (type, targets, shapes, name clashes) runs before anything is added. New adapters start frozen.
        """
        spec, targets = build_adapters(self.backbone, type_name, cfg)
        keys = [site_key(t, spec.adapter_cls.placement) for t, _, _ in targets]
        clash = [k for k in keys if k in self.sites and name in self.sites[k].adapters]
        if clash:
            raise ValueError(f"adapter {name!r} already exists at {', '.join(clash)}")
        device = self.mean.device
        for (target, fin, fout), key in zip(targets, keys, strict=True):
            if key not in self.sites:
                site = AdaptedSite(target, spec.adapter_cls.placement, fin, fout)
                site.install(self.backbone)
                self.sites[key] = site
            adapter = spec.adapter_cls(fin, fout, cfg).to(device)
            adapter.requires_grad_(False)
            self.sites[key].add(name, adapter)
        return keys

    def merge(self, name: str, safe: bool = True) -> list[str]:
        """Fold adapter ``name`` into the weights of the linears it adapts (LoRA), for faster inference.

        Only linear-mergeable adapters (with ``delta_weight()``) can be merged. With ``safe`` every update is computed
        and checked for non-finite values before any weight changes. Routes then skip the merged adapter at those
        sites (``select``/``sum``); :meth:`unmerge` restores the original weights exactly. Returns the site keys.
        """
        keys = [k for k, site in self.sites.items() if name in site.adapters]
        if not keys:
            raise KeyError(f"no adapter named {name!r}")
        updates: dict[str, Tensor] = {}
        for key in keys:
            adapter = self.sites[key].adapters[name]
            delta_weight = getattr(adapter, "delta_weight", None)
            if self.sites[key].placement != "linear" or delta_weight is None:
                raise TypeError(f"adapter {name!r} at {self.sites[key].target} is not linear-mergeable")
            if name in self.sites[key].merged:
                raise ValueError(f"adapter {name!r} is already merged at {self.sites[key].target}")
            with torch.no_grad():
                updates[key] = delta_weight().detach()
            if safe and not torch.isfinite(updates[key]).all():
                raise ValueError(f"adapter {name!r} has non-finite values at {self.sites[key].target}; not merged")
        for key, update in updates.items():
            site = self.sites[key]
            weight = cast(nn.Linear, self.backbone.get_submodule(site.target)).weight
            if key not in self._original_weights:
                self._original_weights[key] = weight.detach().clone()
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
            site.merged.add(name)
        return keys

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`: restore the original weights exactly, re-applying other still-merged adapters."""
        keys = [k for k, site in self.sites.items() if name in site.merged]
        if not keys:
            raise KeyError(f"adapter {name!r} is not merged anywhere")
        for key in keys:
            site = self.sites[key]
            site.merged.discard(name)
            weight = cast(nn.Linear, self.backbone.get_submodule(site.target)).weight
            with torch.no_grad():
                weight.copy_(self._original_weights[key])
                for other in sorted(site.merged):
                    weight.add_(cast(Any, site.adapters[other]).delta_weight().to(weight.dtype))
            if not site.merged:
                del self._original_weights[key]

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` everywhere (sites left empty are uninstalled); a merged one is unmerged first."""
        if any(name in site.merged for site in self.sites.values()):
            self.unmerge(name)
        found = False
        for key in list(self.sites):
            site = self.sites[key]
            if name in site.adapters:
                del site.adapters[name]
                found = True
            if not len(site.adapters):
                site.uninstall()
                del self.sites[key]
        if not found:
            raise KeyError(f"no adapter named {name!r}")

    def adapters(self, name: str | None = None, sites: list[str] | None = None) -> list[Adapter]:
        """Adapter modules (of one name, or all) at the given sites (or all)."""
        out: list[Adapter] = []
        for key, site in self.sites.items():
            if sites is not None and key not in sites:
                continue
            out += [a for n, a in site.adapters.items() if name is None or n == name]
        return out

    def adapter_parameters(self, name: str | None = None, sites: list[str] | None = None) -> list[nn.Parameter]:
        return unique_params(self.adapters(name, sites))

    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for site in self.sites.values():
            names.update(dict.fromkeys(site.adapters))
        return list(names)

    def set_route(self, route: Route | Mapping[str, Route]) -> None:
        """Set the persistent route of all sites (a :class:`Route`) or of some (``{site_key: Route}``)."""
        items = route.items() if isinstance(route, Mapping) else ((k, route) for k in self.sites)
        for key, r in items:
            self.sites[key].route = r

    @contextlib.contextmanager
    def routing(self, route: Route | Mapping[str, Route]) -> Iterator[None]:
        """Temporarily route sites (restored on exit)."""
        saved = {k: s.route for k, s in self.sites.items()}
        self.set_route(route)
        try:
            yield
        finally:
            for k, r in saved.items():
                if k in self.sites:
                    self.sites[k].route = r

    def adapters_per_block(self) -> list[int]:
        """K per block: distinct adapter names present at any site of the block (a LoRA set counts once); an adapter
        holding several modules (``num_modules``, e.g. a skill inventory) counts them (its largest count in a block).
        """
        per: list[dict[str, int]] = [{} for _ in range(len(self.backbone.blocks))]
        for site in self.sites.values():
            counts = per[block_of(site.target)]
            for name, adapter in site.adapters.items():
                counts[name] = max(counts.get(name, 0), int(getattr(adapter, "num_modules", 1)))
        return [sum(c.values()) for c in per]

    def deployed_params(self) -> int:
        """Parameters of every adapter and router (inference-time growth; heads excluded)."""
        return sum(p.numel() for p in unique_params(self.sites.values()))

    # --- structure (checkpoint resume) ----------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        sites = {}
        for key, site in self.sites.items():
            sites[key] = {
                "target": site.target,
                "adapters": {n: {"type": a.type_name, "config": a.cfg.to_dict()} for n, a in site.adapters.items()},
                "router": None
                if site.router is None
                else {
                    "type": "expandable",
                    "columns": site.router.weight.shape[0],
                    "pending": len(site.router.pending),
                },
            }
        return {"sites": sites, "heads": {k: h.spec() for k, h in self.heads.items()}}

    def load_structure(self, structure: dict[str, Any]) -> None:
        """Recreate sites, adapters, routers and heads of ``structure`` (values are loaded afterwards)."""
        device = self.mean.device
        for key, s in structure["sites"].items():
            for name, a in s["adapters"].items():
                if key in self.sites and name in self.sites[key].adapters:
                    continue
                if key not in self.sites:
                    placement = cast(AdapterSpec, ADAPTERS.get(a["type"])).adapter_cls.placement
                    fin, fout = site_features(self.backbone, s["target"], placement)
                    site = AdaptedSite(s["target"], placement, fin, fout)
                    site.install(self.backbone)
                    self.sites[key] = site
                site = self.sites[key]
                site.add(
                    name, adapter_from_spec(a["type"], a["config"], site.in_features, site.out_features).to(device)
                )
            if s.get("router"):
                self.sites[key].router = ExpandableRouter(
                    self.sites[key].in_features, s["router"]["columns"], s["router"].get("pending", 0)
                ).to(device)
        for key, spec in structure["heads"].items():
            self.heads[key] = head_from_spec(spec).to(device)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything except the frozen backbone (sites, heads, extras)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def assert_backbone_frozen(self) -> None:
        bad = [n for n, p in self.backbone.named_parameters() if p.requires_grad]
        if bad:
            raise RuntimeError(f"backbone parameters became trainable: {bad[:3]}")
