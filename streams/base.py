"""Building blocks shared by every stream: stream configs, lazy image datasets, and stream assembly.

Datasets yield ``(uint8 tensor (3, S, S), incremental label)``: images are resized to the backbone's input size ``S``
(and cached when small), while normalisation runs on the device inside the model (``cl.model.CLModel``), which keeps
decoding and float conversion off the data-loading hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cl.errors import MissingDatasetError
from cl.types import Stream, Task, ViewableDataset
from streams.split import class_order, split_classes

__all__ = [
    "StreamConfig",
    "ArraySource",
    "FileSource",
    "ImageDataset",
    "assemble_stream",
    "per_class_subset",
    "MissingDatasetError",
    "StreamSpec",
    "register_stream",
]

Augment = Literal["none", "flip", "pilot"]
IntsLike = Sequence[int] | np.ndarray  # indices or labels: a list of ints or an integer array


@dataclass(frozen=True)
class StreamConfig:
    """Fields common to every stream (``stream.*`` in the experiment YAML).

    Attributes:
        name: registry name of the stream.
        root: dataset root directory (file-based streams).
        init_classes: classes in the first task (0 = ``increment``).
        increment: classes per later task; a remainder goes to the last task.
        order_seed: class-order permutation seed (PILOT default 1993); ``None`` = natural order.
        class_order: explicit class order (overrides ``order_seed``).
        train_per_class / test_per_class: keep at most this many images per class (seeded subset), ``None`` = all.
        subset_seed: seed for the per-class subsets.
        augment: training augmentation: none, flip, or pilot (RandomResizedCrop(scale 0.05-1) + flip).
        cache: cache resized images in memory (uint8) after first use.
    """

    name: str = "synthetic"
    root: str | None = None
    init_classes: int = 0
    increment: int = 2
    order_seed: int | None = 1993
    class_order: tuple[int, ...] | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    subset_seed: int = 0
    augment: Augment = "none"
    cache: bool = True

    def __post_init__(self) -> None:
        if self.increment <= 0:
            raise ValueError(f"stream.increment must be positive, got {self.increment}")
        if self.init_classes < 0:
            raise ValueError(f"stream.init_classes must be >= 0, got {self.init_classes}")
        if self.augment not in ("none", "flip", "pilot"):
            raise ValueError(f"stream.augment={self.augment!r}; valid choices: none, flip, pilot")
        for key in ("train_per_class", "test_per_class"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ValueError(f"stream.{key} must be positive or null, got {v}")


class ArraySource:
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, C)``."""

    def __init__(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"ArraySource needs uint8 (N,H,W[,C]) images, got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        if img.ndim == 2:
            img = img.unsqueeze(-1)
        return _to_rgb_chw(img.permute(2, 0, 1))


class FileSource:
    """Images on disk, decoded lazily with Pillow."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _to_rgb_chw(img: Tensor) -> Tensor:
    if img.shape[0] == 1:
        return img.expand(3, -1, -1).contiguous()
    if img.shape[0] == 4:
        return img[:3].contiguous()
    return img


def _resize(img: Tensor, size: int) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size), bicubic with antialias (a plain resize, no crop)."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(
        img.unsqueeze(0).float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def _random_resized_crop(img: Tensor, size: int) -> Tensor:
    """RandomResizedCrop(size, scale=(0.05, 1), ratio=(3/4, 4/3)) on a uint8 (3, H, W) tensor (PILOT transform)."""
    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.05, 1.0))
        log_r = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3)))
        ratio = float(np.exp(log_r))
        cw = int(round((target * ratio) ** 0.5))
        ch = int(round((target / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,)))
            left = int(torch.randint(0, w - cw + 1, (1,)))
            return _resize(img[:, top : top + ch, left : left + cw], size)
    return _resize(img, size)


class ImageDataset(ViewableDataset):
    """Lazy image dataset over a source, with incremental labels and a train or eval view.

    Resized images are cached (uint8) on first use when ``cache`` is on; the cache is shared between views.
    With ``augment="none"`` the train view is deterministic.
    """

    def __init__(
        self,
        source: ArraySource | FileSource,
        indices: IntsLike,
        labels: IntsLike,
        image_size: int,
        augment: Augment = "none",
        kind: Literal["train", "eval"] = "eval",
        cache: bool = True,
        aug_seed: int = 0,
        _shared: dict | None = None,
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError("indices and labels differ in length")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.image_size = int(image_size)
        self.augment = augment
        self.kind = kind
        self.cache = cache
        self.aug_seed = aug_seed
        self._shared = _shared if _shared is not None else {"resized": {}}

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def deterministic(self) -> bool:
        return self.kind == "eval" or self.augment == "none"

    def view(self, kind: Literal["train", "eval"]) -> ImageDataset:
        return ImageDataset(
            self.source,
            self.indices,
            self.labels.tolist(),
            self.image_size,
            self.augment,
            kind,
            self.cache,
            self.aug_seed,
            self._shared,
        )

    def subset(self, positions: Sequence[int]) -> ImageDataset:
        pos = np.asarray(positions, dtype=np.int64)
        return ImageDataset(
            self.source,
            self.indices[pos],
            self.labels[pos].tolist(),
            self.image_size,
            self.augment,
            self.kind,
            self.cache,
            self.aug_seed,
            self._shared,
        )

    def _resized(self, src_index: int) -> Tensor:
        cache = self._shared["resized"]
        if self.cache and src_index in cache:
            return cache[src_index]
        img = _resize(self.source.load(src_index), self.image_size)
        if self.cache:
            cache[src_index] = img
        return img

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        src = int(self.indices[i])
        label = int(self.labels[i])
        if self.kind == "eval" or self.augment == "none":
            return self._resized(src), label
        # Augmentation draws from torch's RNG of the current process: the loop reseeds it per task (and DataLoader
        # workers get derived seeds), so runs and resumed runs are reproducible.
        if self.augment == "pilot":
            img = _random_resized_crop(self.source.load(src), self.image_size)
        else:
            img = self._resized(src)
        if float(torch.rand(1)) < 0.5:
            img = img.flip(-1)
        return img, label


def per_class_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Positions keeping at most ``per_class`` samples of every class (seeded, order preserved)."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        if len(pos) > per_class:
            pos = np.sort(rng.choice(pos, size=per_class, replace=False))
        keep.append(pos)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def assemble_stream(
    cfg: StreamConfig,
    *,
    num_classes: int,
    train_source: ArraySource | FileSource,
    train_labels: IntsLike,
    test_source: ArraySource | FileSource,
    test_labels: IntsLike,
    image_size: int,
    class_names: Sequence[str] | np.ndarray | None = None,
    natural_order: bool = False,
    meta: dict | None = None,
    task_transform: Callable[[int, ImageDataset], ImageDataset] | None = None,
) -> Stream:
    """Turn a labelled train/test pair into a class-incremental :class:`Stream`.

    Labels are original class ids ``0..num_classes-1``; each task's datasets carry incremental labels (the class's
    position in the order). ``natural_order`` forces the unshuffled order (ImageNet-A, VTAB in the PILOT code) unless
    the config gives an explicit order.
    """
    train_y = np.asarray(train_labels, dtype=np.int64)
    test_y = np.asarray(test_labels, dtype=np.int64)
    for split, lab in (("train", train_y), ("test", test_y)):
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"{cfg.name}: {split} labels must lie in 0..{num_classes - 1}")
    seed = None if (natural_order and cfg.class_order is None) else cfg.order_seed
    order = class_order(num_classes, seed, cfg.class_order)
    rank = np.empty(num_classes, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(num_classes)
    tr_keep = per_class_subset(train_y, cfg.train_per_class, cfg.subset_seed)
    te_keep = per_class_subset(test_y, cfg.test_per_class, cfg.subset_seed + 1)
    tasks = []
    offset = 0
    for t, cls in enumerate(split_classes(order, cfg.init_classes, cfg.increment)):
        cls_set = np.asarray(cls)
        tr = tr_keep[np.isin(train_y[tr_keep], cls_set)]
        te = te_keep[np.isin(test_y[te_keep], cls_set)]
        train_ds = ImageDataset(
            train_source, tr, rank[train_y[tr]], image_size, cfg.augment, "train", cfg.cache, aug_seed=t
        )
        test_ds = ImageDataset(test_source, te, rank[test_y[te]], image_size, "none", "eval", cfg.cache)
        if task_transform is not None:
            train_ds, test_ds = task_transform(t, train_ds), task_transform(t, test_ds)
        tasks.append(Task(t, [int(c) for c in cls], list(range(offset, offset + len(cls))), train_ds, test_ds))
        offset += len(cls)
    return Stream(
        name=cfg.name,
        tasks=tasks,
        num_classes=num_classes,
        class_order=order,
        class_names=list(class_names) if class_names is not None else None,
        image_size=image_size,
        meta=dict(meta or {}),
    )


@dataclass(frozen=True)
class StreamSpec:
    """A registered stream: its config class and its builder ``build(cfg, image_size) -> Stream``."""

    config_cls: type[StreamConfig]
    build: Callable[[StreamConfig, int], Stream]


def register_stream(name: str, config_cls: type[StreamConfig] = StreamConfig) -> Callable:
    """Decorator registering a stream builder ``(cfg, image_size) -> Stream`` under ``name`` in ``STREAMS``."""
    from cl.registries import STREAMS

    def deco(fn: Callable[[StreamConfig, int], Stream]) -> Callable[[StreamConfig, int], Stream]:
        STREAMS.add(name, StreamSpec(config_cls, fn))
        return fn

    return deco
