"""``image_folder`` stream: ``root/train/<class>/*`` and ``root/test/<class>/*`` (any image Pillow reads).

Class ids follow the sorted class-folder names (the ImageFolder convention); both splits must hold the same classes.
"""

from __future__ import annotations

from pathlib import Path

from cl.types import Stream
from streams.base import FileSource, MissingDatasetError, StreamConfig, assemble_stream, register_stream

__all__ = ["scan_image_folder", "build_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def scan_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """List ``(classes, paths, labels)`` under ``split_dir/<class>/*`` (sorted, deterministic)."""
    if classes is None:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            raise MissingDatasetError(f"class folder {folder} is missing (the train split has class {name!r})")
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(c)
    return classes, paths, labels


def build_folder_stream(
    cfg: StreamConfig,
    image_size: int,
    base: Path,
    *,
    expected_classes: int | None = None,
    natural_order: bool = False,
    how_to_get: str = "",
) -> Stream:
    """Shared builder for every ``<base>/{train,test}/<class>/*`` layout."""
    train_dir, test_dir = base / "train", base / "test"
    missing = [str(p) for p in (train_dir, test_dir) if not p.is_dir()]
    if missing:
        hint = f"; {how_to_get}" if how_to_get else ""
        raise MissingDatasetError(
            f"{cfg.name}: expected {base}/train/<class>/* and {base}/test/<class>/*; not found: {', '.join(missing)}"
            f"{hint}"
        )
    classes, tr_paths, tr_labels = scan_image_folder(train_dir)
    _, te_paths, te_labels = scan_image_folder(test_dir, classes)
    if expected_classes is not None and len(classes) != expected_classes:
        raise MissingDatasetError(
            f"{cfg.name}: {train_dir} has {len(classes)} class folders, expected {expected_classes}"
        )
    if not tr_paths:
        raise MissingDatasetError(f"{cfg.name}: no image files under {train_dir}")
    return assemble_stream(
        cfg,
        num_classes=len(classes),
        train_source=FileSource(tr_paths),
        train_labels=tr_labels,
        test_source=FileSource(te_paths),
        test_labels=te_labels,
        image_size=image_size,
        class_names=classes,
        natural_order=natural_order,
        meta={"root": str(base)},
        locations={"train": f"{train_dir}/<class>/", "test": f"{test_dir}/<class>/"},
    )


@register_stream("image_folder")
def build_image_folder(cfg: StreamConfig, image_size: int) -> Stream:
    if not cfg.root:
        raise MissingDatasetError(
            "image_folder: set stream.root to a folder holding train/<class>/* and test/<class>/*"
        )
    return build_folder_stream(cfg, image_size, Path(cfg.root).expanduser())
