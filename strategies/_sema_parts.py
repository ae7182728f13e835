"""SEMA internals: representation descriptors with their error buffers, z-scores and the expansion test.

Pure tensor code (no loop, no strategy state) so each piece can be tested on hand-made inputs. See
``strategies/sema.py`` and ``specs/sema.md`` sections 3.2, 3.4 and 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.mixture import ExpandableRouter

__all__ = [
    "RepresentationDescriptor",
    "descriptor_errors",
    "buffer_stats",
    "z_scores",
    "layer_fires",
    "ExpansionSignal",
    "StopForward",
    "CosineRouter",
]

ZScore = Literal["abs", "upper"]


class RepresentationDescriptor(nn.Module):
    """A linear autoencoder ``d -> q -> d`` on the token mean ``u`` of a block input (SEMA section 3.2).

    ``forward(u)`` returns the per-sample reconstruction error ``mean_d (dec(enc(u)) - u)^2``, shape ``(B,)``.
    The module also holds the FIFO of its most recent training-mode errors (section 3.4) as fixed-shape buffers, so
    it checkpoints with the model's state dict: a ring of ``capacity`` values, the number of values ever recorded,
    and a ``frozen`` flag after which nothing is recorded any more.
    """

    errors: Tensor  # buffers registered in __init__
    num_recorded: Tensor
    frozen: Tensor

    def __init__(self, in_features: int, rd_dim: int, capacity: int) -> None:
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"buffer capacity must be positive, got {capacity}")
        self.encoder = nn.Linear(in_features, rd_dim)
        self.decoder = nn.Linear(rd_dim, in_features)
        for lin in (self.encoder, self.decoder):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.bias)
        self.register_buffer("errors", torch.zeros(capacity))
        self.register_buffer("num_recorded", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def capacity(self) -> int:
        return self.errors.numel()

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    def forward(self, u: Tensor) -> Tensor:
        rec = self.decoder(self.encoder(u))
        return (rec - u).pow(2).mean(dim=-1)

    @torch.no_grad()
    def record(self, values: Tensor) -> None:
        """Append per-sample errors to the FIFO (oldest values drop out); ignored once frozen."""
        if self.is_frozen or values.numel() == 0:
            return
        values = values.detach().reshape(-1).to(self.errors)
        n, cap = int(self.num_recorded), self.capacity
        if values.numel() > cap:
            n += values.numel() - cap
            values = values[-cap:]
        idx = (n + torch.arange(values.numel(), device=self.errors.device)) % cap
        self.errors[idx] = values
        self.num_recorded.fill_(n + values.numel())

    def values(self) -> Tensor:
        """The buffered errors, oldest first."""
        n, cap = int(self.num_recorded), self.capacity
        if n <= cap:
            return self.errors[:n].clone()
        head = n % cap
        return torch.cat([self.errors[head:], self.errors[:head]])

    def stats(self) -> tuple[float, float, int]:
        """``(mean, unbiased std, count)`` of the buffer (std is ``nan`` with fewer than 2 values)."""
        v = self.values().double()
        n = v.numel()
        mean = float(v.mean()) if n else float("nan")
        std = float(v.std(unbiased=True)) if n >= 2 else float("nan")
        return mean, std, n

    def freeze(self) -> None:
        self.frozen.fill_(True)
        self.requires_grad_(False)


def descriptor_errors(rds: Sequence[RepresentationDescriptor], u: Tensor) -> Tensor:
    """Errors of K descriptors on the same token means ``u`` ``(B, d)`` in two batched matmuls: ``(K, B)``."""
    if len(rds) == 1:
        return rds[0](u).unsqueeze(0)
    we = torch.stack([r.encoder.weight for r in rds])  # (K, q, d)
    be = torch.stack([r.encoder.bias for r in rds])  # (K, q)
    wd = torch.stack([r.decoder.weight for r in rds])  # (K, d, q)
    bd = torch.stack([r.decoder.bias for r in rds])  # (K, d)
    code = torch.einsum("bd,kqd->kbq", u, we) + be[:, None, :]
    rec = torch.einsum("kbq,kdq->kbd", code, wd) + bd[:, None, :]
    return (rec - u.unsqueeze(0)).pow(2).mean(dim=-1)


def buffer_stats(rds: Sequence[RepresentationDescriptor]) -> list[tuple[float, float, int]]:
    return [rd.stats() for rd in rds]


def z_scores(errors: Tensor, stats: Sequence[tuple[float, float, int]], mode: ZScore = "abs") -> Tensor:
    """z-scores ``(K, B)`` of errors ``(K, B)`` against each descriptor's ``(mean, std, count)`` (section 5.1).

    ``abs``: ``|r - mean| / std`` (official code: unusually low errors count too); ``upper``: ``max(r - mean, 0) /
    std`` (one-sided). A descriptor with 2 or fewer buffered values gives z = 0. A zero std is replaced by the
    smallest positive float, so any deviation from a constant buffer is infinitely novel.
    """
    if mode not in ("abs", "upper"):
        raise ValueError(f"z_score={mode!r}; valid choices: abs, upper")
    mean = errors.new_tensor([s[0] if s[2] > 2 else 0.0 for s in stats]).unsqueeze(1)
    std = errors.new_tensor([s[1] if s[2] > 2 else 1.0 for s in stats]).unsqueeze(1)
    valid = errors.new_tensor([s[2] > 2 for s in stats], dtype=torch.bool).unsqueeze(1)
    diff = errors - mean
    diff = diff.abs() if mode == "abs" else diff.clamp_min(0.0)
    z = diff / std.clamp_min(torch.finfo(errors.dtype).tiny)
    return torch.where(valid, z, torch.zeros_like(z))


def layer_fires(z_mean: Tensor, threshold: float) -> bool:
    """The per-layer decision (section 5.2): every existing descriptor finds the batch novel on average."""
    return bool(z_mean.numel()) and bool(z_mean.min() > threshold)


class ExpansionSignal(Exception):
    """Raised from a block-input hook at the first firing layer; abandons the rest of the detection forward."""

    def __init__(self, layer: int, z_mean: list[float], stats: list[tuple[float, float, int]]) -> None:
        super().__init__(f"expansion at block {layer}")
        self.layer = layer
        self.z_mean = z_mean
        self.stats = stats


class StopForward(Exception):
    """Raised from a block-input hook once nothing after it is needed (RD phase, detection)."""


class CosineRouter(ExpandableRouter):
    """``router_init: cosine``: an expandable router whose logits are scaled cosine similarities.

    ``logit_k(u) = scale * cos(u, w_k)`` for the token mean ``u`` ``(B, d)`` and column weights ``w_k`` (frozen and
    pending alike); the column biases are kept (so parameters and checkpoints match :class:`ExpandableRouter`) but
    unused. Every logit is bounded by ``±scale`` and depends only on directions, so a column trained while the old
    ones are frozen cannot outweigh them by growing its norm or bias (the imbalance of ``specs/sema.md`` §12 row 10).
    A new column starts from PyTorch's default init, as in ``faithful``. Cosine routing against representation
    collapse: Chi et al., "On the Representation Collapse of Sparse Mixture of Experts", NeurIPS 2022.
    """

    def __init__(self, in_features: int, columns: int = 0, pending: int = 0, scale: float = 10.0) -> None:
        super().__init__(in_features, columns, pending)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(dim=1) if x.ndim == 3 else x  # (B, d) token mean
        w = torch.cat([self.weight] + [c.weight for c in self.pending_columns()])  # (K, d)
        return self.scale * F.normalize(u.float(), dim=-1) @ F.normalize(w.float(), dim=-1).t()
