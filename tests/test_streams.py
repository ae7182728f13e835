"""Class splitting, the synthetic stream and the image-folder stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from streams.base import MissingDatasetError, StreamConfig
from streams.image_folder import build_image_folder
from streams.split import class_order, split_classes, task_sizes
from streams.synthetic import SyntheticConfig, build_synthetic

# LAMDA-PILOT's rule (utils/data_manager.py): init_classes, then increment while it fits, then one smaller last task
SIZES = [(10, 0, 2, [2, 2, 2, 2, 2]), (10, 0, 3, [3, 3, 3, 1]), (10, 4, 3, [4, 3, 3]), (11, 4, 3, [4, 3, 3, 1]),
         (7, 5, 1, [5, 1, 1]), (5, 5, 2, [5]), (5, 4, 2, [4, 1]), (7, 0, 2, [2, 2, 2, 1]), (7, 2, 2, [2, 2, 2, 1]),
         (100, 0, 10, [10] * 10), (200, 0, 20, [20] * 10), (300, 0, 30, [30] * 10), (100, 50, 10, [50] + [10] * 5)]


def _pilot_reference(n: int, init: int, inc: int) -> list[int]:
    """DataManager.__init__ of LAMDA-PILOT, transcribed."""
    increments = [init or inc]
    while sum(increments) + inc < n:
        increments.append(inc)
    if n - sum(increments) > 0:
        increments.append(n - sum(increments))
    return increments


@pytest.mark.parametrize(("n", "init", "inc", "sizes"), SIZES)
def test_task_sizes_follow_pilot(n, init, inc, sizes):
    assert task_sizes(n, init, inc) == sizes
    groups = split_classes(class_order(n), init, inc)
    flat = [c for g in groups for c in g]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # every class in exactly one task
    assert sizes == _pilot_reference(n, init, inc)


def test_class_order_matches_pilot_convention():
    np.random.seed(1993)
    expected = np.random.permutation(100).tolist()
    assert class_order(100, 1993) == expected
    assert class_order(5, None) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="permutation"):
        class_order(3, explicit=[0, 0, 1])


def test_synthetic_stream_labels_contiguous_per_task():
    s = build_synthetic(SyntheticConfig(num_classes=7, increment=3, train_images_per_class=4,
                                        test_images_per_class=2), 16)
    assert [t.num_classes for t in s.tasks] == [3, 3, 1]
    seen = []
    for t in s.tasks:
        assert set(t.train.labels.tolist()) == set(t.labels) == set(t.test.labels.tolist())
        assert t.labels == list(range(t.label_offset, t.label_offset + t.num_classes))
        seen += t.class_ids
        x, y = t.train[0]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    assert sorted(seen) == list(range(7))


def test_synthetic_stream_is_deterministic_and_domains_shift():
    cfg = SyntheticConfig(num_classes=4, increment=2, train_images_per_class=3, test_images_per_class=1,
                          task_domains=(0, 1))
    a, b = build_synthetic(cfg, 16), build_synthetic(cfg, 16)
    assert torch.equal(a.tasks[1].train[0][0], b.tasks[1].train[0][0])
    with pytest.raises(ValueError, match="task_domains"):
        build_synthetic(SyntheticConfig(num_classes=4, increment=2, task_domains=(0,)), 16)


def _folder(root, classes, per_class=2):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(d / f"{i}.png")


def test_image_folder_stream(tmp_path):
    _folder(tmp_path, ["b", "a", "c"])
    s = build_image_folder(StreamConfig(name="image_folder", root=str(tmp_path), increment=2, order_seed=None), 16)
    assert s.class_names == ["a", "b", "c"] and s.num_classes == 3
    assert [t.num_classes for t in s.tasks] == [2, 1]  # the remainder is one smaller last task
    assert len(s.tasks[0].train) == 4 and len(s.tasks[1].train) == 2 and s.tasks[0].train[0][0].shape == (3, 16, 16)


def test_image_folder_missing_root_names_paths(tmp_path):
    with pytest.raises(MissingDatasetError, match=str(tmp_path / "nope")):
        build_image_folder(StreamConfig(name="image_folder", root=str(tmp_path / "nope")), 16)


def test_train_view_augments_eval_view_does_not():
    s = build_synthetic(SyntheticConfig(num_classes=2, increment=2, train_images_per_class=2,
                                        test_images_per_class=1, augment="crop"), 16)
    train = s.tasks[0].train
    ev = train.view("eval")
    assert ev.deterministic and not train.deterministic
    assert torch.equal(ev[0][0], ev[0][0])
    views = set()
    for epoch in range(5):
        train.set_augmentation_seed(epoch)
        views.add(tuple(train[0][0].flatten().tolist()))
    assert len(views) > 1
    legacy = build_synthetic(SyntheticConfig(num_classes=2, increment=2, train_images_per_class=2,
                                             test_images_per_class=1, augment="pilot"), 16)
    assert legacy.tasks[0].train.prep.augment == "pilot" and not legacy.tasks[0].train.deterministic
