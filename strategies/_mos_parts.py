"""MOS building blocks as small pure functions and helpers (internal to ``strategies.mos``).

Everything here is computable from tensors and tested on hand-made inputs in ``tests/test_mos.py``: the merge
arithmetic (mos.md §5), the in-forward merging hooks of the official code, ``L_orth`` (§4), class statistics and
Gaussian feature sampling for classifier alignment (§6), the prototype scores (exact, from the stored means) and the
top-1 lookups through the retrieval index, the self-refined adapter retrieval and the ensemble (§7).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from cl.retrieval import IndexConfig

__all__ = [
    "merge_step",
    "merge_params_",
    "merging_forward",
    "flat_params",
    "split_like",
    "orth_loss",
    "class_statistics",
    "GaussianFeatureBatches",
    "PrototypeIndex",
    "self_refine",
    "ensemble_scores",
]


# --- adapter merging (mos.md §5) ---------------------------------------------------------------------------------
def merge_step(theta: Tensor, target: Tensor, beta: float) -> Tensor:
    """One merge of ``theta`` towards ``target``: ``(1 - beta) * theta + beta * target`` (a new tensor)."""
    return torch.lerp(theta, target.to(theta), beta)


@torch.no_grad()
def merge_params_(params: Sequence[nn.Parameter], targets: Sequence[Tensor], beta: float, times: int = 1) -> None:
    """Merge parameters towards ``targets`` ``times`` times, rebinding ``.data`` as the official code does.

    Rebinding (not writing in place) keeps tensors saved elsewhere (snapshot copies, autograd's saved leaves) apart
    from the merged values, which is what the official ``reweight_adapter`` relies on.
    """
    for p, m in zip(params, targets, strict=True):
        data = p.data
        for _ in range(times):
            data = merge_step(data, m, beta)
        if data.device.type == "cpu":  # repeated contraction leaves subnormals where m = 0: ~100x slower on CPU
            data = data.masked_fill(data.abs() < torch.finfo(data.dtype).tiny, 0.0)
        p.data = data


@contextlib.contextmanager
def merging_forward(blocks: Iterable[nn.Module], params: Sequence[nn.Parameter], targets: Sequence[Tensor],
                    beta: float) -> Iterator[None]:
    """Official-code merging inside a forward: before every block, merge *all* of ``params`` once (mos.md §5.2).

    One forward through ``L`` blocks applies ``L`` merges; block ``l`` computes with its adapter after ``l + 1``.
    """
    def hook(_mod: nn.Module, _args: tuple) -> None:
        merge_params_(params, targets, beta)

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def flat_params(params: Sequence[Tensor]) -> Tensor:
    """All tensors of an adapter set as one flat float32 vector (detached copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in params]) if params else torch.zeros(0)


def split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of :func:`flat_params`: views of ``flat`` shaped like ``params`` (on their device and dtype)."""
    out, i = [], 0
    for p in params:
        out.append(flat[i: i + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype))
        i += p.numel()
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the adapter set {i}")
    return out


# --- training loss (mos.md §4) -----------------------------------------------------------------------------------
def orth_loss(features: Tensor, old_means: Tensor | None, temperature: float) -> Tensor:
    """``L_orth``: InfoNCE of every row of ``X = [old means; features]`` against itself, ``S = X X^T / temperature``.

    Raw (unnormalised) vectors; the stored means carry no gradient but their rows count in the mean.
    """
    x = features.float()
    if old_means is not None and old_means.numel():
        x = torch.cat([old_means.detach().to(x), x])
    sim = x @ x.t() / temperature  # (M + B, M + B)
    return F.cross_entropy(sim, torch.arange(x.shape[0], device=x.device))


# --- class statistics and classifier alignment (mos.md §6) --------------------------------------------------------
def class_statistics(features: Tensor, labels: Tensor, mode: Literal["covariance", "variance"],
                     shrink: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class mean and ``torch.cov + shrink * I`` (``covariance``) or its diagonal (``variance``).

    Returns ``(classes (C,), means (C, d), covs (C, d, d) or (C, d))`` in float32. A class with one sample gets
    covariance ``shrink * I``.
    """
    classes = labels.unique(sorted=True)
    d = features.shape[1]
    eye = torch.eye(d, dtype=torch.float32, device=features.device)
    means, covs = [], []
    for c in classes:
        f = features[labels == c].float()
        means.append(f.mean(0))
        cov = torch.cov(f.t()) if f.shape[0] > 1 else torch.zeros(d, d, device=f.device)
        cov = cov + shrink * eye
        covs.append(torch.diagonal(cov).clone() if mode == "variance" else cov)
    return classes, torch.stack(means), torch.stack(covs)


