"""Shared fixtures: tiny random ViT, tiny synthetic stream, smoke configs (no network, no downloaded weights)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cl.plugins import load_builtin

load_builtin()

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    return 0


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


@pytest.fixture
def tiny_backbone():
    """timm's ``test_vit`` (64-d, 6 blocks), random init, frozen, at 32 px."""
    from cl.backbone import BackboneConfig, create_backbone

    return create_backbone(BackboneConfig(name="test_vit", img_size=32))


@pytest.fixture
def tiny_model(tiny_backbone):
    from cl.model import CLModel

    backbone, spec = tiny_backbone
    return CLModel(backbone, spec)


@pytest.fixture
def tiny_stream():
    """Synthetic stream, 3 tasks x 2 classes, 32 px."""
    from streams.synthetic import SyntheticConfig, build_synthetic

    return build_synthetic(SyntheticConfig(num_classes=6, increment=2, train_images_per_class=12,
                                           test_images_per_class=6), 32)


@pytest.fixture
def smoke_config(tmp_path):
    """``smoke_config(*overrides)`` -> ExperimentConfig of configs/smoke.yaml writing under tmp_path."""
    from cl.config import load_config

    def make(*overrides: str):
        return load_config(SMOKE, [f"out={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture
def interrupt_run(monkeypatch):
    """``interrupt_run(cfg, at_task, **run_kwargs)``: ``cl.loop.run(cfg)`` killed (``KeyboardInterrupt``) in the
    evaluation after task ``at_task``, i.e. after the checkpoint of task ``at_task - 1`` and before that of
    ``at_task``; the loop is restored afterwards, so the test can resume the run (``run(cfg, resume=True)``)."""
    from cl import loop

    def interrupt(cfg, at_task: int, **run_kwargs) -> None:
        real_eval = loop._evaluate

        def dying_eval(model, strategy, stream, upto, ctx, future):
            if upto == at_task:
                raise KeyboardInterrupt
            return real_eval(model, strategy, stream, upto, ctx, future)

        monkeypatch.setattr(loop, "_evaluate", dying_eval)
        try:
            with pytest.raises(KeyboardInterrupt):
                loop.run(cfg, **run_kwargs)
        finally:
            monkeypatch.setattr(loop, "_evaluate", real_eval)

    return interrupt
