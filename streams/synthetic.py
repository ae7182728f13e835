"""Synthetic class-incremental stream: procedurally generated class-conditional images, no downloads.

Each class is a fixed mixture of coloured sinusoidal gratings (class-specific frequencies, orientations and colours);
each image draws a random phase, amplitude jitter and pixel noise scaled by ``difficulty``. An optional per-task
domain id applies a fixed style transform (colour mixing, inversion and a texture overlay) to that task's images,
which is how tests create distribution shift (SEMA's expansion detector must fire on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cl.types import Stream
from streams.base import ArraySource, StreamConfig, assemble_stream, register_stream

__all__ = ["SyntheticConfig", "build_synthetic", "make_synthetic_arrays"]


@dataclass(frozen=True)
class SyntheticConfig(StreamConfig):
    """``stream.name: synthetic``.

    Attributes:
        num_classes: number of classes.
        train_images_per_class / test_images_per_class: images generated per class and split.
        native_size: generated image side in pixels (resized to the backbone's input size).
        difficulty: noise level in [0, 1]; 0 = clean patterns, 1 = heavy noise and jitter.
        task_domains: domain id per task (0 = the base domain); ``None`` = every task in domain 0. A task whose
            domain equals an earlier task's is drawn from the same distribution.
        data_seed: seed of the class patterns and samples.
    """

    num_classes: int = 6
    train_images_per_class: int = 24
    test_images_per_class: int = 12
    native_size: int = 32
    difficulty: float = 0.3
    task_domains: tuple[int, ...] | None = None
    data_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError(f"stream.num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"stream.difficulty must be in [0, 1], got {self.difficulty}")
        if self.native_size < 8:
            raise ValueError(f"stream.native_size must be >= 8, got {self.native_size}")


def _class_params(num_classes: int, rng: np.random.Generator) -> list[dict]:
    params = []
    for _ in range(num_classes):
        k = 3
        params.append(
            {
                "freq": rng.uniform(1.0, 5.0, size=k),
                "angle": rng.uniform(0, np.pi, size=k),
                "color": rng.uniform(-1.0, 1.0, size=(k, 3)),
                "base": rng.uniform(0.3, 0.7, size=3),
            }
        )
    return params


def _domain_style(domain: int, size: int) -> dict | None:
    if domain == 0:
        return None
    rng = np.random.default_rng(10_000 + domain)
    mix = rng.normal(0, 0.6, size=(3, 3)) + np.eye(3) * 0.2
    yy, xx = np.mgrid[0:size, 0:size] / size
    texture = 0.35 * np.sign(np.sin(2 * np.pi * rng.uniform(6, 10) * (xx + yy * rng.uniform(-1, 1))))
    return {"mix": mix, "texture": texture[..., None], "invert": bool(domain % 2)}


def _render(p: dict, n: int, size: int, difficulty: float, rng: np.random.Generator, style: dict | None) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S)
    out = np.empty((n, size, size, 3), dtype=np.float64)
    for i in range(n):
        img = np.broadcast_to(p["base"], (size, size, 3)).copy()
        for f, a, col in zip(p["freq"], p["angle"], p["color"], strict=True):
            phase = rng.uniform(0, 2 * np.pi)
            amp = 0.25 * (1 + difficulty * rng.normal(0, 0.5))
            jitter_a = a + difficulty * rng.normal(0, 0.15)
            wave = np.cos(2 * np.pi * f * (xx * np.cos(jitter_a) + yy * np.sin(jitter_a)) + phase)
            img += amp * wave[..., None] * col
        img += rng.normal(0, 0.3 * difficulty, size=img.shape)
        if style is not None:
            img = (img - 0.5) @ style["mix"].T + 0.5 + style["texture"]
            if style["invert"]:
                img = 1.0 - img
        out[i] = img
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def make_synthetic_arrays(cfg: SyntheticConfig, class_domains: np.ndarray) -> tuple[np.ndarray, ...]:
    """Generate ``(train_x, train_y, test_x, test_y)`` uint8 arrays; ``class_domains[c]`` = domain of class c."""
    rng = np.random.default_rng(cfg.data_seed)
    params = _class_params(cfg.num_classes, rng)
    xs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    ys: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c, p in enumerate(params):
        style = _domain_style(int(class_domains[c]), cfg.native_size)
        for split, n in (("train", cfg.train_images_per_class), ("test", cfg.test_images_per_class)):
            xs[split].append(_render(p, n, cfg.native_size, cfg.difficulty, rng, style))
            ys[split].append(np.full(n, c, dtype=np.int64))
    return (
        np.concatenate(xs["train"]),
        np.concatenate(ys["train"]),
        np.concatenate(xs["test"]),
        np.concatenate(ys["test"]),
    )


@register_stream("synthetic", SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig, image_size: int) -> Stream:
    """Build the synthetic stream; classes of a task with domain d are rendered in domain d's style."""
    from streams.split import class_order, split_classes

    order = class_order(cfg.num_classes, cfg.order_seed, cfg.class_order)
    groups = split_classes(order, cfg.init_classes, cfg.increment)
    domains = cfg.task_domains or tuple(0 for _ in groups)
    if len(domains) != len(groups):
        raise ValueError(f"stream.task_domains has {len(domains)} entries but the split has {len(groups)} tasks")
    class_domains = np.zeros(cfg.num_classes, dtype=np.int64)
    for g, d in zip(groups, domains, strict=True):
        class_domains[g] = d
    trx, try_, tex, tey = make_synthetic_arrays(cfg, class_domains)
    return assemble_stream(
        cfg,
        num_classes=cfg.num_classes,
        train_source=ArraySource(trx),
        train_labels=try_,
        test_source=ArraySource(tex),
        test_labels=tey,
        image_size=image_size,
        class_names=[f"class_{c}" for c in range(cfg.num_classes)],
        meta={"task_domains": list(domains)},
    )
