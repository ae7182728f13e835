"""MHR-CIL internals: pseudo-task clustering, task retrieval over class prototypes, the z-score expansion test,
training-accuracy tracking. Pure tensor code where possible so each piece is tested on hand-made inputs
(``strategies/mhr.py``, ``specs/mhr.md`` B.3 and B.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cl.retrieval import AdapterIndex, IndexConfig, build_index
from strategies._sema_parts import RepresentationDescriptor, buffer_stats, descriptor_errors, layer_fires, z_scores

__all__ = [
    "TaggedDataset",
    "kmeans_pseudo_tasks",
    "TaskRetrieval",
    "task_scores",
    "soft_task_weights",
    "lowest_entropy",
    "within_task",
    "TrainAccuracy",
    "fit_descriptor",
    "blocks_firing",
]


class TaggedDataset(Dataset):
    """``(x, y)`` items of ``base`` returned as ``(x, tensor([y, tag[i]]))`` (the pseudo-task of sample i)."""

    def __init__(self, base: Any, tags: Tensor) -> None:
        if len(tags) != len(base):
            raise ValueError(f"{len(tags)} tags for {len(base)} samples")
        self.base, self.tags = base, tags.long()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        x, y = self.base[i]
        return x, torch.stack([torch.as_tensor(y, dtype=torch.long), self.tags[i]])

    @property
    def deterministic(self) -> bool:
        return bool(getattr(self.base, "deterministic", False))


def kmeans_pseudo_tasks(features: Tensor, num_clusters: int, seed: int) -> Tensor:
    """Cluster L2-normalised features ``(N, d)`` into ``min(num_clusters, N)`` pseudo-tasks (scikit-learn k-means,
    ``random_state=seed``, 10 initialisations); returns ``(N,)`` long labels 0..P-1, relabelled by first occurrence
    so the numbering does not depend on k-means' internal order."""
    from sklearn.cluster import KMeans

    x = F.normalize(features.float(), dim=-1).numpy().astype(np.float64)
    k = max(1, min(num_clusters, len(x)))
    raw = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(x)
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(np.argsort(first))  # cluster id -> rank of its first sample
    return torch.as_tensor(order[raw], dtype=torch.long)


def task_scores(class_scores: Tensor, class_task: Tensor, num_tasks: int) -> Tensor:
    """Per-task score = max over the task's classes ``(B, C), (C,) -> (B, T)`` (-inf for a task with no class)."""
    out = class_scores.new_full((class_scores.shape[0], num_tasks), float("-inf"))
    index = class_task[None].expand_as(class_scores).to(class_scores.device)
    return out.scatter_reduce(1, index, class_scores, reduce="amax", include_self=True)


def soft_task_weights(scores: Tensor, temperature: float) -> Tensor:
    """p(t | x) = softmax over tasks of (per-task max cosine / temperature) ``(B, T)``."""
    return torch.softmax(scores.float() / temperature, dim=-1)


def within_task(logits: Tensor, class_task: Tensor, tasks: Tensor) -> Tensor:
    """``logits`` ``(B, C)`` with every class outside sample b's task ``tasks[b]`` set to -inf (``tasks`` -1 = keep
    all)."""
    keep = (class_task[None].to(logits.device) == tasks[:, None]) | (tasks[:, None] < 0)
    return logits.masked_fill(~keep, float("-inf"))


