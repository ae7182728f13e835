"""Building blocks shared by every stream: stream configs and stream assembly (splits, checks, preprocessing).

Datasets yield ``(uint8 tensor (3, S, S), incremental label)`` for the backbone's input size ``S``: images are
decoded once, cached as uint8 under a memory cap, and preprocessed per sample by :mod:`cl.transforms` (the official
PILOT or LAE pipelines, ``stream.transform``); normalisation runs on the device inside the model
(``cl.model.CLModel``). Sources, the cache and the dataset class live in :mod:`streams.dataset`.

:func:`assemble_stream` checks the data before anything trains: every file is scanned (header + ``verify``), and a
task without test images or a class without train or test images stops with one line naming the task, its classes
and the folders looked at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl.errors import DataError, MissingDatasetError
from cl.transforms import Augment, Interpolation, Preprocessing, TransformName
from cl.types import Stream, Task
from streams.dataset import ArraySource, FileSource, ImageCache, ImageDataset, IntsLike
from streams.split import class_order, split_classes

__all__ = [
    "StreamConfig",
    "ArraySource",
    "FileSource",
    "ImageDataset",
    "assemble_stream",
    "read_label_list",
    "per_class_subset",
    "MissingDatasetError",
    "StreamSpec",
    "register_stream",
    "stream_preprocessing",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Fields common to every stream (``stream.*`` in the experiment YAML).

    Attributes:
        name: registry name of the stream.
        root: dataset root directory (file-based streams).
        init_classes: classes in the first task (0 = ``increment``).
        increment: classes per later task. Counts that do not divide follow PILOT's rule
            (``utils/data_manager.py``): ``increment`` while a full task fits, then one smaller last task.
        order_seed: class-order permutation seed (PILOT default 1993); ``None`` = natural order.
        class_order: explicit class order (overrides ``order_seed``).
        train_per_class / test_per_class: keep at most this many images per class (seeded subset), ``None`` = all.
        subset_seed: seed for the per-class subsets.
        transform: preprocessing pipeline (:mod:`cl.transforms`): ``pilot`` (PILOT, SEMA, MOS), ``lae`` (LAE), or
            ``none`` (a plain square resize, no crop).
        augment: training view: ``none`` (= the eval view: deterministic), ``flip``, or ``crop``
            (``RandomResizedCrop`` + flip of the chosen pipeline; ``pilot`` is a legacy name of ``crop``).
        interpolation: ``bilinear`` / ``bicubic`` for both views (``None`` = the pipeline's own).
        crop_ratio: eval ``S / resize`` in (0, 1] (``None`` = the pipeline's, 224/256 for pilot and lae).
        cache: cache decoded / preprocessed uint8 images in memory.
        cache_mb: memory cap of that cache in MiB per process (``None`` = unbounded); once full, images are decoded
            on demand. An eval view costs ``3 * S * S`` bytes (147 KiB at S = 224).
        check_files: scan every image file when the stream is built (header and ``verify``), so an undecodable file
            stops the run before training.
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
    transform: TransformName = "pilot"
    augment: Augment = "none"
    interpolation: Interpolation | None = None
    crop_ratio: float | None = None
    cache: bool = True
    cache_mb: float | None = 4096.0
    check_files: bool = True

    def __post_init__(self) -> None:
        if self.increment <= 0:
            raise ValueError(f"stream.increment must be positive, got {self.increment}")
        if self.init_classes < 0:
            raise ValueError(f"stream.init_classes must be >= 0, got {self.init_classes}")
        Preprocessing(1, self.transform, self.augment, self.interpolation, self.crop_ratio)  # validates the fields
        if self.cache_mb is not None and self.cache_mb < 0:
            raise ValueError(f"stream.cache_mb must be >= 0 or null, got {self.cache_mb}")
        for key in ("train_per_class", "test_per_class"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ValueError(f"stream.{key} must be positive or null, got {v}")


def stream_preprocessing(cfg: StreamConfig, image_size: int) -> Preprocessing:
    """The :class:`~cl.transforms.Preprocessing` a stream config selects for input size ``image_size``."""
    return Preprocessing.from_config(cfg, image_size)


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


def _class_label(c: int, class_names: Sequence[str] | np.ndarray | None) -> str:
    return f"{c} ({class_names[c]})" if class_names is not None else str(c)


def _check_split(cfg: StreamConfig, groups: list[list[int]], train_y: np.ndarray, test_y: np.ndarray,
                 class_names: Sequence[str] | np.ndarray | None, locations: Mapping[str, str]) -> None:
    """Every class of every task has train and test images, else one line naming the task, classes and folders."""
    n_train = np.bincount(train_y, minlength=max(max(c for g in groups for c in g) + 1, 1))
    n_test = np.bincount(test_y, minlength=len(n_train))
    for t, cls in enumerate(groups):
        classes = ", ".join(_class_label(c, class_names) for c in cls)
        for split, counts in (("test", n_test), ("train", n_train)):
            empty = [c for c in cls if counts[c] == 0]
            if not empty:
                continue
            what = (f"no {split} images" if len(empty) == len(cls) else
                    f"no {split} images for class{'es' if len(empty) > 1 else ''} "
                    f"{', '.join(_class_label(c, class_names) for c in empty)}")
            raise DataError(f"{cfg.name}: task {t} (classes {classes}) has {what}; looked in "
                            f"{locations.get(split, 'the ' + split + ' split')}")


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
    locations: Mapping[str, str] | None = None,
) -> Stream:
    """Turn a labelled train/test pair into a class-incremental :class:`Stream`.

    Labels are original class ids ``0..num_classes-1``; each task's datasets carry incremental labels (the class's
    position in the order). ``natural_order`` forces the unshuffled order (ImageNet-A, VTAB in the PILOT code) unless
    the config gives an explicit order. ``locations`` (``{"train": ..., "test": ...}``) name where the images were
    looked for, for error messages.

    Raises:
        DataError: a class of some task has no train or no test images (one line naming the task, its classes and
            the folders looked at), or a file cannot be decoded (``cannot decode <path> (<reason>)``).
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
    groups = split_classes(order, cfg.init_classes, cfg.increment)
    root = (meta or {}).get("root")
    where = dict(locations or ({"train": str(root), "test": str(root)} if root else {}))
    _check_split(cfg, groups, train_y[tr_keep], test_y[te_keep], class_names, where)
    if cfg.check_files:
        train_source.check(tr_keep)
        test_source.check(te_keep)
    log.info("%s: %d tasks of %s classes", cfg.name, len(groups), [len(g) for g in groups])
    prep = stream_preprocessing(cfg, image_size)
    test_prep = Preprocessing(image_size, prep.transform, "none", prep.interpolation, prep.crop_ratio)
    cache = ImageCache(None if cfg.cache_mb is None else int(cfg.cache_mb * 2**20)) if cfg.cache else None
    tasks = []
    offset = 0
    for t, cls in enumerate(groups):
        cls_set = np.asarray(cls)
        tr = tr_keep[np.isin(train_y[tr_keep], cls_set)]
        te = te_keep[np.isin(test_y[te_keep], cls_set)]
        train_ds = ImageDataset(train_source, tr, rank[train_y[tr]], prep, "train", cache, aug_seed=t, split="train")
        test_ds = ImageDataset(test_source, te, rank[test_y[te]], test_prep, "eval", cache, aug_seed=t, split="test")
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
        meta={**(meta or {}), "task_sizes": [len(g) for g in groups], "transform": prep.transform,
              "augment": prep.augment},
    )


