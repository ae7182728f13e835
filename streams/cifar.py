"""``cifar100`` stream: torchvision's CIFAR-100 files ``<root>/cifar-100-python/{train,test,meta}``.

The files are the canonical CIFAR-100 python distribution (Krizhevsky's ``cifar-100-python.tar.gz``, as extracted by
``torchvision.datasets.CIFAR100``). That format is a Python pickle, so it is read with ``pickle.load(f,
encoding="latin1")``, only after checking that the three files exist; point ``stream.root`` only at a copy of the
official archive. With ``stream.download: true`` (needs internet) torchvision fetches and verifies it first.

``data`` is uint8 ``[N, 3072]`` (three 32 x 32 colour planes), ``fine_labels`` the 100-class labels, ``meta`` holds
``fine_label_names``. 50,000 training and 10,000 test images; kept in memory (about 180 MB).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl.types import Stream
from streams.base import ArraySource, MissingDatasetError, StreamConfig, assemble_stream, register_stream

__all__ = ["Cifar100Config", "build_cifar100", "load_cifar100", "CIFAR100_FOLDER"]

CIFAR100_FOLDER = "cifar-100-python"
_FILES = ("train", "test", "meta")


@dataclass(frozen=True)
class Cifar100Config(StreamConfig):
    """``stream.name: cifar100``.

    Attributes:
        download: when the files are missing, download them with torchvision into ``root`` (needs internet).
    """

    download: bool = False


def _candidates(root: Path) -> list[Path]:
    return [root / CIFAR100_FOLDER, root] if root.name != CIFAR100_FOLDER else [root]


def _find(root: Path) -> Path | None:
    for folder in _candidates(root):
        if all((folder / f).is_file() for f in _FILES):
            return folder
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # canonical CIFAR distribution format (see docstring)


def _split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(folder / split)
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{folder / split}: expected data [N, 3072] and N fine_labels, got {data.shape}, {len(labels)}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3)


def load_cifar100(
    root: str | Path, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Return ``(train_x, train_y, test_x, test_y, class_names)``; images uint8 ``(N, 32, 32, 3)``.

    Raises:
        MissingDatasetError: the files are missing and ``download`` is off.
    """
    root = Path(root).expanduser()
    folder = _find(root)
    if folder is None and download:
        import torchvision

        for train in (True, False):
            torchvision.datasets.CIFAR100(str(root), train=train, download=True)
        folder = _find(root)
    if folder is None:
        tried = ", ".join(str(p / "{train,test,meta}") for p in _candidates(root))
        raise MissingDatasetError(
            f"cifar100: CIFAR-100 files not found (tried {tried}); set stream.download=true on a machine with "
            f"internet, or extract torchvision's cifar-100-python.tar.gz into {root}"
        )
    train_x, train_y = _split(folder, "train")
    test_x, test_y = _split(folder, "test")
    names = list(_unpickle(folder / "meta")["fine_label_names"])
    return train_x, train_y, test_x, test_y, names


@register_stream("cifar100", Cifar100Config)
def build_cifar100(cfg: Cifar100Config, image_size: int) -> Stream:
    """Build the CIFAR-100 stream (100 classes, order shuffled with ``order_seed`` as in PILOT)."""
    if not cfg.root:
        raise MissingDatasetError(
            "cifar100: set stream.root to the folder holding cifar-100-python/ (add stream.download=true with internet)"
        )
    train_x, train_y, test_x, test_y, names = load_cifar100(cfg.root, cfg.download)
    if len(names) != 100:
        raise ValueError(f"cifar100: meta lists {len(names)} fine labels, expected 100")
    return assemble_stream(
        cfg,
        num_classes=100,
        train_source=ArraySource(train_x),
        train_labels=train_y,
        test_source=ArraySource(test_x),
        test_labels=test_y,
        image_size=image_size,
        class_names=names,
        meta={"root": str(cfg.root)},
    )
