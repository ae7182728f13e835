"""Image sources, the memory-capped uint8 cache, and the lazy :class:`ImageDataset` every stream yields.

Images are decoded once to uint8 ``(3, H, W)`` and go through the stream's :class:`cl.transforms.Preprocessing` per
sample: the eval view (and the train view when ``augment: none``) is deterministic and cached after its transform;
with a random train view, file images are cached decoded (at their own size) and transformed on every read.

The cache holds at most ``stream.cache_mb`` MiB per process (one budget for the whole stream, train and test).
Once full, further images are decoded on demand (nothing is evicted, so what is cached stays cached; a warning is
logged once). Bytes per cached image: ``3 * S * S`` for an eval view at input size S (150,528 at S = 224), ``3 * H
* W`` for a decoded file image. In-memory sources (CIFAR, Fashion-MNIST, synthetic) are never cached decoded: their
arrays already are. DataLoader workers (``train.num_workers > 0``) start from a copy of the main process's cache and
may fill their own copy up to the cap.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cl.transforms import Preprocessing, check_image_file, decode_image, mix_seed, to_chw_image
from cl.types import ViewableDataset

__all__ = ["ArraySource", "FileSource", "ImageCache", "ImageDataset", "IntsLike"]

log = logging.getLogger(__name__)

IntsLike = Sequence[int] | np.ndarray  # indices or labels: a list of ints or an integer array


class ArraySource:
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, C)``."""

    in_memory = True

    def __init__(self, images: np.ndarray, name: str = "array") -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"ArraySource needs uint8 (N,H,W[,C]) images, got {images.dtype} {images.shape}")
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Tensor:
        """Image ``i`` as uint8 ``(3, H, W)`` (greyscale repeated, alpha dropped)."""
        return to_chw_image(self.images[i])  # (H, W) or (H, W, C) array

    def check(self, indices: IntsLike) -> None:
        """Nothing to check: the array was validated when it was read."""


class FileSource:
    """Images on disk, decoded lazily with Pillow (:func:`cl.transforms.decode_image`)."""

    in_memory = False

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Tensor:
        """Image ``i`` decoded to uint8 ``(3, H, W)``; raises ``DataError`` naming the file if it cannot be."""
        return decode_image(self.paths[i])

    def check(self, indices: IntsLike) -> None:
        """Header scan of the given files (:func:`cl.transforms.check_image_file`); raises ``DataError`` on the first
        file that cannot be decoded or converted."""
        for i in indices:
            check_image_file(self.paths[int(i)])


class ImageCache:
    """A byte-capped store of uint8 tensors (no eviction: once full, new entries are refused).

    Args:
        cap_bytes: budget in bytes (``None`` = unbounded, 0 = disabled).
    """

    def __init__(self, cap_bytes: int | None) -> None:
        self.cap_bytes = cap_bytes
        self.used_bytes = 0
        self.refused = 0
        self._store: dict[Hashable, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: Hashable) -> Tensor | None:
        return self._store.get(key)

    def put(self, key: Hashable, value: Tensor) -> bool:
        """Store ``value`` if it fits the budget; returns whether it was stored."""
        if self.cap_bytes == 0:
            return False
        nbytes = value.numel() * value.element_size()
        if self.cap_bytes is not None and self.used_bytes + nbytes > self.cap_bytes:
            if not self.refused:
                log.warning("image cache full (%.1f MiB of stream.cache_mb=%.1f): further images are decoded on "
                            "demand", self.used_bytes / 2**20, self.cap_bytes / 2**20)
            self.refused += 1
            return False
        self._store[key] = value
        self.used_bytes += nbytes
        return True


class ImageDataset(ViewableDataset):
    """Lazy image dataset over a source, with incremental labels and a train or eval view.

    Items are ``(uint8 (3, S, S), incremental label)``. Views and subsets share the cache. The train view of sample
    ``i`` is drawn from a generator seeded by ``mix_seed(aug_seed, epoch seed, source index)``; the loop sets the epoch
    seed (:func:`cl.transforms.set_augmentation_seed`).

    Args:
        source: where images come from.
        indices: positions in ``source``.
        labels: incremental labels, one per index.
        prep: the stream's preprocessing.
        kind: ``train`` or ``eval`` view.
        cache: shared :class:`ImageCache` (``None``: no caching).
        aug_seed: per-task part of the augmentation seed.
        split: name of the source in cache keys (``train`` / ``test``).
    """

    def __init__(
        self,
        source: ArraySource | FileSource,
        indices: IntsLike,
        labels: IntsLike,
        prep: Preprocessing,
        kind: Literal["train", "eval"] = "eval",
        cache: ImageCache | None = None,
        aug_seed: int = 0,
        split: str = "data",
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError("indices and labels differ in length")
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.prep = prep
        self.kind = kind
        self.cache = cache
        self.aug_seed = aug_seed
        self.split = split
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_size(self) -> int:
        return self.prep.img_size

    @property
    def augment(self) -> str:
        """The train augmentation (``none`` for the eval view)."""
        return "none" if self.kind == "eval" else self.prep.augment

    @property
    def deterministic(self) -> bool:
        return self.kind == "eval" or not self.prep.random

    def _like(self, indices: np.ndarray, labels: Tensor, kind: Literal["train", "eval"]) -> ImageDataset:
        out = ImageDataset(self.source, indices, labels.tolist(), self.prep, kind, self.cache, self.aug_seed,
                           self.split)
        out.epoch_seed = self.epoch_seed
        return out

    def view(self, kind: Literal["train", "eval"]) -> ImageDataset:
        return self._like(self.indices, self.labels, kind)

    def subset(self, positions: Sequence[int]) -> ImageDataset:
        pos = np.asarray(positions, dtype=np.int64)
        return self._like(self.indices[pos], self.labels[pos], self.kind)

    def set_augmentation_seed(self, seed: int) -> None:
        """Epoch seed of the train view (called by the loop before every epoch)."""
        self.epoch_seed = int(seed)

    def sample_seed(self, i: int) -> int:
        """Seed of the generator the train view of item ``i`` draws from."""
        return mix_seed(self.aug_seed, self.epoch_seed, int(self.indices[i]))

    def raw(self, i: int) -> Tensor:
        """Item ``i`` decoded, before any preprocessing: uint8 ``(3, H, W)`` at the source's size."""
        src = int(self.indices[i])
        if self.source.in_memory or self.cache is None:
            return self.source.load(src)
        key = (self.split, "raw", src)
        img = self.cache.get(key)
        if img is None:
            img = self.source.load(src)
            self.cache.put(key, img)
        return img

    def _eval_view(self, i: int) -> Tensor:
        src = int(self.indices[i])
        key = (self.split, "eval", src)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        decoded = self.cache.get((self.split, "raw", src)) if self.cache is not None else None
        img = self.prep.eval_view(decoded if decoded is not None else self.source.load(src))
        if self.cache is not None:
            self.cache.put(key, img)
        return img

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        label = int(self.labels[i])
        if self.deterministic:
            return self._eval_view(i), label
        gen = torch.Generator().manual_seed(self.sample_seed(i))
        if self.prep.augment == "flip":  # flip of the (cached) eval view, the same draw as train_view makes
            img = self._eval_view(i)
            return (img.flip(-1) if not bool(torch.rand(1, generator=gen) >= 0.5) else img), label
        return self.prep.train_view(self.raw(i), gen), label
