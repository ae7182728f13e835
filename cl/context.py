"""What a strategy may use from the loop (:class:`RunContext`) and the run's device and seeding helpers.

:class:`RunContext` gives strategies the device, seeded data loaders, autocast, progress bars, feature extraction,
the JSONL log, the current task and the frozen-computation cache (:mod:`cl.cache`). :func:`derive_seed` and
:func:`rng_scope` are how every driver (``cl.loop.run``, the Avalanche bridge, sweeps) seeds a run reproducibly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cl.cache import FrozenCache
from cl.config import TrainConfig
from cl.errors import ConfigError
from cl.precision import warn_slow_bf16
from cl.runlog import JsonlLog
from cl.types import Stream, Task

if TYPE_CHECKING:
    from cl.model import CLModel

__all__ = ["RunContext", "resolve_device", "derive_seed", "rng_scope"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed derived from any hashable description (stable across processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@contextlib.contextmanager
def rng_scope(seed: int, device: torch.device) -> Iterator[None]:  # noqa: D401
    """Seeded RNG for the run, restored afterwards (library code never leaves the global RNG changed)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cuda"):
        torch.manual_seed(seed)
        yield


@dataclass
class RunContext:
    """What a strategy may use from the loop: device, data loaders, autocast, logging, the current task."""

    train: TrainConfig
    device: torch.device
    seed: int
    log: JsonlLog
    stream: Stream | None = None
    task: Task | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    cache: FrozenCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache = FrozenCache(self)  # frozen-computation cache (cl/cache/); inert with train.cache: off

    @property
    def num_seen(self) -> int:
        assert self.task is not None
        return self.task.labels[-1] + 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.train.bf16:
            return contextlib.nullcontext()
        warn_slow_bf16(self.device)  # once per process, on CPUs without native bf16
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def loader(self, dataset: Dataset, batch_size: int | None = None, shuffle: bool = False, key: Any = 0,
               drop_last: bool = False, num_workers: int | None = None) -> DataLoader:
        """A DataLoader; shuffling is seeded by ``(seed, task, key)`` so runs and resumes are reproducible."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.task.task_id if self.task else -1, key))
        return DataLoader(
            dataset, batch_size=batch_size or self.train.batch_size, shuffle=shuffle, generator=gen,
            num_workers=self.train.num_workers if num_workers is None else num_workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def to_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Any:
        if not self.train.progress:
            return iterable
        from tqdm.auto import tqdm

        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        # iterate our own iterator: handing a DataLoader to tqdm changes the order its seeded generator yields,
        # which would make results depend on whether progress bars are shown
        return tqdm(iter(iterable), desc=desc, total=total, leave=False, dynamic_ncols=True)

    @torch.no_grad()
    def extract(self, model: CLModel, dataset: Dataset, fn: Callable[[Tensor], Tensor] | None = None,
                desc: str = "features") -> tuple[Tensor, Tensor]:
        """Apply ``fn`` (default ``model.features``) to a dataset in eval mode; returns ``(outputs, labels)`` on CPU."""
        fn = fn or model.features
        was = model.training
        model.eval()
        outs, labels = [], []
        loader = self.loader(dataset, self.train.eval_batch_size)
        for x, y in self.progress(loader, desc):
            with self.autocast():
                outs.append(fn(self.to_device(x)).float().cpu())
            labels.append(y)
        model.train(was)
        return torch.cat(outs), torch.cat(labels)

    def event(self, kind: str, **fields: Any) -> None:
        """Record a strategy event (e.g. an expansion) in the JSONL log and in ``result.json``."""
        rec = {"event": kind, "task": self.task.task_id if self.task else None, **fields}
        self.events.append(rec)
        self.log.write(kind, **{k: v for k, v in rec.items() if k != "event"})
