"""``domainnet``: DomainNet (Peng et al., "Moment Matching for Multi-Source Domain Adaptation", ICCV 2019), 345
classes over six domains, as a class-incremental stream (LAE: 5 tasks × 69 classes, every task mixing all domains).

Layout under ``stream.root`` (the official archives from http://ai.bu.edu/M3SDA/ extracted into one folder):
``<root>/domainnet/<domain>/<class>/*.jpg`` for the domains ``clipart infograph painting quickdraw real sketch``;
``stream.root`` may also point at the ``domainnet`` folder itself. Labels follow the sorted class-folder names (the
ImageFolder convention, identical to the official list files' labels).

Splits (``stream.split``):

- ``random`` (default; what LAE trains on): continuum's ``DomainNet`` (continuum 1.2.4, which gqk/LAE uses): every
  domain is listed with torchvision's ``ImageFolder`` and split 80/20 by scikit-learn's
  ``train_test_split(test_size=0.2, random_state=1)``; the domains are concatenated in the order above.
- ``lists``: the official ``<domain>_train.txt`` / ``<domain>_test.txt`` next to the domain folders, one
  ``<domain>/<class>/<file> <label>`` per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cl.types import Stream
from streams.base import (
    FileSource,
    MissingDatasetError,
    StreamConfig,
    assemble_stream,
    read_label_list,
    register_stream,
)

__all__ = ["DomainNetConfig", "DOMAINS", "build_domainnet", "find_domainnet"]

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_HOW = ("download the six domain archives and the <domain>_{train,test}.txt lists from http://ai.bu.edu/M3SDA/ and "
        "extract them into <root>/domainnet/")


@dataclass(frozen=True)
class DomainNetConfig(StreamConfig):
    """``stream.name: domainnet``.

    Attributes:
        domains: domains to use, concatenated in this order (all six by default, as continuum does).
        split: ``random`` (continuum/LAE: per-domain 80/20, scikit-learn seed ``split_seed``) or ``lists`` (the
            official train/test list files).
        test_fraction / split_seed: the ``random`` split's test size and seed (LAE: 0.2 and 1).
        num_classes: class folders expected in every domain (345).
    """

    domains: tuple[str, ...] = DOMAINS
    split: Literal["random", "lists"] = "random"
    test_fraction: float = 0.2
    split_seed: int = 1
    num_classes: int = 345

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad or not self.domains:
            raise ValueError(f"stream.domains={list(self.domains)!r}; valid domains: {', '.join(DOMAINS)}")
        if self.split not in ("random", "lists"):
            raise ValueError(f"stream.split={self.split!r}; valid choices: random, lists")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"stream.test_fraction must be in (0, 1), got {self.test_fraction}")


def find_domainnet(root: Path, domains: tuple[str, ...]) -> tuple[Path | None, list[Path]]:
    """The folder holding the domain folders (``root/domainnet`` or ``root``), and the candidates tried."""
    tried = [root / "domainnet", root]
    for base in tried:
        if all((base / d).is_dir() for d in domains):
            return base, tried
    return None, tried


def _random_split(cfg: DomainNetConfig, base: Path) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    from sklearn.model_selection import train_test_split
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes: list[str] | None = None
    tr_x: list[str] = []
    tr_y: list[int] = []
    te_x: list[str] = []
    te_y: list[int] = []
    for domain in cfg.domains:
        names, class_to_idx = find_classes(str(base / domain))
        if classes is None:
            classes = names
        elif names != classes:
            diff = sorted(set(names) ^ set(classes))
            raise MissingDatasetError(f"domainnet: {base / domain} has other class folders than {cfg.domains[0]} "
                                      f"({len(diff)} differ, e.g. {diff[:3]}); re-extract the archive")
        samples = make_dataset(str(base / domain), class_to_idx, extensions=IMG_EXTENSIONS)
        x, y = [p for p, _ in samples], [c for _, c in samples]
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_fraction, random_state=cfg.split_seed)
        tr_x += x_tr
        tr_y += y_tr
        te_x += x_te
        te_y += y_te
    assert classes is not None  # domains is non-empty
    return tr_x, tr_y, te_x, te_y, classes


def _list_split(cfg: DomainNetConfig, base: Path) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    tr_x: list[str] = []
    tr_y: list[int] = []
    te_x: list[str] = []
    te_y: list[int] = []
    names: dict[int, str] = {}
    for domain in cfg.domains:
        for split, xs, ys in (("train", tr_x, tr_y), ("test", te_x, te_y)):
            path = base / f"{domain}_{split}.txt"
            if not path.is_file():
                raise MissingDatasetError(f"domainnet: split list {path} not found (stream.split=lists); {_HOW}")
            p, lab, nm = read_label_list(path, base, "<domain>/<class>/<file> <label>")
            for k, v in nm.items():
                if names.setdefault(k, v) != v:
                    raise ValueError(f"domainnet: label {k} is {names[k]} in one list and {v} in {domain}_{split}.txt")
            xs += p
            ys += lab
    missing = next((p for p in (tr_x[:1] + te_x[:1]) if not Path(p).is_file()), None)
    if missing is not None:
        raise MissingDatasetError(f"domainnet: {missing} (from the split lists in {base}) does not exist; {_HOW}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"domainnet: the split lists in {base} use labels other than 0..{len(names) - 1}")
    return tr_x, tr_y, te_x, te_y, [names[k] for k in range(len(names))]


@register_stream("domainnet", DomainNetConfig)
def build_domainnet(cfg: StreamConfig, image_size: int) -> Stream:
    """Build DomainNet from ``<root>/domainnet/<domain>/<class>/*`` (split: ``random`` as continuum, or ``lists``)."""
    assert isinstance(cfg, DomainNetConfig)  # registered with DomainNetConfig
    if not cfg.root:
        raise MissingDatasetError(f"domainnet: set stream.root to the folder holding domainnet/<domain>/<class>/*; "
                                  f"{_HOW}")
    root = Path(cfg.root).expanduser()
    base, tried = find_domainnet(root, cfg.domains)
    if base is None:
        where = ", ".join(f"{p}/{{{','.join(cfg.domains)}}}" for p in tried)
        raise MissingDatasetError(f"domainnet: expected <root>/domainnet/<domain>/<class>/*; not found in {where}; "
                                  f"{_HOW}")
    split = _random_split if cfg.split == "random" else _list_split
    tr_x, tr_y, te_x, te_y, classes = split(cfg, base)
    if len(classes) != cfg.num_classes:
        raise MissingDatasetError(f"domainnet: {base} has {len(classes)} classes, expected {cfg.num_classes} "
                                  f"(stream.num_classes)")
    if not tr_x:
        raise MissingDatasetError(f"domainnet: no image files under {base}/{{{','.join(cfg.domains)}}}")
    return assemble_stream(cfg, num_classes=len(classes), train_source=FileSource(tr_x), train_labels=tr_y,
                           test_source=FileSource(te_x), test_labels=te_y, image_size=image_size, class_names=classes,
                           meta={"root": str(base), "split": cfg.split, "domains": list(cfg.domains)})