def _sampling_factors(covs: Tensor) -> Tensor:
    """Cholesky factors of ``(C, d, d)`` covariances (float64, jitter raised on failure), or sqrt of ``(C, d)``."""
    if covs.ndim == 2:
        return covs.clamp_min(0).sqrt()
    out = []
    for cov in covs.double():
        jitter = 0.0
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        for _ in range(6):
            factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
            if int(info) == 0:
                break
            jitter = max(jitter * 10, 1e-6)
        else:
            raise FloatingPointError("class covariance is not positive definite even with jitter 0.1")
        out.append(factor.float())
    return torch.stack(out)


class GaussianFeatureBatches(Dataset):
    """Classifier-alignment data: ``C`` minibatches of ``S`` features drawn from ``N(mu_c, Sigma_c)`` per class.

    Item ``i`` is a whole minibatch ``(S, d), (S,)``; run it with ``batch_size=1``. As in the official code, each
    epoch draws ``S`` samples per class, shuffles the ``C * S`` samples and cuts them into ``C`` minibatches; call
    :meth:`after_step` after every optimiser step so that a fresh set is drawn once an epoch is over.
    """

    def __init__(self, means: Tensor, covs: Tensor, samples_per_class: int, epochs: int,
                 generator: torch.Generator) -> None:
        self.means = means.float()
        self.factors = _sampling_factors(covs.to(means.device))
        self.samples_per_class = samples_per_class
        self.epochs = epochs
        self.generator = generator
        self.num_classes = means.shape[0]
        self.steps = 0
        self.x = torch.zeros(0)
        self.y = torch.zeros(0, dtype=torch.long)
        self.resample()

    def sample(self) -> tuple[Tensor, Tensor]:
        """``(C * S, d)`` samples and their labels (class positions ``0..C-1``), unshuffled."""
        c, s, d = self.num_classes, self.samples_per_class, self.means.shape[1]
        z = torch.randn(c, s, d, generator=self.generator, device=self.means.device)
        if self.factors.ndim == 3:
            x = self.means[:, None, :] + z @ self.factors.transpose(1, 2)
        else:
            x = self.means[:, None, :] + z * self.factors[:, None, :]
        y = torch.arange(c, device=self.means.device).repeat_interleave(s)
        return x.reshape(c * s, d), y

    def resample(self) -> None:
        x, y = self.sample()
        perm = torch.randperm(x.shape[0], generator=self.generator, device=x.device)
        self.x = x[perm].reshape(self.num_classes, self.samples_per_class, -1).cpu()
        self.y = y[perm].reshape(self.num_classes, self.samples_per_class).cpu()

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.num_classes == 0 and self.steps < self.epochs * self.num_classes:
            self.resample()

    def __len__(self) -> int:
        return self.num_classes

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


