"""Skill inventory: K LoRA skills split into h heads, mixed in parameter space by per-head routing (Poly / MHR).

E. M. Ponti et al., "Combining Parameter-efficient Modules for Task-level Generalisation" (Polytropon, EACL 2023,
arXiv 2202.13914) and L. Caccia et al., "Multi-Head Adapter Routing for Cross-Task Generalization" (MHR, NeurIPS
2023, arXiv 2211.03831); official code ``microsoft/mttl`` (``mttl/models/modifiers/poly.py``), PEFT port
``src/peft/tuners/poly/{layer,router}.py``. Specification: ``specs/mhr.md`` A.2, A.3, B.2.

One adapter per adapted site holds:

- skills ``A`` ``(h, K, d_in/h, r)`` and ``B`` ``(h, K, r, d_out/h)``, stored as *groups* (the initial K skills, then
  every group added later by :meth:`SkillInventoryAdapter.add_skills`), so that each group can be trained or frozen
  on its own; A per (head, skill) slice is Kaiming-uniform (a = sqrt(5), fan-in d_in/h), B = 0;
- routing rows (one per task or pseudo-task), row ``t`` a parameter ``(h, n_t)`` of logits over the ``n_t`` skills it
  may use (``row_mask[t]``, ascending skill order). Skills outside a row's mask are not in the row at all, so their
  weight is exactly zero and they get no gradient from that row.

Routing weights of a row (A.3, per head, the mttl bug of commit ``374c253c`` impossible by construction: the logits
are ``(h, n)`` and normalised along the skill axis only)::

    w[j, k] = sigmoid(z[j, k]) / (sum_k' sigmoid(z[j, k']) + EPS)

and the site's delta for input ``x`` (row-vector convention, heads = contiguous blocks of the input/output dims)::

    A_t = concat_j sum_k w[j, k] A[j, k]   (d_in x r),   B_t = concat_j sum_k w[j, k] B[j, k]   (r x d_out)
    delta(x) = (alpha / r) * act(x A_t) B_t                  (act = identity for LoRA sites)

computed with einsums over (sample, head, skill): no Python loop over skills or heads. Poly is h = 1.

Two placements share the code: ``skills`` on ``nn.Linear`` sites (LoRA, default targets qkv/proj/fc1/fc2) and
``skills_slot`` parallel to the MLP (SEMA's AdaptFormer slot: ``act`` = ReLU by default, a head-split bottleneck),
for like-for-like comparisons with SEMA (``sites: sema_slot`` in ``strategies/mhr.py``).

How a site mixes is chosen per forward by a ``Route.skills`` route (``cl.mixture``) set through
``CLModel.routing(...)``: ``rows`` (hard: one row per sample, -1 = uniform μ), ``soft`` (per-sample mixture of rows,
linear in parameter space so still one forward), ``mu`` (uniform over all skills, mttl's ``AverageSelector``; also
what a plain ``forward(x)`` does) or ``arrow`` (task-free per-token routing over skills with Arrow prototypes,
Ostapenko et al. 2024; an ablation, mixing outputs).

Deviations: no biases in the slot bottleneck (SEMA's adapter has them); the EPS guard is 1e-12 (PEFT's value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.adapters.base import Adapter, AdapterConfig, Placement, register_adapter
from cl.adapters.lora import DEFAULT_LORA_TARGETS

__all__ = [
    "SkillsConfig",
    "SkillInventoryAdapter",
    "SkillLinearAdapter",
    "SkillSlotAdapter",
    "head_weights",
    "mix_skills",
    "relaxed_sigmoid",
    "arrow_prototypes",
    "EPS",
]

EPS = 1e-12
SkillMode = Literal["rows", "soft", "mu", "arrow"]


@dataclass(frozen=True)
class SkillsConfig(AdapterConfig):
    """Attributes:
        skills: K, the initial number of skills. heads: h (1 = Poly). rank: r (shared by every head).
        alpha: scaling ``alpha / rank`` (mttl's ``lora_alpha`` = 1: scaling 1/r).
        act: ``none`` (LoRA) or a nonlinearity between down and up (``relu`` in SEMA's slot).
        relaxed_bernoulli / temperature: Gumbel-sigmoid routing in training (needs ``generator`` set on the adapter).
        arrow_top_k: skills kept per token by the ``arrow`` ablation (softmax over the kept ones).
        groups / rows: growth record (sizes of the skill groups added after the initial one; skills visible to each
            routing row). Written by the adapter as it grows, so ``structure()`` rebuilds the right shapes.
    """

    targets: tuple[str, ...] | str | None = DEFAULT_LORA_TARGETS
    skills: int = 8
    heads: int = 64
    rank: int = 1
    alpha: float = 1.0
    act: Literal["none", "relu", "gelu"] = "none"
    relaxed_bernoulli: bool = False
    temperature: float = 1.0
    arrow_top_k: int = 4
    groups: tuple[int, ...] = ()
    rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("skills", "heads", "rank", "arrow_top_k"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.act not in ("none", "relu", "gelu"):
            raise ValueError(f"act={self.act!r}; valid choices: none, relu, gelu")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if any(g <= 0 for g in self.groups):
            raise ValueError(f"groups must hold positive sizes, got {self.groups}")
        total = self.skills + sum(self.groups)
        if any(not 0 < n <= total for n in self.rows):
            raise ValueError(f"rows must hold visible-skill counts in 1..{total}, got {self.rows}")


def head_weights(logits: Tensor) -> Tensor:
    """Per-head routing weights: ``sigmoid`` then normalise over the last (skill) axis, ``(..., h, n) -> same``.

    Every head is normalised on its own (mhr.md A.3); normalising over all h·n entries is the mttl bug.
    """
    s = torch.sigmoid(logits)
    return s / (s.sum(dim=-1, keepdim=True) + EPS)


def relaxed_sigmoid(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A relaxed-Bernoulli (Gumbel-sigmoid) sample ``sigmoid((z + log u - log(1 - u)) / T)``, u ~ U(0, 1) seeded."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps).to(logits.dtype)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def mix_skills(weights: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The parameter-space mixture: weights ``(h, K)`` or ``(B, h, K)``, A ``(h, K, i, r)``, B ``(h, K, r, o)`` ->
    mixed A ``(1|B, h, i, r)`` and B ``(1|B, h, r, o)`` (one einsum each over (sample, head, skill))."""
    w = weights if weights.ndim == 3 else weights[None]
    return torch.einsum("bhk,hkir->bhir", w, a), torch.einsum("bhk,hkro->bhro", w, b)


def _dense(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-skill dense factors: A ``(h, K, i, r) -> (K, h*i, r)``, B ``(h, K, r, o) -> (K, r, h*o)``."""
    h, k, i, r = a.shape
    o = b.shape[-1]
    return a.permute(1, 0, 2, 3).reshape(k, h * i, r), b.permute(1, 2, 0, 3).reshape(k, r, h * o)


def arrow_prototypes(a: Tensor, b: Tensor) -> Tensor:
    """Arrow prototypes ``(K, d_in)``: the top input-side singular vector of each skill's ``A_k B_k`` (d_in x d_out).

    Computed from thin QR factors (``A_k = Q_a R_a``, ``B_k^T = Q_b R_b``, SVD of the r x r ``R_a R_b^T``), so the
    dense d_in x d_out update is never formed. The sign is arbitrary (Arrow routes by the absolute inner product).
    """
    ad, bd = _dense(a.detach().float(), b.detach().float())
    qa, ra = torch.linalg.qr(ad)  # (K, d_in, r), (K, r, r)
    qb, rb = torch.linalg.qr(bd.transpose(1, 2))  # (K, d_out, r), (K, r, r)
    u, _, _ = torch.linalg.svd(ra @ rb.transpose(1, 2))
    return (qa @ u[..., :1]).squeeze(-1)


class SkillInventoryAdapter(Adapter):
    """K LoRA skills in h heads plus routing rows at one ``nn.Linear`` site (see the module docstring).

    ``forward(x)`` (what ``select``/``sum`` routes call) uses uniform μ routing over all skills; strategies route with
    ``Route.skills`` (:meth:`routed`). ``generator`` must be set before training with ``relaxed_bernoulli``.
    """

    placement: ClassVar[Placement] = "linear"
    config_cls = SkillsConfig
    cfg: SkillsConfig
    row_mask: Tensor  # persistent buffer (R, K) bool

    def __init__(self, in_features: int, out_features: int, cfg: SkillsConfig) -> None:
        self.check_site(in_features, out_features, cfg)
        super().__init__(in_features, out_features, cfg)
        self.generator: torch.Generator | None = None
        self.skill_a = nn.ParameterList()
        self.skill_b = nn.ParameterList()
        self.rows = nn.ParameterList()
        self.register_buffer("row_mask", torch.zeros(0, 0, dtype=torch.bool))
        base, self.cfg = cfg, replace(cfg, groups=(), rows=())
        self.add_skills(base.skills, record=False)
        for g in base.groups:
            self.add_skills(g)
        for n in base.rows:  # shapes only: values come from a state dict
            mask = torch.zeros(self.num_skills, dtype=torch.bool)
            mask[:n] = True
            self.add_row(mask)
        self.cfg = base

    @classmethod
    def check_site(cls, in_features: int, out_features: int, cfg: AdapterConfig) -> None:
        """Raise ``ValueError`` unless the heads divide both dimensions (run for every site before any mutation)."""
        heads = getattr(cfg, "heads", 1)
        if in_features % heads or out_features % heads:
            raise ValueError(f"heads={heads} must divide the site's in_features={in_features} and "
                             f"out_features={out_features}")

    # --- sizes ----------------------------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.cfg.heads

    @property
    def num_skills(self) -> int:
        return sum(int(p.shape[1]) for p in self.skill_a)

    @property
    def num_modules(self) -> int:
        """Modules for expansion statistics (``CLModel.adapters_per_block``): the skills."""
        return self.num_skills

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    def skill_params(self, groups: list[int] | None = None) -> list[nn.Parameter]:
        """A and B of the given skill groups (all by default)."""
        idx = range(len(self.skill_a)) if groups is None else groups
        return [p for g in idx for p in (self.skill_a[g], self.skill_b[g])]

    def skills(self) -> tuple[Tensor, Tensor]:
        """All skills: A ``(h, K, d_in/h, r)`` and B ``(h, K, r, d_out/h)`` (groups concatenated along K)."""
        if len(self.skill_a) == 1:
            return self.skill_a[0], self.skill_b[0]
        return torch.cat(list(self.skill_a), dim=1), torch.cat(list(self.skill_b), dim=1)

    def visible(self, row: int) -> Tensor:
        """Indices of the skills row ``row`` may use, ascending ``(n_row,)``."""
        return self.row_mask[row].nonzero(as_tuple=True)[0]

    # --- growth ---------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.row_mask.device

    def add_skills(self, count: int, init: Literal["zero", "mean"] = "zero", generator: torch.Generator | None = None,
                   record: bool = True) -> int:
        """Append a group of ``count`` skills; returns its group index. New parameters are frozen.

        ``zero``: A Kaiming-uniform per (head, skill) slice (bound ``1/sqrt(d_in/h)``, ``generator`` or the global
        RNG), B = 0, so the site's function is unchanged for every row. ``mean`` (MHR-μ): every new skill starts as the
        average of the current skills' A and B (not a zero function).
        """
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        h, r = self.cfg.heads, self.cfg.rank
        di, do = self.in_features // h, self.out_features // h
        dev = self._device()
        if init == "mean":
            if not self.num_skills:
                raise ValueError("init='mean' needs existing skills")
            a_all, b_all = self.skills()
            a = a_all.detach().mean(dim=1, keepdim=True).repeat(1, count, 1, 1)
            b = b_all.detach().mean(dim=1, keepdim=True).repeat(1, count, 1, 1)
        elif init == "zero":
            bound = 1.0 / math.sqrt(di)  # kaiming_uniform_(a=sqrt(5)) on a (r, d_in/h) slice: gain/sqrt(fan_in)
            a = torch.empty(h, count, di, r, device=dev).uniform_(-bound, bound, generator=generator)
            b = torch.zeros(h, count, r, do, device=dev)
        else:
            raise ValueError(f"init={init!r}; valid choices: zero, mean")
        self.skill_a.append(nn.Parameter(a, requires_grad=False))
        self.skill_b.append(nn.Parameter(b, requires_grad=False))
        mask = self.row_mask
        self.row_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], count)], dim=1)
        if record:
            self.cfg = replace(self.cfg, groups=self.cfg.groups + (count,))
        return len(self.skill_a) - 1

    def add_row(self, visible: Tensor | None = None, init: Tensor | None = None,
                generator: torch.Generator | None = None) -> int:
        """Append a routing row over the skills in ``visible`` ((K,) bool; default all); returns its index.

        Logits ``(h, n)`` are ``init`` if given, else U(-1e-3, 1e-3) (``generator``). The row starts frozen.
        """
        mask = torch.ones(self.num_skills, dtype=torch.bool) if visible is None else visible.to(torch.bool).cpu()
        if mask.shape != (self.num_skills,) or not mask.any():
            raise ValueError(f"visible must be a non-empty ({self.num_skills},) mask, got shape {tuple(mask.shape)}")
        n = int(mask.sum())
        if init is None:
            logits = torch.empty(self.cfg.heads, n, device=self._device()).uniform_(-1e-3, 1e-3, generator=generator)
        else:
            if init.shape != (self.cfg.heads, n):
                raise ValueError(f"row init must have shape {(self.cfg.heads, n)}, got {tuple(init.shape)}")
            logits = init.detach().clone().float().to(self._device())
        self.rows.append(nn.Parameter(logits, requires_grad=False))
        self.row_mask = torch.cat([self.row_mask, mask.to(self._device())[None]])
        self.cfg = replace(self.cfg, rows=self.cfg.rows + (n,))
        return self.num_rows - 1

    def extend_row(self, row: int, new: Tensor, generator: torch.Generator | None = None) -> None:
        """Let row ``row`` also use the skills in ``new`` ((K,) bool), all after its current ones; new logits are
        U(-1e-3, 1e-3). The row parameter is replaced (rebuild the optimiser)."""
        new = new.to(torch.bool).to(self._device()) & ~self.row_mask[row]
        if not new.any():
            return
        idx = new.nonzero(as_tuple=True)[0]
        if int(idx.min()) <= int(self.visible(row).max()):
            raise ValueError("extend_row keeps the skill order: new skills must come after the row's current ones")
        old = self.rows[row]
        extra = torch.empty(self.cfg.heads, idx.numel(), device=old.device).uniform_(-1e-3, 1e-3, generator=generator)
        self.rows[row] = nn.Parameter(torch.cat([old.detach(), extra], dim=1), requires_grad=False)
        self.row_mask[row] |= new
        self.cfg = replace(self.cfg, rows=tuple(int(m.sum()) for m in self.row_mask))

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order), e.g. to drop pseudo-task rows after task 1."""
        rows = [self.rows[i] for i in keep]
        self.rows = nn.ParameterList(rows)
        self.row_mask = self.row_mask[keep].clone()
        self.cfg = replace(self.cfg, rows=tuple(int(m.sum()) for m in self.row_mask))

    def grow_to(self, groups: tuple[int, ...], rows: tuple[int, ...]) -> None:
        """Resume: create (placeholder-valued) groups and rows until the shapes match a saved growth record."""
        for g in groups[len(self.cfg.groups):]:
            self.add_skills(g)
        if tuple(self.cfg.rows) != tuple(rows[: self.num_rows]):
            raise ValueError(f"cannot grow rows {self.cfg.rows} to {rows}")
        for n in rows[self.num_rows:]:
            mask = torch.zeros(self.num_skills, dtype=torch.bool)
            mask[:n] = True
            self.add_row(mask)

    # --- routing weights ------------------------------------------------------------------------------------------
    def row_weights(self, row: int, samples: int | None = None) -> Tensor:
        """Weights of row ``row`` over its visible skills: ``(h, n)``, or ``(samples, h, n)`` relaxed-Bernoulli
        samples when training with ``relaxed_bernoulli``."""
        z = self.rows[row]
        if samples is not None and self.training and self.cfg.relaxed_bernoulli:
            if self.generator is None:
                raise ValueError("relaxed_bernoulli routing needs adapter.generator (a seeded torch.Generator)")
            s = relaxed_sigmoid(z.expand(samples, *z.shape), self.cfg.temperature, self.generator)
            return s / (s.sum(dim=-1, keepdim=True) + EPS)
        return head_weights(z)

    def dense_row_weights(self) -> Tensor:
        """Every row's weights scattered over all K skills ``(R, h, K)`` (exact zeros outside each row's mask)."""
        out = self.row_mask.new_zeros((self.num_rows, self.cfg.heads, self.num_skills), dtype=torch.float32)
        for t in range(self.num_rows):  # rows are tasks (parameter bookkeeping, not per-sample work)
            out[t, :, self.visible(t)] = head_weights(self.rows[t]).float()
        return out

    def mu_weights(self) -> Tensor:
        """Uniform μ routing ``(h, K)`` (mttl ``AverageSelector``)."""
        return torch.full((self.cfg.heads, self.num_skills), 1.0 / self.num_skills, device=self._device())

    # --- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.routed(x, "mu")

    def routed(self, x: Tensor, mode: SkillMode = "mu", rows: Tensor | None = None,
               weights: Tensor | None = None) -> Tensor:
        """The site's delta for ``x`` ``(B, ..., d_in) -> (B, ..., d_out)``.

        Args:
            mode: ``rows`` (``rows`` (B,) long: routing row per sample, -1 = μ; or a 0-dim CPU tensor: one row for
                the batch, mixed once and broadcast), ``soft`` (``weights`` (B, R): a per-sample mixture of the R
                rows), ``mu`` or ``arrow``.

        Hard routing mixes each used row over *its own* skills only (fixed shapes after its task), so a frozen row
        gives bit-identical outputs however many skills are added later (mhr.md B.4).
        """
        a, b = self.skills()
        if mode == "arrow":
            return self._arrow(x, a, b)
        if mode == "mu":
            return self._lowrank(x, *mix_skills(self.mu_weights().to(a.dtype), a, b))
        if mode == "soft":
            if weights is None or weights.ndim != 2 or weights.shape != (x.shape[0], self.num_rows):
                raise ValueError(f"soft skill routing needs weights of shape ({x.shape[0]}, {self.num_rows})")
            w = torch.einsum("bt,thk->bhk", weights.float(), self.dense_row_weights()).to(a.dtype)
            return self._lowrank(x, *mix_skills(w, a, b))
        if mode != "rows":
            raise ValueError(f"skill routing mode {mode!r}; valid choices: rows, soft, mu, arrow")
        if rows is None or rows.shape not in ((), (x.shape[0],)):
            raise ValueError(f"rows routing needs a row index per sample, shape ({x.shape[0]},), or one for all ()")
        if rows.ndim == 0:  # one row for the whole batch (training): the mixed factors broadcast, one GEMM each
            row = int(rows)
            if not -1 <= row < self.num_rows:
                raise ValueError(f"row {row} out of range: {self.num_rows} rows (and -1 = mu)")
            if row < 0:
                return self.routed(x, "mu")
            sa, sb = self._row_skills(row, a, b)
            w = self.row_weights(row, samples=x.shape[0]).to(a.dtype)
            return self._lowrank(x, *mix_skills(w, sa, sb))
        if int(rows.max()) >= self.num_rows or int(rows.min()) < -1:
            raise ValueError(f"row index out of range: {self.num_rows} rows (and -1 = mu)")
        used, inverse = torch.unique(rows, return_inverse=True)
        parts_a, parts_b, order = [], [], []
        for j, row in enumerate(used.tolist()):  # one mixture per *task row* used in the batch
            sel = (inverse == j).nonzero(as_tuple=True)[0]
            if row < 0:
                w = self.mu_weights().to(a.dtype)
                sa, sb = a, b
            else:
                sa, sb = self._row_skills(row, a, b)
                w = self.row_weights(row, samples=sel.numel()).to(a.dtype)
            mixed_a, mixed_b = mix_skills(w, sa, sb)  # (1 or n, h, i, r), (1 or n, h, r, o)
            parts_a.append(mixed_a.expand(sel.numel(), -1, -1, -1))
            parts_b.append(mixed_b.expand(sel.numel(), -1, -1, -1))
            order.append(sel)
        if len(parts_a) == 1:
            return self._lowrank(x, parts_a[0], parts_b[0])
        back = torch.argsort(torch.cat(order))
        return self._lowrank(x, torch.cat(parts_a)[back], torch.cat(parts_b)[back])

    def _row_skills(self, row: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The skills row ``row`` may use, in ascending order (all of them without a copy when it sees all)."""
        if int(self.rows[row].shape[1]) == a.shape[1]:
            return a, b
        vis = self.visible(row)
        return a.index_select(1, vis), b.index_select(1, vis)

    def _act(self, hidden: Tensor) -> Tensor:
        if self.cfg.act == "relu":
            return F.relu(hidden)
        if self.cfg.act == "gelu":
            return F.gelu(hidden)
        return hidden

    def _lowrank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``x`` ``(B, ..., d_in)`` with per-sample (or broadcast, leading dim 1) mixed factors A ``(B|1, h, i, r)``
        and B ``(B|1, h, r, o)``: ``scaling * act(x A) B``."""
        batch, h = x.shape[0], self.cfg.heads
        xs = x.reshape(batch, -1, h, self.in_features // h)  # (B, N, h, i): head j = input block j
        a, b = a.to(xs.dtype), (b * self.scaling).to(xs.dtype)  # scale the small factor, not the output
        if a.shape[0] == 1:
            hidden = torch.einsum("bnhi,hir->bnr", xs, a[0])
            out = torch.einsum("bnr,hro->bnho", self._act(hidden), b[0])
        else:
            hidden = torch.einsum("bnhi,bhir->bnr", xs, a)
            out = torch.einsum("bnr,bhro->bnho", self._act(hidden), b)
        return out.reshape(*x.shape[:-1], self.out_features)  # head j = output block j

    def _arrow(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """Task-free ablation: per token, |<x, v_k>| over the Arrow prototypes, top-k, softmax; outputs mixed."""
        batch, h = x.shape[0], self.cfg.heads
        protos = arrow_prototypes(a, b).to(x.dtype)  # (K, d_in)
        xt = x.reshape(batch, -1, self.in_features)
        scores = (xt @ protos.t()).abs()  # (B, N, K)
        k = min(self.cfg.arrow_top_k, scores.shape[-1])
        top, pos = scores.topk(k, dim=-1)
        gate = torch.zeros_like(scores).scatter_(-1, pos, torch.softmax(top.float(), dim=-1).to(scores.dtype))
        xs = xt.reshape(batch, xt.shape[1], h, -1)
        hidden = self._act(torch.einsum("bnhi,hkir->bnkr", xs, a.to(x.dtype)))
        out = torch.einsum("bnkr,bnk,hkro->bnho", hidden, gate, b.to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features) * self.scaling

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["generator"] = None  # set again by the strategy before training
        return state


@register_adapter("skills")
class SkillLinearAdapter(SkillInventoryAdapter):
    """The skill inventory on ``nn.Linear`` sites (LoRA skills; default targets qkv, proj, fc1, fc2)."""


@register_adapter("skills_slot")
class SkillSlotAdapter(SkillInventoryAdapter):
    """The skill inventory as a head-split bottleneck parallel to the MLP (SEMA's / AdaptFormer's slot)."""

    placement: ClassVar[Placement] = "parallel_mlp"
