"""The ``domainnet`` stream on generated fixture trees: continuum's random 80/20 split (LAE), the official list files,
label order, class-incremental tasks mixing every domain, and one-line errors naming where it looked."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cl.registries import STREAMS
from streams.base import MissingDatasetError
from streams.domainnet import DOMAINS, DomainNetConfig

SIZE = 16
CLASSES = ["zebra", "apple", "The_Eiffel_Tower", "bus", "mug"]  # created in this order, labels follow sorted order


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _count(d: int, c: int) -> int:
    return 3 + (d + 2 * c) % 4  # 3..6 images: uneven per domain and class


@pytest.fixture(scope="module")
def dn_root(tmp_path_factory) -> Path:
    """``<root>/domainnet/<domain>/<class>/*.png`` for the six domains, plus official-style list files."""
    root = tmp_path_factory.mktemp("dn")
    base = root / "domainnet"
    labels = {n: i for i, n in enumerate(sorted(CLASSES))}
    for d, domain in enumerate(DOMAINS):
        rows = {"train": [], "test": []}
        for c, name in enumerate(CLASSES):
            folder = base / domain / name
            folder.mkdir(parents=True)
            for j in range(_count(d, c)):
                (folder / f"{domain}_{j:03d}.jpg").write_bytes(_png(c))  # PNG bytes, .jpg name: Pillow sniffs
                rows["test" if j == 0 else "train"].append(f"{domain}/{name}/{domain}_{j:03d}.jpg {labels[name]}")
        (folder.parent / "readme.txt").write_text("not an image folder")  # a stray file is ignored
        for split, r in rows.items():
            (base / f"{domain}_{split}.txt").write_text("\n".join(r) + "\n")
    return root


def _build(**fields):
    spec = STREAMS.get("domainnet")
    return spec.build(spec.config_cls(name="domainnet", num_classes=5, increment=2, order_seed=None, **fields), SIZE)


def test_random_split_is_continuums(dn_root):
    """Per domain: ImageFolder order, test = the first ceil(0.2 n) of RandomState(1).permutation(n) (scikit-learn's
    ``train_test_split(test_size=0.2, random_state=1)``), domains concatenated in the official order."""
    stream = _build(root=str(dn_root))
    assert stream.class_names == sorted(CLASSES) and stream.meta["split"] == "random"
    src_tr, src_te = stream.tasks[0].train.source.paths, stream.tasks[0].test.source.paths
    expect_tr: list[str] = []
    expect_te: list[str] = []
    for d, domain in enumerate(DOMAINS):
        files = [str(dn_root / "domainnet" / domain / name / f"{domain}_{j:03d}.jpg")
                 for name in sorted(CLASSES) for j in range(_count(d, CLASSES.index(name)))]
        n = len(files)
        perm = np.random.RandomState(1).permutation(n)
        n_test = math.ceil(0.2 * n)
        expect_te += [files[i] for i in perm[:n_test]]
        expect_tr += [files[i] for i in perm[n_test:]]
    assert src_tr == expect_tr and src_te == expect_te
    assert not set(src_tr) & set(src_te)


def test_tasks_mix_domains_and_labels_follow_sorted_classes(dn_root):
    stream = _build(root=str(dn_root / "domainnet"))  # root may be the dataset folder itself
    assert [t.num_classes for t in stream.tasks] == [2, 2, 1]  # PILOT's rule: a smaller last task
    for t in stream.tasks:
        for ds in (t.train, t.test):
            for i, label in zip(ds.indices, ds.labels.tolist(), strict=True):
                path = Path(ds.source.paths[i])
                assert stream.class_names[stream.class_order[label]] == path.parent.name
        domains = {Path(t.train.source.paths[i]).parent.parent.name for i in t.train.indices}
        assert domains == set(DOMAINS)
    img, label = stream.tasks[0].test[0]
    assert img.shape == (3, SIZE, SIZE) and label in stream.tasks[0].labels


def test_list_split_and_domain_subset(dn_root):
    stream = _build(root=str(dn_root), split="lists", domains=("real", "sketch"))
    tr = [stream.tasks[0].train.source.paths[i] for t in stream.tasks for i in t.train.indices]
    te = [stream.tasks[0].test.source.paths[i] for t in stream.tasks for i in t.test.indices]
    assert all(Path(p).name.endswith("_000.jpg") for p in te) and not any(p.endswith("_000.jpg") for p in tr)
    assert {Path(p).parent.parent.name for p in tr + te} == {"real", "sketch"}
    d_real, d_sketch = DOMAINS.index("real"), DOMAINS.index("sketch")
    assert len(te) == 2 * len(CLASSES)
    assert len(tr) == sum(_count(d, c) - 1 for d in (d_real, d_sketch) for c in range(len(CLASSES)))


def test_errors_name_where_they_looked(dn_root, tmp_path):
    with pytest.raises(MissingDatasetError) as err:
        _build(root=str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "domainnet") in msg and "ai.bu.edu/M3SDA" in msg
    with pytest.raises(MissingDatasetError, match="stream.root"):
        _build()
    with pytest.raises(MissingDatasetError, match="expected 345"):
        STREAMS.get("domainnet").build(DomainNetConfig(name="domainnet", root=str(dn_root)), SIZE)
    with pytest.raises(MissingDatasetError, match="clipart_train.txt"):
        _build_lists_without_files(tmp_path)
    with pytest.raises(ValueError, match="valid domains"):
        DomainNetConfig(domains=("photos",))


def _build_lists_without_files(tmp_path: Path):
    base = tmp_path / "copy" / "domainnet"
    for domain in DOMAINS:
        (base / domain).mkdir(parents=True)
    return _build(root=str(tmp_path / "copy"), split="lists")


def test_domains_must_share_class_folders(tmp_path):
    for d in DOMAINS:
        for name in CLASSES[: 4 if d == "sketch" else 5]:
            (tmp_path / "domainnet" / d / name).mkdir(parents=True)
            (tmp_path / "domainnet" / d / name / "a.jpg").write_bytes(_png(1))
    with pytest.raises(MissingDatasetError, match="other class folders"):
        _build(root=str(tmp_path))
