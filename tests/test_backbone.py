"""Backbone creation: frozen timm ViT, safe local weights, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from cl.backbone import BackboneConfig, BackboneError, adopt_backbone, create_backbone


def test_backbone_frozen_eval_and_resized():
    model, spec = create_backbone(BackboneConfig(name="test_vit", img_size=48))
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    assert spec.img_size == 48 and spec.num_features == 64 and spec.num_blocks == 6
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 64)


def test_adopted_backbone_gets_the_spec_create_backbone_gives():
    """``adopt_backbone`` (the Avalanche bridge's ``model=``) and ``create_backbone`` share one freeze + spec path."""
    import timm

    _, created = create_backbone(BackboneConfig(name="test_vit", img_size=48))
    given = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=48)
    model, spec = adopt_backbone(given, BackboneConfig(name="ignored"))
    assert model is given and model.num_classes == 0 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert spec == created
    _, raw = adopt_backbone(given, BackboneConfig(normalize=False))
    assert (raw.mean, raw.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(BackboneError, match="VisionTransformer"):
        adopt_backbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_safely(tmp_path, suffix):
    src, _ = create_backbone(BackboneConfig(name="test_vit", img_size=32))
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model, _ = create_backbone(BackboneConfig(name="test_vit", img_size=32, weights=str(path)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_weights_that_do_not_fit_fail_clearly(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"nonsense": torch.zeros(2)}, str(path))
    with pytest.raises(BackboneError, match="does not fit test_vit"):
        create_backbone(BackboneConfig(name="test_vit", weights=str(path)))
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(BackboneConfig(name="test_vit", weights=str(tmp_path / "missing.pth")))


def test_unknown_model_names_close_matches():
    with pytest.raises(BackboneError, match="close matches: .*vit_small_patch16_224"):
        create_backbone(BackboneConfig(name="vit_smal_patch16_224"))


def test_download_failure_is_one_line_with_the_fix():
    code = ("from cl.backbone import *\n"
            "try:\n create_backbone(BackboneConfig(name='vit_base_patch16_224.augreg_in21k', pretrained=True))\n"
            "except BackboneError as e:\n print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("ERR")][0]
    assert "could not download pretrained weights" in line and "backbone.weights=" in line
