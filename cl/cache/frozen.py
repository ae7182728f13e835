"""The cache policy: :class:`FrozenCache` decides what to compute once, fills, validates and releases entries
(rules: :mod:`cl.cache`)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from cl.cache.prefix import Fingerprint, _prefix_state, is_deterministic, prefix_fingerprint, prefix_problems
from cl.cache.store import CachedInputs, _Entry, _RowMemo, _Store

if TYPE_CHECKING:
    from cl.context import RunContext
    from cl.model import CLModel
    from cl.types import Phase

__all__ = ["CacheDtype", "FrozenCache"]

log = logging.getLogger("cl.cache")  # the package's logger name (users filter on it)

CacheDtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DISK_MARGIN = 512 * 2**20  # bytes left free on the spill disk


@dataclass
class _Active:
    model: Any
    entry: _Entry
    phase: str
    declared: int | None


@dataclass
class _Eval:
    datasets: list[Dataset]
    offsets: np.ndarray
    pos: int = 0
    ids: tuple[int, int] = (0, 0)
    guards: dict[str, bool] = field(default_factory=dict)


class FrozenCache:
    """The run's frozen-computation cache (``RunContext.cache``); see the module docstring for the rules."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._entries: dict[tuple, _Entry] = {}
        self._rows: dict[tuple[str, int], _RowMemo] = {}
        self._row_refs: dict[int, Dataset] = {}  # keeps evaluated datasets alive, so their id() stays unique
        self._row_fp: dict[str, Fingerprint] = {}
        self._reported: set[tuple[str, str]] = set()
        self._active: _Active | None = None
        self._eval: _Eval | None = None
        self.stats = {"fills": 0, "hits": 0, "fallbacks": 0, "peak_ram_mb": 0.0, "peak_disk_mb": 0.0}

    # --- settings ----------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return getattr(self.ctx.train, "cache", "off") == "auto"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[getattr(self.ctx.train, "cache_dtype", "float32")]

    @property
    def cap_bytes(self) -> float:
        return float(getattr(self.ctx.train, "cache_mb", 2048.0)) * 2**20

    def spill_dir(self) -> Path:
        given = getattr(self.ctx.train, "cache_dir", None)
        if given:
            return Path(given)
        if self.ctx.log.path is not None:
            return self.ctx.log.path.parent
        return Path(tempfile.gettempdir())

    def ram_bytes(self) -> int:
        return sum(e.store.nbytes for e in self._entries.values() if not e.store.on_disk) + sum(
            m.values.numel() * m.values.element_size() for m in self._rows.values() if m.values is not None)

    def disk_bytes(self) -> int:
        return sum(e.store.nbytes for e in self._entries.values() if e.store.on_disk)

    # --- logging -----------------------------------------------------------------------------------------------
    def _record(self, action: str, **fields: Any) -> None:
        task = self.ctx.task.task_id if self.ctx.task is not None else None
        self.ctx.log.write("cache", task=task, action=action, **fields)

    def fallback(self, purpose: str, reason: str) -> None:
        """Log (once per run for each purpose and reason) why something is computed without the cache."""
        self.stats["fallbacks"] += 1
        if (purpose, reason) in self._reported:
            return
        self._reported.add((purpose, reason))
        log.info("cache: %s computed without the cache: %s", purpose, reason)
        self._record("fallback", purpose=purpose, reason=reason)

    # --- phases ------------------------------------------------------------------------------------------------
    def phase_inputs(self, model: CLModel, phase: Phase, data: Dataset) -> tuple[Dataset, int]:
        """The data a phase iterates and the block its items enter (0 = images, the uncached path)."""
        self._active = None
        k = phase.trainable_from
        if not self.enabled:
            return data, 0
        if isinstance(data, CachedInputs):  # already cached by the strategy (derived inputs): guard it
            if data.entry is not None:
                self._active = _Active(model, data.entry, phase.name, k)
            return data, 0
        purpose = f"phase {phase.name}"
        if k is None:  # undeclared: worth a note only where caching could have applied
            if is_deterministic(data):
                self.fallback(purpose, "the phase does not declare trainable_from")
            return data, 0
        if k <= 0:
            self.fallback(purpose, "trainable prefix: the phase trains from block 0")
            return data, 0
        n = len(model.backbone.blocks)
        prefix_ids = {id(t) for _, t in _prefix_state(model, min(k, n))[0]}
        params = [p for g in phase.params for p in (g["params"] if isinstance(g, dict) else [g])]
        inside = [p for p in params if id(p) in prefix_ids]
        if inside:
            raise RuntimeError(f"phase {phase.name} declares trainable_from={k} but trains {len(inside)} "
                               f"parameter(s) before block {k}: the declaration is wrong")
        cached = self.inputs(model, data, min(k, n), purpose, training=True)
        if cached is None:
            return data, 0
        assert cached.entry is not None
        self._active = _Active(model, cached.entry, phase.name, k)
        return cached, min(k, n)

    def check_phase(self) -> None:
        """After an epoch: the values the running phase uses must still be what they were computed from."""
        act = self._active
        if act is None:
            return
        now = prefix_fingerprint(act.model, act.entry.guard_block)
        if not now.matches(act.entry.fp):
            raise RuntimeError(f"phase {act.phase} declared trainable_from={act.declared}, but the frozen computation "
                               f"before block {act.entry.guard_block} changed during the phase: the cached inputs "
                               f"are wrong. Fix the declaration (or run with train.cache: off)")

    def end_phase(self) -> None:
        self.check_phase()
        self._active = None

    # --- token and derived inputs ---------------------------------------------------------------------------------
    def inputs(self, model: CLModel, data: Dataset, block: int, purpose: str, training: bool = False,
               scope: Literal["task", "run"] = "task") -> CachedInputs | None:
        """Cached tokens entering ``block`` for every item of ``data`` (filled or validated now), or ``None``
        (logged) when the cache is off or reuse would not be exact."""
        if not self.enabled or block <= 0:
            return None
        entry = self._entry(model, data, (id(data), "tokens", block), block, purpose, training, scope,
                            lambda x, src: self._tokens(model, x, src, block))
        return entry.view(block) if entry is not None else None

    def derived(self, model: CLModel, data: Dataset, name: str, fn: Callable[[Tensor], Tensor], guard_block: int,
                purpose: str, training: bool = False) -> CachedInputs | None:
        """``fn`` over every item of ``data``, computed once while blocks ``< guard_block`` (and their sites) stay
        as they are; ``fn(x)`` receives images or cached tokens and must read them through ``model.features`` /
        ``model.run_blocks`` under the model's input block (:meth:`CLModel.input_at`)."""
        if not self.enabled:
            return None

        def compute(x: Tensor, src: int) -> Tensor:
            with model.input_at(src):
                return fn(x)

        entry = self._entry(model, data, (id(data), "derived", name), guard_block, purpose, training, "task", compute)
        return entry.view(None) if entry is not None else None

    def _entry(self, model: CLModel, data: Dataset, key: tuple, guard_block: int, purpose: str, training: bool,
               scope: Literal["task", "run"], compute: Callable[[Tensor, int], Tensor]) -> _Entry | None:
        """The valid entry ``key`` of ``data`` (filled now when missing or stale; ``compute(x, src_block)`` maps a
        batch of images or source tokens to its values), or ``None`` (logged) when reuse would not be exact: random
        augmentation, or a prefix before ``guard_block`` that is not a fixed function of the image."""
        if not is_deterministic(data):
            self.fallback(purpose, "the data is not deterministic (random augmentation)")
            return None
        problem = prefix_problems(model, guard_block, training)
        if problem is not None:
            self.fallback(purpose, f"trainable prefix: {problem}")
            return None
        fp = prefix_fingerprint(model, guard_block)
        entry = self._valid(key, fp, purpose)
        if entry is None:
            source = self._best_source(data, guard_block, model)
            entry = self._fill(model, data, key, guard_block, fp, scope, purpose, source, compute)
        return entry

    def _valid(self, key: tuple, fp: Fingerprint, purpose: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.fp.matches(fp):
            entry.hits += 1
            self.stats["hits"] += 1
            return entry
        self._record("stale", purpose=purpose, reason="the frozen prefix changed since the entry was filled")
        log.info("cache: %s: entry is stale (the frozen prefix changed), recomputing", purpose)
        self._drop(key)
        return None

    def _best_source(self, data: Dataset, block: int, model: CLModel) -> _Entry | None:
        """The valid cached tokens of ``data`` entering the latest block ``<= block`` (``None`` = start from images)."""
        best: _Entry | None = None
        for key, e in self._entries.items():
            if key[0] == id(data) and key[1] == "tokens" and key[2] <= block and (best is None or key[2] > best.key[2]):
                best = e
        if best is not None and not best.fp.matches(prefix_fingerprint(model, best.key[2])):
            return None
        return best

    @staticmethod
    def _tokens(model: CLModel, x: Tensor, src: int, block: int) -> Tensor:
        n = len(model.backbone.blocks)
        tokens = model.embed(x) if src == 0 else x
        tokens = model.run_blocks(tokens, src, block)
        return model.pool(tokens) if block >= n else tokens

    @torch.no_grad()
    def _fill(self, model: CLModel, data: Dataset, key: tuple, guard_block: int, fp: Fingerprint,
              scope: Literal["task", "run"], purpose: str, source: _Entry | None,
              compute: Callable[[Tensor, int], Tensor]) -> _Entry | None:
        ctx = self.ctx
        src_block = source.key[2] if source is not None else 0
        src: Dataset = source.view(src_block) if source is not None else data
        loader = ctx.loader(src, ctx.train.eval_batch_size, num_workers=0 if source is not None else None)
        was = model.training
        model.eval()
        t0 = time.perf_counter()
        store: _Store | None = None
        labels = []
        pos = 0
        n_items = len(src)  # type: ignore[arg-type]
        try:
            for x, y in ctx.progress(loader, f"cache: {purpose}"):
                with ctx.autocast():
                    out = compute(ctx.to_device(x), src_block).float()
                if store is None:
                    store = self._allocate(n_items, tuple(out.shape[1:]), purpose)
                    if store is None:
                        return None
                store.write(pos, out)
                pos += len(out)
                labels.append(torch.as_tensor(y))
        finally:
            model.train(was)
        if store is None:  # empty dataset
            return None
        entry = _Entry(data, key, store, torch.cat(labels), guard_block, fp, scope)
        self._entries[key] = entry
        self.stats["fills"] += 1
        self.stats["peak_ram_mb"] = max(self.stats["peak_ram_mb"], self.ram_bytes() / 2**20)
        self.stats["peak_disk_mb"] = max(self.stats["peak_disk_mb"], self.disk_bytes() / 2**20)
        mb = store.nbytes / 2**20
        where = "disk (memory-mapped)" if store.on_disk else "RAM"
        if key[1] == "derived":
            what = str(key[2])
        elif key[2] >= len(model.backbone.blocks):
            what = "features (all blocks frozen)"
        else:
            what = f"tokens entering block {key[2]}"
        log.info("cache: %s: %s for %d items, shape %s, %s, %.2f MB in %s (from %s; %.2fs)", purpose, what, n_items,
                 list(store.data.shape[1:]), str(store.data.dtype).replace("torch.", ""), mb, where,
                 f"block {src_block} tokens" if source is not None else "images", time.perf_counter() - t0)
        self._record("fill", purpose=purpose, kind=key[1], block=key[2] if key[1] == "tokens" else None,
                     name=key[2] if key[1] == "derived" else None, items=n_items, shape=list(store.data.shape[1:]),
                     dtype=str(store.data.dtype).replace("torch.", ""), mb=round(mb, 3),
                     where="disk" if store.on_disk else "ram", source_block=src_block,
                     seconds=round(time.perf_counter() - t0, 3), ram_mb=round(self.ram_bytes() / 2**20, 3),
                     disk_mb=round(self.disk_bytes() / 2**20, 3))
        return entry

    def _allocate(self, n: int, shape: tuple[int, ...], purpose: str) -> _Store | None:
        dtype = self.dtype
        need = n * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if self.ram_bytes() + need <= self.cap_bytes:
            return _Store(n, shape, dtype, None)
        spill = self.spill_dir()
        try:
            spill.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(spill).free
        except OSError as err:
            self.fallback(purpose, f"over train.cache_mb and the spill folder {spill} is unusable: {err}")
            return None
        if need + _DISK_MARGIN > free:
            self.fallback(purpose, f"over train.cache_mb ({need / 2**20:.0f} MB needed) and not enough free disk "
                                   f"in {spill}")
            return None
        return _Store(n, shape, dtype, spill)

    # --- evaluation ----------------------------------------------------------------------------------------------
    def eval_inputs(self, model: CLModel, datasets: Sequence[Dataset], block: int,
                    rows: bool = True) -> tuple[Dataset, int]:
        """The evaluation's data (test sets in order) and the block its items enter (0 = images).

        Also starts the per-sample row bookkeeping of :meth:`rows` for this evaluation, which assumes the batches
        walk the test sets in order; ``rows=False`` (the evaluation visits them in another order) turns it off.
        """
        sizes = [len(d) for d in datasets]  # type: ignore[arg-type]
        self._eval = _Eval(list(datasets), np.cumsum([0, *sizes])) if rows else None
        plain: ConcatDataset = ConcatDataset(list(datasets))
        if not self.enabled or block <= 0:
            return plain, 0
        block = min(block, len(model.backbone.blocks))
        parts = []
        for d in datasets:
            cached = self.inputs(model, d, block, "evaluation inputs", training=False, scope="run")
            if cached is None:
                return plain, 0
            parts.append(cached)
        return ConcatDataset(parts), block

    def next_batch(self, size: int) -> None:
        """The evaluation moves to its next batch of ``size`` samples (rows ``pos .. pos + size`` of the test sets)."""
        if self._eval is not None:
            ev = self._eval
            ev.ids = (ev.pos, ev.pos + size)
            ev.pos += size

    def end_eval(self) -> None:
        self._eval = None

    def rows(self, name: str, compute: Callable[[], Tensor], guard: Callable[[], Fingerprint]) -> Tensor:
        """Per-test-sample memo of ``compute()`` (a ``(B, ...)`` tensor for the current evaluation batch).

        Returns the stored rows when every sample of the batch has them and ``guard()`` (evaluated once per
        evaluation) still matches the fingerprint taken when they were stored; otherwise computes the batch and stores
        its rows. Outside an evaluation, or with the cache off, it just calls ``compute()``.
        """
        ev = self._eval
        if not self.enabled or ev is None:
            return compute()
        if name not in ev.guards:
            fp = guard()
            stale = [k for k in self._rows if k[0] == name and self._row_fp.get(name) is not None
                     and not self._row_fp[name].matches(fp)]
            if stale:
                self._record("stale", purpose=name, reason="the tensors it depends on changed")
                for k in stale:
                    del self._rows[k]
            self._row_fp[name] = fp
            ev.guards[name] = True
        start, stop = ev.ids
        spans = self._spans(ev, start, stop)
        found = []
        for j, a, b in spans:
            memo = self._rows.get((name, id(ev.datasets[j])))
            if memo is None or memo.values is None or not bool(memo.filled[a:b].all()):
                break
            found.append(memo.values[a:b])
        else:
            self.stats["hits"] += 1
            return torch.cat(found).float().to(self.ctx.device)
        out = compute()
        if self.ram_bytes() + out.numel() * out.element_size() > self.cap_bytes:
            self.fallback(name, "over train.cache_mb (per-sample rows are kept in RAM only)")
            return out
        i = 0
        for j, a, b in spans:
            ds = ev.datasets[j]
            memo = self._rows.setdefault((name, id(ds)), _RowMemo(torch.zeros(len(ds), dtype=torch.bool)))  # type: ignore[arg-type]
            self._row_refs[id(ds)] = ds
            if memo.values is None:
                memo.values = torch.zeros((len(memo.filled), *out.shape[1:]), dtype=self.dtype)
                self.stats["fills"] += 1
                self._record("fill", purpose=name, kind="rows", items=len(memo.filled), shape=list(out.shape[1:]),
                             dtype=str(self.dtype).replace("torch.", ""),
                             mb=round(memo.values.numel() * memo.values.element_size() / 2**20, 3), where="ram")
            memo.values[a:b] = out[i : i + b - a].detach().to("cpu", self.dtype)
            memo.filled[a:b] = True
            i += b - a
        return out

    @staticmethod
    def _spans(ev: _Eval, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(dataset index, local start, local stop)`` covering global rows ``start .. stop``."""
        out = []
        for j in range(len(ev.datasets)):
            lo, hi = int(ev.offsets[j]), int(ev.offsets[j + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out.append((j, a - lo, b - lo))
        return out

    # --- lifetime ------------------------------------------------------------------------------------------------
    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.store.release()

    def release(self, scope: Literal["task", "run"] = "task") -> None:
        """Free the entries of ``scope`` (``task``: at the end of every task; ``run``: everything)."""
        keys = [k for k, e in self._entries.items() if scope == "run" or e.scope == "task"]
        if keys:
            hits = sum(self._entries[k].hits for k in keys)
            self._record("release", scope=scope, entries=len(keys), reuses=hits,
                         mb=round(sum(self._entries[k].store.nbytes for k in keys) / 2**20, 3))
        for k in keys:
            self._drop(k)
        if scope == "run":
            self._rows.clear()
            self._row_refs.clear()
            self._row_fp.clear()

    def close(self) -> None:
        self.release("run")
