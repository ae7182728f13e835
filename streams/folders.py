"""Image-folder benchmarks of the PILOT family: ImageNet-R, ImageNet-A, CUB-200, ObjectNet, OmniBenchmark, VTAB.

Each reads the pre-split archive distributed by the APER/PILOT authors (links in the LAMDA-PILOT README,
github.com/sun-hailong/LAMDA-PILOT), extracted under ``stream.root``: ``<root>/<folder>/{train,test}/<class>/*``.
``stream.root`` may also point at the dataset folder itself. Labels follow the sorted class-folder names.

ImageNet-R also accepts the raw release used by L2P and LAE: ``<root>/imagenet-r/<wnid>/*`` plus ``train_list.txt``
and ``val_list.txt`` (80/20 split) next to ``imagenet-r/``, one ``imagenet-r/<wnid>/<file> <label>`` per line.

ImageNet-A and VTAB use the natural (sorted-folder) class order, unshuffled, as the PILOT-family code does (SEMA's
"no shuffle" datasets), unless ``stream.class_order`` is given; VTAB's five tasks are then its five source datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cl.types import Stream
from streams.base import (
    FileSource,
    MissingDatasetError,
    StreamConfig,
    assemble_stream,
    read_label_list,
    register_stream,
)
from streams.image_folder import build_folder_stream

__all__ = ["FolderDataset", "FOLDER_DATASETS", "find_dataset_dir", "build_imagenet_r"]

_PILOT = "get the APER/PILOT pre-split archive (links in the LAMDA-PILOT README, github.com/sun-hailong/LAMDA-PILOT)"


@dataclass(frozen=True)
class FolderDataset:
    """A ``<root>/<folder>/{train,test}/<class>/*`` benchmark.

    Attributes:
        folder: path of the dataset folder relative to ``stream.root``.
        num_classes: number of class folders expected.
        natural_order: use the sorted-folder class order unshuffled (unless ``stream.class_order`` is set).
    """

    folder: str
    num_classes: int
    natural_order: bool = False


FOLDER_DATASETS: dict[str, FolderDataset] = {
    "imagenet_r": FolderDataset("imagenet-r", 200),
    "imagenet_a": FolderDataset("imagenet-a", 200, natural_order=True),
    "cub": FolderDataset("cub", 200),
    "objectnet": FolderDataset("objectnet", 200),
    "omnibenchmark": FolderDataset("omnibenchmark", 300),
    "vtab": FolderDataset("vtab-cil/vtab", 50, natural_order=True),
}


def _require_root(cfg: StreamConfig, spec: FolderDataset) -> Path:
    if not cfg.root:
        raise MissingDatasetError(
            f"{cfg.name}: set stream.root to the folder holding {spec.folder}/{{train,test}}/<class>/*; {_PILOT}"
        )
    return Path(cfg.root).expanduser()


def _candidates(root: Path, folder: str) -> list[Path]:
    """``root/a/b``, ``root/b``, ``root`` for ``folder = "a/b"`` (root may point anywhere along the path)."""
    parts = Path(folder).parts
    out = [root.joinpath(*parts[i:]) for i in range(len(parts))] + [root]
    return list(dict.fromkeys(out))


def find_dataset_dir(root: Path, folder: str) -> tuple[Path | None, list[Path]]:
    """The first candidate folder holding ``train/`` and ``test/``, and every candidate tried."""
    tried = _candidates(root, folder)
    for path in tried:
        if (path / "train").is_dir() and (path / "test").is_dir():
            return path, tried
    return None, tried


def _missing(cfg: StreamConfig, spec: FolderDataset, tried: list[Path], extra: str = "") -> MissingDatasetError:
    where = ", ".join(f"{p}/{{train,test}}" for p in tried)
    return MissingDatasetError(
        f"{cfg.name}: expected <root>/{spec.folder}/{{train,test}}/<class>/*; not found in {where}{extra}; {_PILOT}"
    )


def _build(cfg: StreamConfig, image_size: int, spec: FolderDataset) -> Stream:
    base, tried = find_dataset_dir(_require_root(cfg, spec), spec.folder)
    if base is None:
        raise _missing(cfg, spec, tried)
    return build_folder_stream(
        cfg,
        image_size,
        base,
        expected_classes=spec.num_classes,
        natural_order=spec.natural_order,
        how_to_get=_PILOT,
    )


def _register(name: str) -> None:
    spec = FOLDER_DATASETS[name]

    def build(cfg: StreamConfig, image_size: int) -> Stream:
        return _build(cfg, image_size, spec)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"Build the ``{name}`` stream from ``<root>/{spec.folder}/{{train,test}}/<class>/*``."
    register_stream(name)(build)


for _name in ("imagenet_a", "cub", "objectnet", "omnibenchmark", "vtab"):
    _register(_name)


# ImageNet-R: pre-split folders, or the raw release with L2P/LAE split lists.

_LISTS = ("train_list.txt", "val_list.txt")


def _find_lists(root: Path) -> tuple[Path, Path] | None:
    """The folder holding both list files and the folder their paths are relative to (the parent of imagenet-r/)."""
    candidates = (root, root / "imagenet-r") + ((root.parent,) if root.name == "imagenet-r" else ())
    for lists_dir in candidates:
        if all((lists_dir / f).is_file() for f in _LISTS):
            base = lists_dir.parent if lists_dir.name == "imagenet-r" else lists_dir
            return lists_dir, base
    return None


def _build_from_lists(cfg: StreamConfig, image_size: int, lists_dir: Path, base: Path, expected: int) -> Stream:
    tr_paths, tr_labels, tr_names = read_label_list(lists_dir / _LISTS[0], base)
    te_paths, te_labels, te_names = read_label_list(lists_dir / _LISTS[1], base)
    names = {**te_names, **tr_names}
    if sorted(names) != list(range(expected)):
        raise ValueError(f"{cfg.name}: {lists_dir}/{_LISTS[0]} and {_LISTS[1]} use labels other than 0..{expected - 1}")
    if any(te_names[k] != names[k] for k in te_names):
        raise ValueError(f"{cfg.name}: {_LISTS[0]} and {_LISTS[1]} map a label to different wnids")
    missing = next((p for p in (tr_paths[:1] + te_paths[:1]) if not Path(p).is_file()), None)
    if missing is not None:
        raise MissingDatasetError(f"{cfg.name}: {missing} listed in {lists_dir} does not exist; extract imagenet-r.tar")
    return assemble_stream(
        cfg,
        num_classes=expected,
        train_source=FileSource(tr_paths),
        train_labels=tr_labels,
        test_source=FileSource(te_paths),
        test_labels=te_labels,
        image_size=image_size,
        class_names=[names[k] for k in range(expected)],
        meta={"root": str(base), "layout": "lists"},
        locations={"train": str(lists_dir / _LISTS[0]), "test": str(lists_dir / _LISTS[1])},
    )


@register_stream("imagenet_r")
def build_imagenet_r(cfg: StreamConfig, image_size: int) -> Stream:
    """Build ImageNet-R (200 classes): the pre-split ``{train,test}`` folders, else the raw release + split lists."""
    spec = FOLDER_DATASETS["imagenet_r"]
    root = _require_root(cfg, spec)
    base, tried = find_dataset_dir(root, spec.folder)
    if base is not None:
        return build_folder_stream(cfg, image_size, base, expected_classes=spec.num_classes, how_to_get=_PILOT)
    lists = _find_lists(root)
    if lists is not None:
        return _build_from_lists(cfg, image_size, *lists, spec.num_classes)
    alt = ", ".join(str(p / "{train_list,val_list}.txt") for p in (root, root / "imagenet-r"))
    raise _missing(cfg, spec, tried, f" (nor the raw release with {alt})")