def lowest_entropy(candidate_logits: Tensor) -> Tensor:
    """Index of the candidate with the lowest predictive entropy ``(k, B, C) -> (B,)`` (-inf logits = excluded
    classes; TUNA-style re-scoring)."""
    logp = torch.log_softmax(candidate_logits.float(), dim=-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (k, B)
    return ent.argmin(0)


class TaskRetrieval:
    """Class prototypes (unit vectors) in a cosine retrieval index, payload = class label; ``class_task`` maps a
    label to its task (mhr.md B.5 "Keys")."""

    def __init__(self, dim: int, backend: str) -> None:
        self.dim, self.backend = dim, backend
        self.index: AdapterIndex = build_index(IndexConfig(backend=backend, metric="cosine"), dim)  # type: ignore[arg-type]
        self.class_task = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, labels: Tensor, prototypes: Tensor, task_id: int) -> None:
        self.index.add(prototypes.float(), labels.long())
        need = int(labels.max()) + 1
        if need > len(self.class_task):
            grown = torch.full((need,), -1, dtype=torch.long)
            grown[: len(self.class_task)] = self.class_task
            self.class_task = grown
        self.class_task[labels.long()] = task_id

    def class_scores(self, queries: Tensor, num_classes: int) -> Tensor:
        """Cosine of every query to every seen class prototype ``(B, num_classes)`` (-inf where no prototype)."""
        ids, scores = self.index.search(queries.float(), len(self.index))
        out = scores.new_full((queries.shape[0], num_classes), float("-inf"))
        valid = (ids >= 0) & (ids < num_classes)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        out[rows[valid], ids[valid]] = scores[valid]
        return out

    def task_means(self) -> tuple[Tensor, Tensor]:
        """Mean prototype of each task, L2-normalised ``(T, d)``, and the task ids ``(T,)``."""
        state = self.index.state_dict()
        keys, ids = state["keys"].cpu(), state["ids"].cpu()
        tasks = self.class_task[ids]
        uniq = tasks.unique(sorted=True)
        return torch.stack([F.normalize(keys[tasks == t].mean(0), dim=0) for t in uniq]), uniq

    def state_dict(self) -> dict[str, Tensor]:
        return {**{f"index.{k}": v for k, v in self.index.state_dict().items()}, "class_task": self.class_task}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.index.load_state_dict({k[len("index."):]: v for k, v in state.items() if k.startswith("index.")})
        self.class_task = state["class_task"].long().cpu()


class TrainAccuracy:
    """Running top-1 training accuracy over the last epoch of a phase (steps counted, no loop hook needed)."""

    def __init__(self) -> None:
        self.start(1, 1)

    def start(self, epochs: int, steps_per_epoch: int) -> None:
        self.first_step = (epochs - 1) * steps_per_epoch
        self.step = 0
        self.correct = 0
        self.count = 0

    def update(self, logits: Tensor, y: Tensor) -> None:
        if self.step >= self.first_step:
            self.correct += int((logits.argmax(1) == y).sum())
            self.count += int(y.numel())
        self.step += 1

    def value(self) -> float | None:
        return 100.0 * self.correct / self.count if self.count else None


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


@torch.no_grad()
def fit_descriptor(rd: RepresentationDescriptor, u: Tensor) -> None:
    """Fit SEMA's linear autoencoder in closed form (PCA: the optimal linear AE spans the top-q principal subspace),
    record its errors on ``u`` ``(N, d)`` into the FIFO and freeze it. (SEMA trains it with SGD; deviation.)"""
    u = u.float().to(rd.encoder.weight.device)
    mean = u.mean(0)
    _, _, vh = torch.linalg.svd(u - mean, full_matrices=False)
    q = rd.encoder.out_features
    basis = torch.zeros(q, u.shape[1], device=u.device)
    basis[: min(q, vh.shape[0])] = vh[:q]
    rd.encoder.weight.copy_(basis)
    rd.encoder.bias.copy_(-(basis @ mean))
    rd.decoder.weight.copy_(basis.t())
    rd.decoder.bias.copy_(mean)
    rd.record(rd(u))
    rd.freeze()


@torch.no_grad()
def blocks_firing(rds: Mapping[int, Sequence[RepresentationDescriptor]], inputs: Mapping[int, Tensor], threshold: float,
                  batch_size: int, generator: torch.Generator) -> tuple[list[int], dict[int, float]]:
    """SEMA's expansion test (sema.md §5.1–5.2, ``z_score: abs``) per block on token means ``(N, d)`` of the new
    task: a shuffled pass in batches; a block fires if on some batch every descriptor's mean z exceeds ``threshold``.
    Returns the firing blocks and, per block, the largest batch value of min_k mean_b z."""
    fired, best = [], {}
    for block, descs in rds.items():
        u = inputs[block].float()
        perm = torch.randperm(len(u), generator=generator)
        errs = descriptor_errors(list(descs), u.to(descs[0].encoder.weight.device))  # (K, N)
        stats = buffer_stats(list(descs))
        top = float("-inf")
        hit = False
        for start in range(0, len(u), batch_size):
            idx = perm[start: start + batch_size].to(errs.device)
            z_mean = z_scores(errs[:, idx], stats, "abs").mean(dim=1)
            top = max(top, float(z_mean.min()))
            hit = hit or layer_fires(z_mean, threshold)
        best[block] = top
        if hit:
            fired.append(block)
    return fired, best
