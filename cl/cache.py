"""Loop-level cache of frozen computation: tokens entering a block, derived inputs, per-test-sample rows.

A run on a frozen ViT spends most of its time recomputing outputs that cannot have changed: the blocks before the
first trainable one, for every epoch, phase, detection pass and evaluation. Strategies *declare* what is frozen; this
module (driven by ``cl.loop``) *decides* whether reusing it is exact, computes it once, stores it, and proves on every
reuse that it is still valid.

What is cached when (``train.cache: auto``):

- **phase inputs** -- a :class:`~cl.types.Phase` declares ``trainable_from = k``: the first block whose computation can
  change during the phase (``len(blocks)`` when none can, e.g. a head-only phase). If ``k > 0``, the phase's data is
  a deterministic view (``ViewableDataset.deterministic``: no random augmentation) and the prefix is a pure function
  of the image (no active dropout, no per-batch route, no undeclared hook before block k), the tokens entering block
  k, ``(N, T, d)`` (at ``k = len(blocks)`` the pooled features ``(N, d)``), are computed once per task and fed to
  every epoch. Later phases and detection passes over the same data reuse them; tokens at a later block are derived
  from the nearest earlier cached block, so each frozen block runs at most once per image and task.
- **derived inputs** (:meth:`FrozenCache.derived`) -- any function of the images that stays fixed during a phase (SEMA's
  representation-descriptor inputs), computed once, from cached tokens when there are some.
- **evaluation inputs** -- ``Strategy.frozen_prefix(model) = k``: blocks ``< k`` of the prediction path will not
  change again; the test-set tokens entering block k are computed at the first evaluation and reused by all later
  ones (test sets are evaluated once per task: without the cache task j's images pass the prefix T - j times).
- **per-sample rows** (:meth:`FrozenCache.rows`) -- a strategy's own per-test-image quantity (MOS's adapter-0 features
  for its prototype classifier), guarded by a fingerprint of the tensors the strategy names.

Safety: an entry stores a :class:`Fingerprint` (names, shapes, float64 sums and norms of every parameter and buffer
the cached value depends on, plus the routes and adapter names of those sites) taken when it is filled. It is checked
when the entry is reused (a stale entry is recomputed, logged) and after every epoch of a phase that uses it: a prefix
that changed *during* the phase means its ``trainable_from`` was declared wrongly and raises ``RuntimeError``, so a
wrong declaration cannot silently give wrong results. Phase parameters inside the declared prefix raise at once.

Exactness: values are computed by the same modules in the same order as the uncached forward, but in other batches
(``train.eval_batch_size`` rows, in order, instead of shuffled training batches). In float32 the cached run is
bit-identical wherever the backend's per-row results do not depend on the batch (true for CPU PyTorch at equal batch
sizes whatever the rows, tested in ``tests/test_cache.py``); a BLAS may pick another kernel for another batch size,
which gave 1-ulp differences in SEMA's logged RD statistics. Stated tolerance, tested: metrics identical, model
tensors and logged statistics within 1e-5 relative. ``train.cache_dtype: bfloat16`` / ``float16`` halve the memory
and round each cached value once (relative error <= 2^-8 / 2^-11; float16 overflows above 65504).

Storage: RAM up to ``train.cache_mb``; an entry that does not fit goes to a memory-mapped file in ``train.cache_dir``
(default: the run folder, else the system temp dir), unlinked as soon as it is mapped, so nothing is left on disk even
after a crash. Memory per image for tokens entering a block: ``T * d * bytes`` with ``T`` = patches + prefix tokens
(ViT-B/16 at 224 px: 197 * 768 * 4 B = 605 KB; DINOv2-S/14 at 56 px: 17 * 384 * 4 B = 26 KB); pooled features and
descriptor inputs: ``d * bytes`` per vector.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

if TYPE_CHECKING:
    from cl.adapters.inject import AdaptedSite
    from cl.context import RunContext
    from cl.model import CLModel
    from cl.types import Phase

__all__ = [
    "CacheDtype",
    "CachedInputs",
    "FrozenCache",
    "Fingerprint",
    "fingerprint",
    "prefix_fingerprint",
    "prefix_problems",
    "declared_hook",
    "is_deterministic",
]

log = logging.getLogger(__name__)

CacheDtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DISK_MARGIN = 512 * 2**20  # bytes left free on the spill disk
_DECLARED = "__clsim_cache_declared__"


def declared_hook(hook: Any) -> Any:
    """Mark a forward (pre-)hook whose effects its strategy accounts for in ``Phase.trainable_from`` and
    ``Strategy.frozen_prefix``; the cache refuses prefixes holding any *other* hook (it could observe the skipped
    computation). Returns ``hook`` (a function or ``functools.partial``)."""
    setattr(hook, _DECLARED, True)
    return hook


def is_deterministic(data: Dataset) -> bool:
    """``ViewableDataset.deterministic``; a ``ConcatDataset`` is deterministic when all its parts are."""
    if isinstance(data, ConcatDataset):
        return all(is_deterministic(d) for d in data.datasets)
    return bool(getattr(data, "deterministic", False))


# --- what a prefix depends on ------------------------------------------------------------------------------------
def _prefix_state(model: CLModel, block: int) -> tuple[list[tuple[str, Tensor]], tuple, list[AdaptedSite]]:
    """Named tensors, route structure and sites of everything the tokens entering ``block`` depend on.

    ``block >= len(blocks)`` means the pooled features (final norm and pooling included).
    """
    from cl.adapters.inject import block_of

    n = len(model.backbone.blocks)
    full = block >= n
    late = tuple(f"blocks.{i}." for i in range(block, n)) + (() if full else ("norm.", "fc_norm.", "head.",
                                                                               "attn_pool."))
    named = [(f"backbone.{k}", t) for k, t in [*model.backbone.named_parameters(), *model.backbone.named_buffers()]
             if not k.startswith(late)]
    named += [("mean", model.mean), ("std", model.std)]
    structure: list[Any] = [("block", min(block, n))]
    sites = []
    for key, site in model.sites.items():
        if not full and block_of(site.target) >= block:
            continue
        sites.append(site)
        route = site.route
        structure.append((key, route.kind, route.names, route.index is None, route.weights is None,
                          tuple(site.adapters.keys()), tuple(sorted(site.merged))))
        named += [(f"sites.{key}.{k}", t) for k, t in [*site.named_parameters(), *site.named_buffers()]]
    return named, tuple(structure), sites


@dataclass(frozen=True)
class Fingerprint:
    """What a cached value was computed from: names/shapes/structure and per-tensor float64 (sum, L2 norm)."""

    structure: tuple
    values: Tensor  # (n, 2) float64 on CPU

    def matches(self, other: Fingerprint) -> bool:
        return self.structure == other.structure and torch.equal(self.values, other.values)


@torch.no_grad()
def fingerprint(named: Iterable[tuple[str, Tensor]], structure: tuple = ()) -> Fingerprint:
    """Fingerprint of named tensors (one reduction pair per tensor: called per epoch or evaluation, not per step)."""
    items = list(named)
    stats = [torch.stack([t.detach().sum(dtype=torch.float64), torch.linalg.vector_norm(t.detach(),
                                                                                        dtype=torch.float64)])
             if t.is_floating_point() else t.detach().double().sum().repeat(2) for _, t in items]
    meta = tuple((k, tuple(t.shape), str(t.dtype)) for k, t in items)
    values = torch.stack(stats).cpu() if stats else torch.zeros(0, 2, dtype=torch.float64)
    return Fingerprint((structure, meta), values)


def prefix_fingerprint(model: CLModel, block: int) -> Fingerprint:
    """Fingerprint of the embedding, blocks ``< block`` and their sites (routes included)."""
    named, structure, _ = _prefix_state(model, block)
    return fingerprint(named, structure)


def prefix_problems(model: CLModel, block: int, training: bool) -> str | None:
    """Why the tokens entering ``block`` may not be a fixed function of the image (``None`` = they are).

    Checks: per-batch routes (``per_sample`` / given ``weights``), active dropout or drop-path in the prefix's
    adapters when ``training``, and forward hooks on prefix modules other than adapter sites' own and
    :func:`declared_hook` ones.
    """
    from cl.adapters.inject import AdaptedSite

    _, _, sites = _prefix_state(model, block)
    for site in sites:
        if site.route.index is not None or site.route.weights is not None:
            return f"per-batch route at {site.target}"
        if training:
            for m in site.modules():
                p = getattr(m, "p", None) if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", None)
                if p:
                    return f"active dropout in the adapters at {site.target}"
    bb = model.backbone
    n = len(bb.blocks)
    mods: list[nn.Module] = [bb.patch_embed, bb.norm_pre, *bb.blocks[: min(block, n)]]
    if block >= n:
        mods += [m for m in (bb.norm, getattr(bb, "fc_norm", None), getattr(bb, "attn_pool", None)) if m is not None]
    for top in mods:
        for m in top.modules():
            for hook in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
                owner = getattr(getattr(hook, "func", hook), "__self__", None)
                if not isinstance(owner, AdaptedSite) and not getattr(hook, _DECLARED, False):
                    return f"undeclared forward hook {getattr(hook, '__qualname__', hook)!r} in the frozen prefix"
    return None


# --- storage -----------------------------------------------------------------------------------------------------
class _Store:
    """``(N, *shape)`` values in RAM or in an unlinked memory-mapped file; reads return float32."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, spill: Path | None) -> None:
        self.path: Path | None = None
        if spill is None:
            self.data = torch.empty((n, *shape), dtype=dtype)
        else:
            spill.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="clsim-cache-", suffix=".bin", dir=spill)
            import os

            os.close(fd)
            np_dtype = np.float32 if dtype == torch.float32 else np.int16
            mm = np.memmap(name, dtype=np_dtype, mode="w+", shape=(n, *shape))
            data = torch.from_numpy(mm)
            self.data = data if dtype == torch.float32 else data.view(dtype)
            try:  # the mapping stays valid; the disk space is freed when it is released, even after a crash
                Path(name).unlink()
            except OSError:  # Windows: removed in release()
                self.path = Path(name)
        self.on_disk = spill is not None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, start: int, values: Tensor) -> None:
        self.data[start : start + len(values)] = values.detach().to("cpu", self.data.dtype)

    def release(self) -> None:
        self.data = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class CachedInputs(Dataset):
    """``(cached value i (float32), label i)``: what a phase, a detection pass or an evaluation iterates instead of
    images. ``block`` is the block the values enter (``len(blocks)`` = pooled features; ``None`` for derived
    inputs)."""

    deterministic = True

    def __init__(self, store: _Store, labels: Tensor, block: int | None, entry: _Entry | None = None) -> None:
        self.store, self.labels, self.block, self.entry = store, labels, block, entry

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.store.data[i].float(), int(self.labels[i])