@dataclass(frozen=True)
class StreamSpec:
    """A registered stream: its config class and its builder ``build(cfg, image_size) -> Stream``."""

    config_cls: type[StreamConfig]
    build: Callable[[StreamConfig, int], Stream]



def read_label_list(list_file: Path, base: Path,
                    line_format: str = "<path> <label>") -> tuple[list[str], list[int], dict[int, str]]:
    """Parse a split list of ``<relative path> <label>`` lines (L2P / LAE / PILOT style; blank lines skipped).

    Returns:
        The paths (resolved against ``base``), their labels, and label -> class name (the path's parent folder).

    Raises:
        ValueError: ``<file>:<line>: ...`` for a line that is not two fields ending in a non-negative integer label
            (``line_format`` names the expected form), or a label that names two different class folders.
    """
    paths: list[str] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    with open(list_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{list_file}:{n}: expected '{line_format}', got {line.strip()!r}")
            rel, label = parts[0], int(parts[1])
            cls = Path(rel).parent.name
            if names.setdefault(label, cls) != cls:
                raise ValueError(f"{list_file}:{n}: label {label} names both {names[label]} and {cls}")
            paths.append(str(base / rel))
            labels.append(label)
    return paths, labels, names


def register_stream(name: str, config_cls: type[StreamConfig] = StreamConfig) -> Callable:
    """Decorator registering a stream builder ``(cfg, image_size) -> Stream`` under ``name`` in ``STREAMS``."""
    from cl.registries import STREAMS

    def deco(fn: Callable[[StreamConfig, int], Stream]) -> Callable[[StreamConfig, int], Stream]:
        STREAMS.add(name, StreamSpec(config_cls, fn))
        return fn

    return deco