# --- prototype classifier and its retrieval index (mos.md §6.4, §7) -------------------------------------------------
class PrototypeIndex:
    """Frozen cosine prototype classifier: class means, scored exactly, plus a retrieval index for top-k lookups.

    :meth:`scores` gives the cosine logit of **every** class from the stored means in one matmul (the ensemble
    needs the full vector; an approximate index cannot give it: an IVF index probing 2 of 20 lists scores ~10 % of
    the classes). :meth:`nearest` is where a top-k is what is wanted (the initial task guess ``g_0`` is the top-1
    prototype): it searches the index (``metric="cosine"``), which for ``hnsw`` / ``ivf`` is approximate.

    Args:
        backend: retrieval-index backend (``cl.retrieval``).
        dim: feature dimension ``d``.
        index_cfg: full index settings (its ``backend`` must equal ``backend``; the metric is forced to cosine);
            ``None`` = the defaults of :class:`~cl.retrieval.IndexConfig`.
    """

    EXACT_BACKENDS = ("torch", "flat")

    def __init__(self, backend: Literal["torch", "flat", "hnsw", "ivf"], dim: int,
                 index_cfg: IndexConfig | None = None) -> None:
        from cl.retrieval import IndexConfig, build_index

        if index_cfg is not None and index_cfg.backend != backend:
            raise ValueError(f"index_cfg.backend={index_cfg.backend!r} differs from backend={backend!r}")
        cfg = dataclasses.replace(index_cfg or IndexConfig(backend=backend), metric="cosine")
        self.backend = backend
        self.dim = dim
        self.index = build_index(cfg, dim)
        self.means = torch.zeros(0, dim)
        self._unit: Tensor | None = None  # L2-normalised means on the device of the last queries

    @property
    def exact(self) -> bool:
        """True when :meth:`nearest` is the exact top-1 (``torch`` / ``flat``)."""
        return self.backend in self.EXACT_BACKENDS

    def add(self, labels: Tensor, means: Tensor) -> None:
        """Store the means ``(n, d)`` of classes ``labels`` ``(n,)`` (rows of later classes grow as needed)."""
        labels = labels.long().cpu()
        need = int(labels.max()) + 1 if labels.numel() else 0
        if need > self.means.shape[0]:
            self.means = torch.cat([self.means, torch.zeros(need - self.means.shape[0], self.dim)])
        self.means[labels] = means.float().cpu()
        self._unit = None
        self.index.add(means.float().cpu(), labels)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def scores(self, queries: Tensor, num_classes: int | None = None) -> Tensor:
        """Exact cosine logits ``(B, num_classes)`` of ``queries`` ``(B, d)`` against every stored class mean.

        One matmul on the queries' device, float32; the index is not consulted.
        """
        k = num_classes or self.num_classes
        if self._unit is None or self._unit.device != queries.device:
            self._unit = F.normalize(self.means, dim=1).to(queries.device)
        return F.normalize(queries.float(), dim=1) @ self._unit[:k].t()

    def nearest(self, queries: Tensor, scores: Tensor | None = None) -> Tensor:
        """Top-1 class ``(B,)`` per query: from the index (approximate for ``hnsw`` / ``ivf``).

        For the exact backends, ``scores`` (this object's :meth:`scores` of the same queries) may be given: its
        argmax *is* the exact top-1, so no second search runs.
        """
        if self.exact and scores is not None:
            return scores.argmax(1)
        ids, _ = self.index.search(queries.float(), 1)
        return ids[:, 0].to(queries.device).long()

    def state_dict(self) -> dict[str, Tensor]:
        return {"means": self.means, **{f"index.{k}": v for k, v in self.index.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.means = state["means"].float().cpu()
        self._unit = None
        self.index.load_state_dict({k[len("index."):]: v for k, v in state.items() if k.startswith("index.")})


# --- inference (mos.md §7) ---------------------------------------------------------------------------------------
def self_refine(g0: Tensor, features_for: Callable[[Tensor, Tensor], Tensor], head: Callable[[Tensor], Tensor],
                task_of: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Training-free self-refined adapter retrieval, per sample.

    ``g = g0``; repeat: ``z = head(f_g(x))``, ``g_new = task_of[argmax z]``; stop when ``g_new == g`` or after
    ``max_iter`` head evaluations; the final logits are those of the last evaluated adapter.

    Args:
        g0: ``(B,)`` initial task guesses.
        features_for: ``(rows, tasks) -> (len(rows), d)`` features of samples ``rows`` under adapters ``tasks``.
        head: features -> logits over the seen classes.
        task_of: ``(C,)`` class -> task map.
        max_iter: cap on head evaluations (4 in the official code).

    Returns:
        ``(logits (B, C), final task (B,), head evaluations per sample (B,))``.
    """
    g = g0.clone()
    active = torch.ones_like(g, dtype=torch.bool)
    evals = torch.zeros_like(g)
    logits: Tensor | None = None
    for n in range(1, max_iter + 1):
        rows = active.nonzero(as_tuple=True)[0]
        if not rows.numel():
            break
        z = head(features_for(rows, g[rows]))
        if logits is None:
            logits = z.new_zeros(g.shape[0], z.shape[1])
        logits[rows] = z
        evals[rows] += 1
        g_new = task_of.to(z.device)[z.argmax(1)].to(g)
        stop = (g_new == g[rows]) | (n == max_iter)
        g[rows[~stop]] = g_new[~stop]
        active[rows[stop]] = False
    assert logits is not None, "max_iter must be >= 1"
    return logits, g, evals


def ensemble_scores(head_logits: Tensor, proto_logits: Tensor, num_tasks: int) -> Tensor:
    """``softmax(z) + softmax((T + 1) * z_proto)`` (the code's division by the temperature ``1 / (T + 1)``)."""
    return F.softmax(head_logits.float(), dim=1) + F.softmax(proto_logits.float() * num_tasks, dim=1)
