"""Converters between clsim streams and Avalanche benchmarks, and the datasets they are made of (see
:mod:`cl.integrations.avalanche`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

with warnings.catch_warnings():  # avalanche warns at import that the optional QP solver (GEM) is missing
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.benchmarks.scenarios import CLScenario, benchmark_from_datasets, with_classes_timeline
    from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset

from cl.transforms import Preprocessing, mix_seed, to_chw_image
from cl.types import Stream, Task, ViewableDataset, labels_of

__all__ = ["AvalancheView", "stream_to_avalanche", "avalanche_to_stream"]


_MARK = "clsim_view"  # data attribute of the datasets stream_to_avalanche makes: items are clsim views already


def _is_clsim_view(data: Any) -> bool:
    try:
        return getattr(data, _MARK, None) is not None
    except Exception:  # avalanche raises various errors for unknown attributes of some dataset kinds
        return False


class AvalancheView(ViewableDataset):
    """An Avalanche dataset seen as a clsim dataset: ``(image, incremental label)``; ``(x, y, t)`` items are fine.

    ``view("train")`` / ``view("eval")`` read the dataset's own ``train()`` / ``eval()`` transform groups, then apply
    clsim's train / eval preprocessing (``prep``, :mod:`cl.transforms`), exactly as a clsim stream does: images of any
    size (PIL, numpy, uint8 or float tensors) become ``(3, S, S)``. Datasets made by :func:`stream_to_avalanche`
    already yield clsim views and pass unchanged. The train view's randomness is seeded per sample and per epoch
    (``set_augmentation_seed``, called by the loop). ``prep=None`` only converts to 3 channels.

    Limitation: the clsim views inside a :func:`stream_to_avalanche` benchmark are out of the loop's reach, so with a
    random train view (``augment: flip | crop``) they keep their first epoch's augmentation in every epoch; such runs
    match ``clsim run`` only with ``augment: none``.
    """

    def __init__(self, data: Any, label_of: dict[int, int], prep: Preprocessing | None, kind: str = "train",
                 aug_seed: int = 0) -> None:
        self.data, self.label_of, self.prep, self.kind, self.aug_seed = data, label_of, prep, kind, aug_seed
        self._view = data.train() if kind == "train" else data.eval()
        self._as_is = _is_clsim_view(data)
        self.epoch_seed = 0
        self.labels = torch.tensor([label_of[int(c)] for c in data.targets], dtype=torch.long)

    def view(self, kind: str) -> AvalancheView:
        return AvalancheView(self.data, self.label_of, self.prep, kind, self.aug_seed)

    def __len__(self) -> int:
        return len(self.labels)

    def set_augmentation_seed(self, seed: int) -> None:
        self.epoch_seed = int(seed)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self._view[i]
        label = self.label_of[int(item[1])]
        if self._as_is:
            return item[0], label
        x = to_chw_image(item[0])
        if self.prep is None:
            return x, label
        if self.kind == "train":
            gen = torch.Generator().manual_seed(mix_seed(self.aug_seed, self.epoch_seed, i))
            return self.prep.train_view(x, gen), label
        return self.prep.eval_view(x), label


class _EvalPrep(Dataset):
    """An Avalanche eval dataset whose items' first element goes through clsim's eval view (before collation, so
    images of mixed sizes batch). Keeps the wrapped dataset's ``collate_fn``."""

    def __init__(self, data: Any, prep: Preprocessing) -> None:
        self.data, self.prep = data, prep
        self.collate_fn = getattr(data, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        return (self.prep.eval_view(to_chw_image(item[0])), *item[1:])


class _Indices(Dataset):
    """Yields ``(index, label)``; the transform groups turn the index into the image of the right clsim view."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor(i), self.labels[i]


class _Fetch:
    """Transform: index -> image of one clsim dataset view (a class, not a lambda, so checkpoints pickle)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __call__(self, i: Tensor) -> Tensor:
        return self.ds[int(i)][0]


def _as_avalanche(ds: ViewableDataset, targets: list[int], group: str) -> Any:
    views = TransformGroups({"train": _Fetch(ds.view("train")), "eval": _Fetch(ds.view("eval"))}, current_group=group)
    return make_avalanche_dataset(_Indices(targets), transform_groups=views,
                                  data_attributes=[DataAttribute(targets, "targets"),
                                                   DataAttribute([1] * len(targets), _MARK)])


def stream_to_avalanche(stream: Stream, label_space: str = "incremental") -> CLScenario:
    """A clsim stream as an Avalanche benchmark with one experience per task (a smaller last task included).

    ``label_space="incremental"`` (default) uses clsim's incremental labels as Avalanche class ids (what
    :class:`ClsimStrategy` reproduces ``clsim run`` with); ``"original"`` uses the dataset's class ids. Train
    experiences yield the train view (augmented) in ``dataset.train()`` and the eval view in ``dataset.eval()``.
    """
    if label_space not in ("incremental", "original"):
        raise ValueError(f"label_space={label_space!r}; valid choices: incremental, original")

    def ids(ds: Dataset) -> list[int]:
        lab = labels_of(ds).tolist()
        return lab if label_space == "incremental" else [int(stream.class_order[v]) for v in lab]

    train = [_as_avalanche(t.train, ids(t.train), "train") for t in stream.tasks]
    test = [_as_avalanche(t.test, ids(t.test), "eval") for t in stream.tasks]
    return with_classes_timeline(benchmark_from_datasets(train=train, test=test))


def _classes(exp: Any) -> set[int]:
    cls = getattr(exp, "classes_in_this_experience", None)
    return {int(c) for c in (cls if cls is not None else exp.dataset.targets.uniques)}


def avalanche_to_stream(benchmark: Any, image_size: int | None, name: str = "avalanche",
                        class_order: Sequence[int] | None = None, prep: Preprocessing | None = None) -> Stream:
    """An Avalanche class-incremental benchmark as a clsim stream (one task per training experience).

    Avalanche class ids get incremental labels in order of first appearance across experiences (sorted within an
    experience, or in ``class_order``); ``Task.class_ids`` are the Avalanche ids. Test data of each task are the
    test samples of its classes (index-aligned test experiences are used as they are). Images go through clsim's
    preprocessing for input size ``image_size`` (``prep``, default ``Preprocessing(image_size)``: the PILOT eval
    pipeline, no augmentation); ``image_size=None`` leaves their size as it comes.
    """
    if prep is None and image_size is not None:
        prep = Preprocessing(image_size)
    return _stream_from(list(benchmark.train_stream), list(benchmark.test_stream), prep, name, class_order)


def _stream_from(train_exps: list[Any], test_exps: list[Any], prep: Preprocessing | None, name: str = "avalanche",
                 class_order: Sequence[int] | None = None) -> Stream:
    """:func:`avalanche_to_stream` on lists of experiences; without test experiences the test sets are empty."""
    groups: list[list[int]] = []
    for exp in train_exps:
        cls = _classes(exp)
        new = sorted(cls) if class_order is None else [int(c) for c in class_order if int(c) in cls]
        if set(new) != cls or any(c in g for g in groups for c in new):
            raise ValueError(f"experience {len(groups)} has classes {sorted(cls)}: clsim tasks need new, disjoint "
                             f"classes (class-incremental benchmarks only)")
        groups.append(new)
    order = [c for g in groups for c in g]
    label_of = {c: i for i, c in enumerate(order)}
    tasks, offset = [], 0
    for t, (group, exp) in enumerate(zip(groups, train_exps, strict=True)):
        parts = []
        for te in test_exps:
            targets = np.asarray([int(c) for c in te.dataset.targets])
            keep = np.flatnonzero(np.isin(targets, group))
            if len(keep) == len(targets):
                parts.append(te.dataset)
            elif len(keep):
                parts.append(te.dataset.subset(keep.tolist()))
        if test_exps and not parts:
            raise ValueError(f"no test samples for the classes {group} of experience {t}")
        test = parts[0] if parts else exp.dataset.subset([])
        for p in parts[1:]:
            test = test.concat(p)
        tasks.append(Task(t, group, list(range(offset, offset + len(group))),
                          AvalancheView(exp.dataset, label_of, prep, "train", aug_seed=t),
                          AvalancheView(test, label_of, prep, "eval", aug_seed=t)))
        offset += len(group)
    return Stream(name, tasks, len(order), order, image_size=prep.img_size if prep else 0)
