"""``fashion_mnist`` stream: Fashion-MNIST (10 classes, 60,000 / 10,000 greyscale 28 x 28 images) from IDX files.

Files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` are searched in order in

1. ``stream.root`` (when set): ``{root}/``, ``{root}/usr/share/datasets/fashion-mnist/``, ``{root}/FashionMNIST/raw/``;
2. ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``);
3. ``./data/fashion-mnist/usr/share/datasets/fashion-mnist/`` (where ``scripts/get_fashion_mnist.sh`` extracts the
   package without root).

With ``stream.download: true`` (needs internet) torchvision downloads them into ``{root}/FashionMNIST/raw/``.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from cl.types import Stream
from streams.base import ArraySource, MissingDatasetError, StreamConfig, assemble_stream, register_stream

log = logging.getLogger(__name__)

__all__ = [
    "FashionMnistConfig",
    "build_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "FASHION_MNIST_CLASSES",
    "SYSTEM_DIRS",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Searched after stream.root, in order (module-level so tests can replace them).
SYSTEM_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("data/fashion-mnist/usr/share/datasets/fashion-mnist"),
)
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_MAGIC = {"images": 2051, "labels": 2049}  # 0x00000803: ubyte, 3 dims; 0x00000801: ubyte, 1 dim


@dataclass(frozen=True)
class FashionMnistConfig(StreamConfig):
    """``stream.name: fashion_mnist``.

    Attributes:
        download: when no files are found, download them with torchvision into ``root`` (needs internet).
    """

    download: bool = False


def read_idx(path: str | Path, kind: str, expected_n: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or plain): ``kind="images"`` -> uint8 ``(N, rows, cols)``, ``"labels"`` -> ``(N,)``.

    Raises:
        ValueError: the magic number, the count or the payload length does not match.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    header = 16 if kind == "images" else 8
    if len(raw) < header:
        raise ValueError(f"{path}: too short for an IDX {kind} header ({len(raw)} bytes)")
    fields = np.frombuffer(raw[:header], dtype=">i4")
    if int(fields[0]) != _MAGIC[kind]:
        raise ValueError(f"{path}: IDX magic {int(fields[0])}, expected {_MAGIC[kind]} for {kind}")
    n = int(fields[1])
    if expected_n is not None and n != expected_n:
        raise ValueError(f"{path}: holds {n} items, expected {expected_n}")
    shape = (n, int(fields[2]), int(fields[3])) if kind == "images" else (n,)
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: payload has {len(raw) - header} bytes, the header {shape} needs {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _root_dirs(root: str | Path | None) -> list[Path]:
    """The folders under a user-given ``stream.root`` that may hold the files."""
    if not root:
        return []
    r = Path(root).expanduser()
    return [r, r / "usr/share/datasets/fashion-mnist", r / "FashionMNIST/raw"]


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    return _root_dirs(root) + list(SYSTEM_DIRS)


def find_fashion_mnist(root: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """The first folder holding all four files, and the list of folders tried."""
    tried = _candidate_dirs(root)
    for folder in tried:
        if all(_file(folder, stem) is not None for stem in _STEMS.values()):
            return folder, tried
    return None, tried


def load_fashion_mnist(root: str | Path | None = None, download: bool = False) -> tuple[np.ndarray, ...]:
    """Return ``(train_x, train_y, test_x, test_y)``: uint8 images ``(N, 28, 28)`` and int64 labels.

    Raises:
        MissingDatasetError: no folder holds the files and ``download`` is off.
    """
    folder, tried = find_fashion_mnist(root)
    if folder is None and download:
        import torchvision

        target = Path(root or "data").expanduser()
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        folder, tried = find_fashion_mnist(target)
    if folder is None:
        raise MissingDatasetError(
            f"fashion_mnist: {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] not found in "
            f"{', '.join(str(p) for p in tried)}; run `apt-get install dataset-fashion-mnist` (root) or "
            f"`bash scripts/get_fashion_mnist.sh`, or set stream.download=true with internet"
        )
    if root and folder not in _root_dirs(root):
        log.warning("fashion_mnist: stream.root=%s holds no Fashion-MNIST files; using %s", root, folder)
    else:
        log.info("fashion_mnist: reading %s", folder)
    out = []
    for split in ("train", "test"):
        # find_fashion_mnist checked that all four files exist
        x = read_idx(cast(Path, _file(folder, _STEMS[split, "images"])), "images")
        y = read_idx(cast(Path, _file(folder, _STEMS[split, "labels"])), "labels", len(x)).astype(np.int64)
        out += [x, y]
    return tuple(out)


@register_stream("fashion_mnist", FashionMnistConfig)
def build_fashion_mnist(cfg: FashionMnistConfig, image_size: int) -> Stream:
    """Build the Fashion-MNIST stream (greyscale repeated to 3 channels and resized to ``image_size``)."""
    train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root, cfg.download)
    return assemble_stream(
        cfg,
        num_classes=10,
        train_source=ArraySource(train_x),
        train_labels=train_y,
        test_source=ArraySource(test_x),
        test_labels=test_y,
        image_size=image_size,
        class_names=list(FASHION_MNIST_CLASSES),
        meta={"root": str(cfg.root) if cfg.root else None},
    )
