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

Layout: ``prefix.py`` (fingerprints, exactness checks, declared hooks), ``store.py`` (RAM / spill-file storage and
the :class:`CachedInputs` datasets), ``frozen.py`` (:class:`FrozenCache`, the policy the loop drives).
"""

from cl.cache.frozen import CacheDtype, FrozenCache
from cl.cache.prefix import (
    Fingerprint,
    declared_hook,
    fingerprint,
    is_deterministic,
    prefix_fingerprint,
    prefix_problems,
)
from cl.cache.store import CachedInputs

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