@dataclass
class _Entry:
    dataset: Any  # keeps the dataset alive, so its id() stays unique while the entry exists
    key: tuple
    store: _Store
    labels: Tensor
    guard_block: int
    fp: Fingerprint
    scope: Literal["task", "run"]
    hits: int = 0

    def view(self, block: int | None) -> CachedInputs:
        return CachedInputs(self.store, self.labels, block, self)


@dataclass
class _RowMemo:
    filled: Tensor  # (N,) bool
    values: Tensor | None = None  # (N, ...) once the first rows arrive


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
        if not is_deterministic(data):
            self.fallback(purpose, "the data is not deterministic (random augmentation)")
            return None
        problem = prefix_problems(model, block, training)
        if problem is not None:
            self.fallback(purpose, f"trainable prefix: {problem}")
            return None
        key = (id(data), "tokens", block)
        fp = prefix_fingerprint(model, block)
        entry = self._valid(key, fp, purpose)
        if entry is None:
            source = self._best_source(data, block, model)
            entry = self._fill(model, data, key, block, fp, scope, purpose, source,
                               lambda x, src: self._tokens(model, x, src, block))
        return entry.view(block) if entry is not None else None

    def derived(self, model: CLModel, data: Dataset, name: str, fn: Callable[[Tensor], Tensor], guard_block: int,
                purpose: str, training: bool = False) -> CachedInputs | None:
        """``fn`` over every item of ``data``, computed once while blocks ``< guard_block`` (and their sites) stay
        as they are; ``fn(x)`` receives images or cached tokens and must read them through ``model.features`` /
        ``model.run_blocks`` under the model's input block (:meth:`CLModel.input_at`)."""
        if not self.enabled:
            return None
        if not is_deterministic(data):
            self.fallback(purpose, "the data is not deterministic (random augmentation)")
            return None
        problem = prefix_problems(model, guard_block, training)
        if problem is not None:
            self.fallback(purpose, f"trainable prefix: {problem}")
            return None
        key = (id(data), "derived", name)
        fp = prefix_fingerprint(model, guard_block)
        entry = self._valid(key, fp, purpose)
        if entry is None:
            source = self._best_source(data, guard_block, model)

            def compute(x: Tensor, src: int) -> Tensor:
                with model.input_at(src):
                    return fn(x)

            entry = self._fill(model, data, key, guard_block, fp, "task", purpose, source, compute)
        return entry.view(None) if entry is not None else None

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
