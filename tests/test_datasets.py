"""Dataset loaders on generated fixtures in their exact layouts (assets.md §6), plus the real Debian Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cl.registries import STREAMS
from cl.types import Stream
from streams import fashion_mnist as fm
from streams.base import FileSource, MissingDatasetError
from streams.cifar import Cifar100Config
from streams.fashion_mnist import FashionMnistConfig, read_idx
from streams.folders import FOLDER_DATASETS

SIZE = 16
FOLDER_NAMES = sorted(FOLDER_DATASETS)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _class_names(n: int) -> list[str]:
    """Names whose creation order differs from their sorted order (reversed), so label order is really tested."""
    return [f"n{(7919 * i) % 100_003:06d}" for i in range(n)][::-1]


def _write_split_tree(base: Path, names: list[str], per_split: dict[str, int]) -> None:
    for split, k in per_split.items():
        for c, name in enumerate(names):
            folder = base / split / name
            folder.mkdir(parents=True)
            for j in range(k):
                (folder / f"{split}_{j}.png").write_bytes(_png(c))


def _build(name: str, **fields) -> Stream:
    spec = STREAMS.get(name)
    return spec.build(spec.config_cls(name=name, **fields), SIZE)


def _check_stream(stream: Stream, num_classes: int, names: list[str] | None = None) -> None:
    assert stream.num_classes == num_classes
    if names is not None:
        assert stream.class_names == sorted(names)
    seen = [c for t in stream.tasks for c in t.class_ids]
    assert sorted(seen) == list(range(num_classes)), "every class in exactly one task"
    for t in stream.tasks:
        for ds in (t.train, t.test):
            assert ds.cache is not None and len(ds.cache) == 0, "nothing decoded at build time"
            assert set(ds.labels.tolist()) <= set(t.labels)
    if isinstance(stream.tasks[0].train.source, FileSource):
        for t in stream.tasks:
            tr = {t.train.source.paths[i] for i in t.train.indices}
            te = {t.test.source.paths[i] for i in t.test.indices}
            assert tr and te and not tr & te
            assert all("/test/" not in p for p in tr) and all("/train/" not in p for p in te)
            for ds, paths in ((t.train, t.train.source.paths), (t.test, t.test.source.paths)):
                for i, label in zip(ds.indices, ds.labels.tolist(), strict=True):
                    assert stream.class_names[stream.class_order[label]] == Path(paths[i]).parent.name
    img, label = stream.tasks[0].test[0]
    assert img.shape == (3, SIZE, SIZE) and label in stream.tasks[0].labels
    assert len(stream.tasks[0].test.cache) == 1, "decoded on __getitem__"


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


# ---------------------------------------------------------------- folder benchmarks


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """One root holding every folder benchmark in its layout: 2 training and 1 test PNG per class."""
    root = tmp_path_factory.mktemp("folders")
    names = {}
    for key, spec in FOLDER_DATASETS.items():
        names[key] = _class_names(spec.num_classes)
        _write_split_tree(root / spec.folder, names[key], {"train": 2, "test": 1})
    return root, names


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_folder_stream(name, folder_root):
    root, names = folder_root
    spec = FOLDER_DATASETS[name]
    stream = _build(name, root=str(root), increment=spec.num_classes // 5)
    _check_stream(stream, spec.num_classes, names[name])
    assert len(stream) == 5
    assert sum(len(t.train) for t in stream.tasks) == 2 * spec.num_classes
    assert sum(len(t.test) for t in stream.tasks) == spec.num_classes
    if spec.natural_order:
        assert stream.class_order == list(range(spec.num_classes))
    else:
        assert stream.class_order != list(range(spec.num_classes))


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_folder_stream_root_is_dataset_folder(name, folder_root):
    root, names = folder_root
    spec = FOLDER_DATASETS[name]
    stream = _build(name, root=str(root / spec.folder), increment=spec.num_classes)
    assert stream.class_names == sorted(names[name])


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_folder_stream_missing(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDatasetError) as err:
        _build(name, root=str(missing))
    _one_line(err, str(missing), FOLDER_DATASETS[name].folder, "LAMDA-PILOT")
    with pytest.raises(MissingDatasetError) as err:
        _build(name, root=None)
    _one_line(err, "stream.root")


def test_folder_stream_wrong_class_count(tmp_path):
    _write_split_tree(tmp_path / "cub", _class_names(7), {"train": 1, "test": 1})
    with pytest.raises(MissingDatasetError) as err:
        _build("cub", root=str(tmp_path))
    _one_line(err, "7 class folders", "expected 200")


@pytest.mark.parametrize("lists_inside", [False, True])
def test_imagenet_r_raw_release_with_lists(tmp_path, lists_inside):
    names = _class_names(200)
    wnids = sorted(names)
    lines = {"train_list.txt": [], "val_list.txt": []}
    for c, wnid in enumerate(names):
        folder = tmp_path / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for j in range(3):
            (folder / f"art_{j}.jpg").write_bytes(_png(c))  # Pillow reads by content, not by suffix
            lst = "val_list.txt" if j == 2 else "train_list.txt"
            lines[lst].append(f"imagenet-r/{wnid}/art_{j}.jpg {wnids.index(wnid)}")
    lists_dir = tmp_path / "imagenet-r" if lists_inside else tmp_path
    for fname, rows in lines.items():
        (lists_dir / fname).write_text("\n".join(rows) + "\n")
    stream = _build("imagenet_r", root=str(tmp_path), increment=20)
    assert stream.meta["layout"] == "lists"
    _check_stream(stream, 200, names)
    assert sum(len(t.train) for t in stream.tasks) == 400
    assert sum(len(t.test) for t in stream.tasks) == 200
    for t in stream.tasks:
        tr = {t.train.source.paths[i] for i in t.train.indices}
        te = {t.test.source.paths[i] for i in t.test.indices}
        assert not tr & te and all(p.endswith("art_2.jpg") for p in te)
    # root may also point at imagenet-r/ itself
    assert _build("imagenet_r", root=str(tmp_path / "imagenet-r"), increment=200).num_classes == 200


def test_imagenet_r_bad_list_line(tmp_path):
    (tmp_path / "imagenet-r").mkdir()
    (tmp_path / "train_list.txt").write_text("imagenet-r/n1/a.jpg\n")
    (tmp_path / "val_list.txt").write_text("")
    with pytest.raises(ValueError, match="expected '<path> <label>'"):
        _build("imagenet_r", root=str(tmp_path))
    (tmp_path / "train_list.txt").write_text("imagenet-r/n1/a.jpg -1\n")  # labels are non-negative integers
    with pytest.raises(ValueError, match=r"train_list.txt:1: expected '<path> <label>'"):
        _build("imagenet_r", root=str(tmp_path))


# ---------------------------------------------------------------- CIFAR-100


def _write_cifar(root: Path, per_class: dict[str, int]) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, k in per_class.items():
        labels = np.repeat(np.arange(100), k)
        planes = np.stack([labels, 255 - labels, np.arange(len(labels)) % 256], axis=1).astype(np.uint8)  # (N, 3)
        data = np.repeat(planes, 1024, axis=1)  # (N, 3072): R plane, G plane, B plane
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i:02d}" for i in range(100)], "coarse_label_names": []}, f)


def test_cifar100(tmp_path):
    _write_cifar(tmp_path, {"train": 3, "test": 1})
    stream = _build("cifar100", root=str(tmp_path), increment=10)
    _check_stream(stream, 100)
    assert stream.class_names == [f"class_{i:02d}" for i in range(100)]
    assert sum(len(t.train) for t in stream.tasks) == 300 and sum(len(t.test) for t in stream.tasks) == 100
    task = stream.tasks[3]
    src = task.train.source.images
    assert src.shape == (300, 32, 32, 3)
    for i, label in zip(task.train.indices, task.train.labels.tolist(), strict=True):
        original = stream.class_order[label]
        assert src[i, 5, 7].tolist() == [original, 255 - original, i % 256]  # planes -> HWC
    # root pointing at cifar-100-python/ itself
    assert _build("cifar100", root=str(tmp_path / "cifar-100-python")).num_classes == 100


def test_cifar100_missing(tmp_path):
    assert Cifar100Config().download is False
    with pytest.raises(MissingDatasetError) as err:
        _build("cifar100", root=str(tmp_path / "none"))
    _one_line(err, str(tmp_path / "none" / "cifar-100-python"), "stream.download=true")


# ---------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = np.array([magic, *arr.shape], dtype=">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n_train: int = 30, n_test: int = 20, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = labels
        for stem, payload in (
            (f"{prefix}-images-idx3-ubyte", _idx_bytes(images, 2051)),
            (f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 2049)),
        ):
            if compress:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)


@pytest.fixture
def no_system_fashion(monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())


@pytest.mark.parametrize("sub", ["", "usr/share/datasets/fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_layouts(tmp_path, no_system_fashion, sub, compress):
    _write_fashion(tmp_path / sub if sub else tmp_path, compress=compress)
    stream = _build("fashion_mnist", root=str(tmp_path), increment=2)
    _check_stream(stream, 10)
    assert stream.class_names[0] == "T-shirt/top" and len(stream) == 5
    assert sum(len(t.train) for t in stream.tasks) == 30 and sum(len(t.test) for t in stream.tasks) == 20
    for t in stream.tasks:
        images = t.train.source.images
        assert images.shape == (30, 28, 28) and images.dtype == np.uint8
        for i, label in zip(t.train.indices, t.train.labels.tolist(), strict=True):
            assert images[i, 0, 0] == stream.class_order[label]


def test_fashion_mnist_subset_fields(tmp_path, no_system_fashion):
    _write_fashion(tmp_path, n_train=50, n_test=30)
    stream = _build("fashion_mnist", root=str(tmp_path), increment=5, train_per_class=2, test_per_class=1)
    assert sum(len(t.train) for t in stream.tasks) == 20 and sum(len(t.test) for t in stream.tasks) == 10


def test_fashion_mnist_system_dir_fallback(tmp_path, monkeypatch, caplog):
    system = tmp_path / "system"
    _write_fashion(system)
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "other", system))
    with caplog.at_level(logging.INFO, logger="streams.fashion_mnist"):
        assert _build("fashion_mnist", root=str(tmp_path / "empty_root")).num_classes == 10
        assert _build("fashion_mnist", root=None).num_classes == 10
    # a stream.root that holds no files is not a silent fallback: the folder actually read is named
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "empty_root holds no Fashion-MNIST files" in caplog.records[0].getMessage()
    assert all(str(system) in r.getMessage() for r in caplog.records)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    system = tmp_path / "sys"
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (system,))
    assert FashionMnistConfig().download is False
    with pytest.raises(MissingDatasetError) as err:
        _build("fashion_mnist", root=str(tmp_path / "nothing"))
    _one_line(
        err,
        str(tmp_path / "nothing"),
        str(tmp_path / "nothing" / "FashionMNIST" / "raw"),
        str(system),
        "apt-get install dataset-fashion-mnist",
        "scripts/get_fashion_mnist.sh",
        "stream.download=true",
    )


def test_read_idx_rejects_bad_files(tmp_path):
    good = _idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8), 2051)
    (tmp_path / "magic").write_bytes(gzip.compress(_idx_bytes(np.zeros(4, dtype=np.uint8), 2049)))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic", "images")
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short", "images")
    (tmp_path / "count").write_bytes(good)
    with pytest.raises(ValueError, match="expected 3"):
        read_idx(tmp_path / "count", "images", expected_n=3)
    assert read_idx(tmp_path / "count", "images").shape == (4, 28, 28)


# torchvision's md5 checksums of the compressed files (torchvision.datasets.FashionMNIST.resources)
TORCHVISION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not all((DEBIAN_DIR / f).is_file() for f in TORCHVISION_MD5),
    reason=f"Debian dataset-fashion-mnist not installed ({DEBIAN_DIR}); run scripts/get_fashion_mnist.sh",
)
def test_real_debian_fashion_mnist():
    """The Debian files parse to 60,000 / 10,000 balanced images. Their gzip bytes differ from torchvision's
    (``md5_equal`` is False for all four on Debian 0.0~git20200523.55506a9-1), so only the contents are checked."""
    train_x, train_y, test_x, test_y = fm.load_fashion_mnist(DEBIAN_DIR)
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert train_x.dtype == np.uint8
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    md5_equal = {f: hashlib.md5((DEBIAN_DIR / f).read_bytes()).hexdigest() == m for f, m in TORCHVISION_MD5.items()}
    if not all(md5_equal.values()):  # recompressed package: check the images are real, not blank or noise
        assert 20 < train_x.mean() < 120 and (train_x == 0).mean() > 0.3
        means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])  # (10, 28, 28) class templates
        assert np.corrcoef(means.reshape(10, -1)).min() < 0.5, "class means differ"
