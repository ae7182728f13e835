"""``mhr``: MHR-CIL, this project's adaptation of multi-head adapter routing to class-incremental vision.

Published mechanism: Polytropon (Ponti et al., EACL 2023, arXiv 2202.13914) and MHR (Caccia et al., NeurIPS 2023,
arXiv 2211.03831; code ``microsoft/mttl``): a shared inventory of LoRA skills per adapted layer, mixed in parameter
space by per-task routing logits, per head (``cl.adapters.skills``). **No published system applies Poly/MHR to
continual learning; everything sequential here is our own design (``specs/mhr.md`` Part B), its defaults are
untuned, and every result must be reported as "MHR-CIL (clsim adaptation)", not as MHR.**

Protocol (B.3): task 1 trains the K skills with one routing row per k-means pseudo-task (frozen, un-adapted features;
``task1_pseudo_tasks: kmeans``) or with one row (``none``); the task row z_1 (mean of the pseudo rows) is then
consolidated alone and the pseudo rows are dropped. Each later task t adds a row z_t (U(-1e-3, 1e-3) or a copy of
the nearest task's row) and either trains only z_t and its head (MHR-z) or, when ``expand_policy`` says so, adds
``expand_skills`` zero-function skills per adapted layer that only z_t and later rows may use (expansion mode).
``new_task_init: mu`` instead gives each task a private skill initialised to the skills' average (MHR-μ). Rows,
skills and heads are frozen after their task, so routed to task s the model gives bit-identical logits for task s's
classes for ever (B.4); only task inference can forget. Test time (B.5): the task is inferred from the frozen,
un-adapted CLS feature through the retrieval index over class prototypes (``top1``, ``soft``, ``topk``; μ fallback
below ``min_similarity``; ``arrow``: task-free per-token routing, an ablation).

Deviations/choices beyond the spec: the z-score policy fits SEMA's descriptors in closed form (PCA) on the frozen
block inputs of each task, once, instead of training them with SGD; ``probe`` continues MHR-z for ``epochs -
probe_epochs`` epochs when it does not expand (a fresh cosine schedule); when the probe expands, the row it trained
is extended with logits for the new skills, which renormalises its heads (parameter-space mixing: a zero-B skill
leaves the *other* rows exactly unchanged, not the row that may use it); MHR-μ averages all current skills (earlier
private ones included); pseudo-task batches train through per-sample one-hot mixtures of the pseudo rows (the same
function as hard rows, one einsum per site); the slot bottleneck has no biases.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.adapters.inject import block_of
from cl.adapters.lora import DEFAULT_LORA_TARGETS
from cl.adapters.skills import SkillInventoryAdapter, SkillsConfig
from cl.config import StrategyConfig
from cl.context import derive_seed
from cl.heads import TaskHeads
from cl.mixture import Route
from cl.model import CLModel
from cl.strategy import Strategy, register_strategy
from cl.types import Batch, Phase, Prediction, StepOutput, Stream, Task
from strategies._mhr_parts import (
    TaggedDataset,
    TaskRetrieval,
    TrainAccuracy,
    blocks_firing,
    fit_descriptor,
    kmeans_pseudo_tasks,
    lowest_entropy,
    soft_task_weights,
    steps_per_epoch,
    task_scores,
    within_task,
)
from strategies._sema_parts import RepresentationDescriptor

if TYPE_CHECKING:
    from cl._typing import ModuleDictOf

__all__ = ["MhrConfig", "MhrStrategy", "SKILLS"]

SKILLS = "mhr"  # the adapter name at every site
RD_KEY = "mhr_rd"


@dataclass(frozen=True)
class MhrConfig(StrategyConfig):
    """``strategy.name: mhr`` (defaults: ``specs/mhr.md`` B.2/B.3; project choices, untuned).

    Attributes:
        routing: ``mhr`` (``heads`` heads) or ``poly`` (h = 1). skills / heads / rank: K / h / r.
        sites: ``linear`` (LoRA skills on ``targets`` in ``blocks``) or ``sema_slot`` (a head-split bottleneck
            parallel to the MLP in ``blocks``, with ``slot_act``, as SEMA's adapters).
        relaxed_bernoulli / temperature: Gumbel-sigmoid routing during training (off, as in mttl's T0 configs).
        task1_pseudo_tasks / pseudo_tasks / consolidate_epochs: task 1 with k-means pseudo-task rows (P =
            ``pseudo_tasks`` or K) and z_1 consolidation epochs, or ``none`` (one row).
        mode: ``z`` (routing only after task 1; never expands) or ``expand`` (``expand_policy`` decides).
        expand_policy: ``never``, ``always``, ``probe`` (MHR-z for ``probe_epochs``; expand if the training accuracy
            is below ``probe_target`` x task 1's final one) or ``zscore`` (SEMA's descriptor test at every adapted
            block, ``zscore_threshold``, ``zscore_rd_dim``, ``zscore_buffer``, ``detect_batch_size``).
        expand_skills: skills added per adapted layer by one expansion.
        new_task_init: ``mu`` = MHR-μ (a private skill per task, started as the skills' average); ``none``.
        row_init: ``uniform`` (U(-1e-3, 1e-3)) or ``nearest`` (copy of the row of the nearest task by prototype).
        epochs / lr / routing_lr_mult / momentum / weight_decay / batch_size / optimizer: training (routing logits in
            their own group: lr x ``routing_lr_mult``, weight decay 0).
        task_inference: ``top1``, ``soft`` (p(t|x) = softmax(max cosine per task / ``soft_temperature``)), ``topk``
            (``topk`` candidates, lowest entropy) or ``arrow`` (task-free ablation).
        predict_scope: ``task`` (within the inferred task's classes) or ``all`` (hard routing only).
        unknown_fallback / min_similarity: uniform μ routing when the best cosine is below ``min_similarity``.
        index_backend: retrieval-index backend for the class prototypes.
    """

    name: str = "mhr"
    routing: Literal["mhr", "poly"] = "mhr"
    skills: int = 8
    heads: int = 64
    rank: int = 1
    sites: Literal["linear", "sema_slot"] = "linear"
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    blocks: tuple[int, ...] | None = None
    slot_act: Literal["relu", "gelu", "none"] = "relu"
    relaxed_bernoulli: bool = False
    temperature: float = 1.0
    task1_pseudo_tasks: Literal["kmeans", "none"] = "kmeans"
    pseudo_tasks: int | None = None
    consolidate_epochs: int = 1
    mode: Literal["z", "expand"] = "expand"
    expand_policy: Literal["never", "always", "probe", "zscore"] = "probe"
    expand_skills: int = 1
    probe_epochs: int = 2
    probe_target: float = 0.95
    zscore_threshold: float = 2.0
    zscore_rd_dim: int = 128
    zscore_buffer: int = 500
    detect_batch_size: int = 128
    new_task_init: Literal["none", "mu"] = "none"
    row_init: Literal["uniform", "nearest"] = "uniform"
    epochs: int = 5
    lr: float = 0.005
    routing_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    task_inference: Literal["top1", "soft", "topk", "arrow"] = "top1"
    predict_scope: Literal["task", "all"] = "task"
    topk: int = 2
    soft_temperature: float = 0.1
    unknown_fallback: Literal["mu", "none"] = "mu"
    min_similarity: float = 0.0
    arrow_top_k: int = 4
    index_backend: Literal["torch", "flat", "hnsw", "ivf"] = "flat"

    def __post_init__(self) -> None:
        choices: dict[str, tuple[Any, ...]] = {
            "routing": ("mhr", "poly"), "sites": ("linear", "sema_slot"), "slot_act": ("relu", "gelu", "none"),
            "task1_pseudo_tasks": ("kmeans", "none"), "mode": ("z", "expand"),
            "expand_policy": ("never", "always", "probe", "zscore"), "new_task_init": ("none", "mu"),
            "row_init": ("uniform", "nearest"), "optimizer": ("sgd", "adamw"),
            "task_inference": ("top1", "soft", "topk", "arrow"), "predict_scope": ("task", "all"),
            "unknown_fallback": ("mu", "none"), "index_backend": ("torch", "flat", "hnsw", "ivf"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"strategy.{key}={getattr(self, key)!r}; valid choices: {', '.join(valid)}")
        for key in ("skills", "heads", "rank", "expand_skills", "probe_epochs", "epochs", "batch_size", "topk",
                    "zscore_rd_dim", "zscore_buffer", "detect_batch_size", "arrow_top_k"):
            if getattr(self, key) <= 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        if self.pseudo_tasks is not None and self.pseudo_tasks <= 0:
            raise ValueError(f"strategy.pseudo_tasks must be positive or null, got {self.pseudo_tasks}")
        if self.consolidate_epochs < 0:
            raise ValueError(f"strategy.consolidate_epochs must be >= 0, got {self.consolidate_epochs}")
        for key in ("lr", "routing_lr_mult", "temperature", "soft_temperature", "probe_target"):
            if not getattr(self, key) > 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"strategy.min_similarity is a cosine in [-1, 1], got {self.min_similarity}")

    @property
    def num_heads(self) -> int:
        return 1 if self.routing == "poly" else self.heads

    def adapter_config(self) -> SkillsConfig:
        slot = self.sites == "sema_slot"
        return SkillsConfig(blocks=self.blocks, targets=None if slot else self.targets, skills=self.skills,
                            heads=self.num_heads, rank=self.rank, act=self.slot_act if slot else "none",
                            relaxed_bernoulli=self.relaxed_bernoulli, temperature=self.temperature,
                            arrow_top_k=self.arrow_top_k)


@dataclass
class _TaskLog:
    decision: str = "base"
    probe_accuracy: float | None = None
    fired_blocks: list[int] | None = None
    z_max: dict[int, float] | None = None
    added_sites: list[str] | None = None


@register_strategy("mhr")
class MhrStrategy(Strategy):
    """MHR-CIL (clsim adaptation of Poly/MHR, ``specs/mhr.md`` Part B); see the module docstring."""

    config_cls = MhrConfig
    cfg: MhrConfig
    smoke = {"skills": 4, "heads": 8, "epochs": 2, "consolidate_epochs": 1, "probe_epochs": 1, "lr": 0.05,
             "batch_size": 16, "zscore_rd_dim": 8}

    def __init__(self, cfg: MhrConfig, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self.retrieval: TaskRetrieval | None = None
        self.task1_accuracy: float | None = None
        self.tasks_done = 0
        self.acc = TrainAccuracy()
        self._train_rows: Tensor | None = None  # pseudo-task row per tag (task 1), or None
        self._row = 0  # the row trained in the current phase (no tags)
        self._frozen: tuple[Tensor, Tensor, dict[int, Tensor]] | None = None  # features, labels, block inputs
        self._log = _TaskLog()
        self._keepalive: list[nn.Parameter] = []
        self._model: CLModel | None = None
        self._per_block_before: list[int] = []

    # --- helpers ----------------------------------------------------------------------------------------------
    def skill_adapters(self, model: CLModel) -> dict[str, SkillInventoryAdapter]:
        """Site key -> the skill inventory at that site."""
        return {k: cast(SkillInventoryAdapter, s.adapters[SKILLS]) for k, s in model.sites.items()
                if SKILLS in s.adapters}

    def _gen(self, *purpose: Any) -> torch.Generator:
        task = self.ctx.task.task_id if self.ctx.task is not None else -1
        return torch.Generator(device=self.ctx.device).manual_seed(derive_seed(self.ctx.seed, "mhr", task, *purpose))

    def _zscore(self) -> bool:
        cfg = self.cfg
        return cfg.mode == "expand" and cfg.expand_policy == "zscore" and cfg.new_task_init == "none"

    def _blocks(self, model: CLModel) -> list[int]:
        return sorted({block_of(s.target) for s in model.sites.values()})

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        cfg, d = self.cfg, model.spec.num_features
        if self._zscore() and cfg.zscore_rd_dim >= d:
            raise ValueError(f"strategy.zscore_rd_dim={cfg.zscore_rd_dim} must be below the feature width {d}")
        adapter_type = "skills_slot" if cfg.sites == "sema_slot" else "skills"
        model.attach(adapter_type, cfg.adapter_config(), SKILLS)
        model.set_route(Route.skills(SKILLS))  # μ until a strategy route is set
        model.heads["main"] = TaskHeads(d).to(self.ctx.device)
        model.extras[RD_KEY] = nn.ModuleDict()
        self.retrieval = TaskRetrieval(d, cfg.index_backend)
        self._model = model

    def _rds(self, model: CLModel) -> ModuleDictOf[nn.ModuleList]:
        return cast("ModuleDictOf[nn.ModuleList]", model.extras[RD_KEY])

    def _new_rd(self, model: CLModel) -> RepresentationDescriptor:
        rd = RepresentationDescriptor(model.spec.num_features, self.cfg.zscore_rd_dim, self.cfg.zscore_buffer)
        return rd.to(self.ctx.device).requires_grad_(False)

    def before_task(self, model: CLModel, task: Task) -> None:
        model.head("main", TaskHeads).add_task(task.num_classes)
        noise = self._gen("relaxed") if self.cfg.relaxed_bernoulli else None
        for adapter in self.skill_adapters(model).values():
            adapter.generator = noise
        self._frozen = self.frozen_features(model, task)
        self._log = _TaskLog()
        self._per_block_before = model.adapters_per_block()

    @torch.no_grad()
    def frozen_features(self, model: CLModel, task: Task) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Un-adapted CLS features, labels and (z-score policy) block-input token means of the task's training images
        under the test transform: one frozen pass for k-means, prototypes, row init and the z-score test."""
        blocks = self._blocks(model) if self._zscore() else []
        captured: dict[int, list[Tensor]] = {b: [] for b in blocks}
        handles = [model.backbone.blocks[b].register_forward_pre_hook(
            lambda _m, args, b=b: captured[b].append(args[0].float().mean(dim=1).cpu())) for b in blocks]
        try:
            with model.routing(Route.off()):
                feats, labels = self.ctx.extract(model, task.train.view("eval"), desc=f"mhr frozen task {task.task_id}")
        finally:
            for h in handles:
                h.remove()
        return feats, labels, {b: torch.cat(v) for b, v in captured.items()}

    # --- phases -------------------------------------------------------------------------------------------------
    def _phase(self, name: str, params: list[nn.Parameter], route_params: list[nn.Parameter], epochs: int,
               data: Any = None) -> Phase:
        cfg = self.cfg
        groups: list[dict[str, Any]] = []
        if params:
            groups.append({"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        if route_params:  # routing logits: their own group, lr x routing_lr_mult, no weight decay (B.3)
            groups.append({"params": route_params, "lr": cfg.lr * cfg.routing_lr_mult, "weight_decay": 0.0})
        n = len(data) if data is not None else len(cast(Task, self.ctx.task).train)
        self.acc.start(epochs, steps_per_epoch(n, cfg.batch_size))
        self._keepalive += params + route_params  # replaced row parameters must not free their id() mid-task
        return Phase(name, groups, epochs, data=data, lr=cfg.lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, scheduler="cosine")

    def _rows(self, model: CLModel, row: int) -> list[nn.Parameter]:
        return [cast(nn.Parameter, a.rows[row]) for a in self.skill_adapters(model).values()]

    def _group_params(self, model: CLModel, groups: dict[str, int]) -> list[nn.Parameter]:
        adapters = self.skill_adapters(model)
        return [p for key, g in groups.items() for p in adapters[key].skill_params([g])]

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        if task.task_id == 0 and not self.tasks_done:
            yield from self._first_task(model, task)
        else:
            yield from self._later_task(model, task)

    def _first_task(self, model: CLModel, task: Task) -> Iterator[Phase]:
        cfg = self.cfg
        adapters = self.skill_adapters(model)
        head = model.head("main", TaskHeads).task_parameters(0)
        skills = [p for a in adapters.values() for p in a.skill_params()]
        gen = self._gen("rows")
        if cfg.task1_pseudo_tasks == "kmeans":
            assert self._frozen is not None
            tags = kmeans_pseudo_tasks(self._frozen[0], cfg.pseudo_tasks or cfg.skills,
                                       derive_seed(self.ctx.seed, "mhr_kmeans"))
            num = int(tags.max()) + 1
            for a in adapters.values():
                for _ in range(num):
                    a.add_row(generator=gen)
            self._train_rows = torch.arange(num, device=self.ctx.device)
            rows = [p for r in range(num) for p in self._rows(model, r)]
            self.ctx.event("mhr_pseudo_tasks", pseudo_tasks=num, sizes=torch.bincount(tags, minlength=num).tolist())
            yield self._phase("mhr_skills", skills + head, rows, cfg.epochs, TaggedDataset(task.train, tags))
            self._train_rows = None
            for a in adapters.values():  # z_1 = mean of the pseudo rows, then consolidated alone
                a.add_row(init=torch.stack([a.rows[r].detach() for r in range(num)]).mean(0))
            self._row = num
            if cfg.consolidate_epochs:
                yield self._phase("mhr_consolidate", [], self._rows(model, num), cfg.consolidate_epochs)
            for a in adapters.values():
                a.keep_rows([num])
        else:
            for a in adapters.values():
                a.add_row(generator=gen)
            self._row = 0
            yield self._phase("mhr_skills", skills + head, self._rows(model, 0), cfg.epochs)
        self.task1_accuracy = self.acc.value()
        self._log.probe_accuracy = self.task1_accuracy

    def _later_task(self, model: CLModel, task: Task) -> Iterator[Phase]:
        cfg = self.cfg
        t = task.task_id
        adapters = self.skill_adapters(model)
        head = model.head("main", TaskHeads).task_parameters(t)
        gen = self._gen("rows")
        self._row = t
        if cfg.new_task_init == "mu":  # MHR-μ: a private skill = the average of the current skills
            groups = {k: a.add_skills(1, init="mean") for k, a in adapters.items()}
            for a in adapters.values():
                only = torch.zeros(a.num_skills, dtype=torch.bool)
                only[-1] = True
                a.add_row(only, generator=gen)
            self._log.decision, self._log.added_sites = "mu", list(groups)
            yield self._phase("mhr_mu", self._group_params(model, groups) + head, [], cfg.epochs)
            return
        init = self._nearest_rows(model) if cfg.row_init == "nearest" else None
        for key, a in adapters.items():
            a.add_row(init=None if init is None else init[key], generator=gen)
        policy = "never" if cfg.mode == "z" else cfg.expand_policy
        if policy == "probe":
            yield self._phase("mhr_probe", head, self._rows(model, t), cfg.probe_epochs)
            acc, ref = self.acc.value(), self.task1_accuracy
            self._log.probe_accuracy = acc
            expand = acc is not None and ref is not None and acc < cfg.probe_target * ref
            self.ctx.event("mhr_probe", probe_accuracy=acc, task1_accuracy=ref, target=cfg.probe_target,
                           expand=expand)
            if not expand:
                self._log.decision = "z"
                if cfg.epochs > cfg.probe_epochs:
                    yield self._phase("mhr_z", head, self._rows(model, t), cfg.epochs - cfg.probe_epochs)
                return
            sites = list(adapters)
        elif policy == "zscore":
            sites = self._zscore_sites(model)
        elif policy == "always":
            sites = list(adapters)
        else:
            sites = []
        if not sites:
            self._log.decision = "z"
            yield self._phase("mhr_z", head, self._rows(model, t), cfg.epochs)
            return
        groups = self.expand(model, sites, t, gen)
        self._log.decision, self._log.added_sites = "expand", sites
        yield self._phase("mhr_expand", self._group_params(model, groups) + head, self._rows(model, t), cfg.epochs)

    def expand(self, model: CLModel, sites: list[str], row: int, generator: torch.Generator) -> dict[str, int]:
        """Add ``expand_skills`` zero-function skills at ``sites``; only row ``row`` (and later rows) may use them."""
        adapters = self.skill_adapters(model)
        groups = {}
        for key in sites:
            a = adapters[key]
            groups[key] = a.add_skills(self.cfg.expand_skills, generator=generator)
            new = torch.zeros(a.num_skills, dtype=torch.bool)
            new[-self.cfg.expand_skills:] = True
            a.extend_row(row, new, generator=generator)
        self.ctx.event("mhr_expansion", row=row, sites=len(sites), skills_added=self.cfg.expand_skills,
                       blocks=sorted({block_of(model.sites[k].target) for k in sites}))
        return groups

    def _nearest_rows(self, model: CLModel) -> dict[str, Tensor]:
        """Row init ``nearest``: the previous task whose mean prototype is closest (cosine) to this task's; its row
        logits at its skills, U(-1e-3, 1e-3) for skills it could not use."""
        assert self.retrieval is not None and self._frozen is not None
        means, tasks = self.retrieval.task_means()
        feats = F.normalize(self._frozen[0].float(), dim=-1)
        own = F.normalize(feats.mean(0), dim=0)
        src = int(tasks[int((means @ own).argmax())])
        gen = self._gen("nearest")
        out = {}
        for key, a in self.skill_adapters(model).items():
            init = torch.empty(a.heads, a.num_skills, device=a.row_mask.device).uniform_(-1e-3, 1e-3, generator=gen)
            init[:, a.visible(src)] = a.rows[src].detach()
            out[key] = init
        self.ctx.event("mhr_row_init", nearest_task=src)
        return out

    def _zscore_sites(self, model: CLModel) -> list[str]:
        assert self._frozen is not None
        rds = {int(b): list(cast(Any, v)) for b, v in self._rds(model).items()}
        fired, z_max = blocks_firing(rds, self._frozen[2], self.cfg.zscore_threshold, self.cfg.detect_batch_size,
                                     torch.Generator().manual_seed(derive_seed(self.ctx.seed, "mhr_detect",
                                                                               cast(Task, self.ctx.task).task_id)))
        self._log.fired_blocks, self._log.z_max = fired, z_max
        return [k for k, s in model.sites.items() if block_of(s.target) in fired]

    # --- loss ---------------------------------------------------------------------------------------------------
    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        task = self.ctx.task
        assert task is not None
        y = batch.y
        if y.ndim == 2:  # (label, pseudo-task) from TaggedDataset: per-sample one-hot mixtures of the pseudo rows
            assert self._train_rows is not None  # (one mixing einsum per site, cheaper to train than hard rows)
            y, rows = y[:, 0], self._train_rows[y[:, 1]]
            route = Route.skills(SKILLS, weights=F.one_hot(rows, len(self._train_rows)).float())
        else:
            route = Route.skills(SKILLS, rows=torch.tensor(self._row))  # one row for the batch (0-dim, CPU)
        with model.routing(route):
            feats = model.features(batch.x)
        logits = cast(nn.Linear, model.head("main", TaskHeads).heads[task.task_id])(feats).float()
        target = y - task.label_offset
        ce = F.cross_entropy(logits, target)
        self.acc.update(logits.detach(), target)
        return StepOutput(ce, {"ce": float(ce.detach())})

    # --- after the task -----------------------------------------------------------------------------------------
    def after_task(self, model: CLModel, task: Task) -> None:
        assert self.retrieval is not None and self._frozen is not None
        feats, labels, inputs = self._frozen
        classes = labels.unique(sorted=True)
        protos = F.normalize(torch.stack([feats[labels == c].float().mean(0) for c in classes]), dim=-1)
        self.retrieval.add(classes, protos, task.task_id)
        if self._zscore():  # a descriptor for every block whose skills grew in this task (task 1: all)
            grown = set(self._blocks(model)) if task.task_id == 0 or not self.tasks_done else {
                block_of(model.sites[k].target) for k in (self._log.added_sites or [])}
            for b in sorted(grown):
                rds = self._rds(model)
                if str(b) not in rds:
                    rds[str(b)] = nn.ModuleList()
                rd = self._new_rd(model)
                fit_descriptor(rd, inputs[b])
                rds[str(b)].append(rd)
        adapters = self.skill_adapters(model)
        per_block = model.adapters_per_block()
        self.ctx.event(
            "mhr_task", decision=self._log.decision, probe_accuracy=self._log.probe_accuracy,
            task1_accuracy=self.task1_accuracy, fired_blocks=self._log.fired_blocks,
            z_max={str(k): v for k, v in (self._log.z_max or {}).items()},
            skills_per_layer=per_block,
            skills_added_per_layer=[n - m for n, m in zip(per_block, self._per_block_before, strict=True)],
            routing_logits_added=sum(int(a.rows[-1].numel()) for a in adapters.values()),
            head_rows_added=task.num_classes,
            deployed_params=model.deployed_params(),
        )
        self._frozen, self._keepalive = None, []
        self.tasks_done += 1

    # --- inference ----------------------------------------------------------------------------------------------
    def _routed_logits(self, model: CLModel, x: Tensor, route: Route) -> Tensor:
        with model.routing(route):
            return model.heads["main"](model.features(x))[:, : self.ctx.num_seen].float()

    @torch.no_grad()
    def predict(self, model: CLModel, x: Tensor) -> Prediction:
        cfg, retrieval = self.cfg, self.retrieval
        assert retrieval is not None and self.ctx.task is not None
        if cfg.task_inference == "arrow":  # task-free ablation: no retrieval, no task prediction
            return Prediction(self._routed_logits(model, x, Route.skills(SKILLS, mode="arrow")))
        num_seen, num_tasks = self.ctx.num_seen, self.tasks_done
        class_task = retrieval.class_task[:num_seen].to(x.device)
        with model.routing(Route.off()):
            query = model.features(x).float()  # the frozen, un-adapted CLS feature (B.5 "Keys")
        per_task = task_scores(retrieval.class_scores(query, num_seen).to(x.device), class_task, num_tasks)
        best, guess = per_task.max(dim=1)
        unknown = (best < cfg.min_similarity) & (cfg.unknown_fallback == "mu")
        extras: dict[str, Tensor] = {}
        if cfg.task_inference == "soft":
            p = soft_task_weights(per_task, cfg.soft_temperature)
            logits = self._routed_logits(model, x, Route.skills(SKILLS, weights=p))
            task_pred = p.argmax(dim=1)
        elif cfg.task_inference == "topk":
            cand = per_task.topk(min(cfg.topk, num_tasks), dim=1).indices  # (B, k)
            outs = torch.stack([within_task(self._routed_logits(model, x, Route.skills(SKILLS, rows=cand[:, j])),
                                            class_task, cand[:, j]) for j in range(cand.shape[1])])
            pick = lowest_entropy(outs)
            logits = outs.gather(0, pick[None, :, None].expand(1, *outs.shape[1:]))[0]
            task_pred = cand.gather(1, pick[:, None])[:, 0]
            extras["task_pred_initial"] = torch.where(unknown, -1, guess)
        else:
            logits = self._routed_logits(model, x, Route.skills(SKILLS, rows=torch.where(unknown, -1, guess)))
            if cfg.predict_scope == "task":
                logits = within_task(logits, class_task, torch.where(unknown, -1, guess))
            task_pred = guess
        if unknown.any() and cfg.task_inference != "top1":  # μ routing over all seen classes for those samples
            idx = unknown.nonzero(as_tuple=True)[0]
            mu = self._routed_logits(model, x[idx], Route.skills(SKILLS, rows=torch.full_like(idx, -1)))
            logits = logits.index_copy(0, idx, mu)
        return Prediction(logits, task_pred=torch.where(unknown, -1, task_pred), extras=extras)

    # --- accounting and checkpoints -----------------------------------------------------------------------------
    def expansion_info(self, model: CLModel) -> dict[str, Any]:
        """P(t) = skills + routing rows at every site; P_ref(t) = one rank-r LoRA skill per adapted layer per task
        (mhr.md B.6)."""
        one_skill = sum(self.cfg.rank * (s.in_features + s.out_features) for s in model.sites.values())
        return {"expandable_blocks": self._blocks(model), "deployed_params": model.deployed_params(),
                "reference_params": max(self.tasks_done, 1) * one_skill}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Growth of every site's inventory (``setup`` rebuilds the initial shape only), descriptor counts, counters;
        the prototype index and class -> task map as tensors."""
        assert self.retrieval is not None and self._model is not None
        model = self._model
        sites = {k: {"groups": list(a.cfg.groups), "rows": list(a.cfg.rows)}
                 for k, a in self.skill_adapters(model).items()}
        meta = {"tasks_done": self.tasks_done, "task1_accuracy": self.task1_accuracy, "sites": sites,
                "rd_counts": {b: len(v) for b, v in self._rds(model).items()}}
        return meta, {f"retrieval.{k}": v for k, v in self.retrieval.state_dict().items()}

    def rebuild(self, model: CLModel, meta: dict[str, Any]) -> None:
        adapters = self.skill_adapters(model)
        for key, growth in meta["sites"].items():
            adapters[key].grow_to(tuple(growth["groups"]), tuple(growth["rows"]))
        rds = self._rds(model)
        for block, count in meta["rd_counts"].items():
            if block not in rds:
                rds[block] = nn.ModuleList()
            while len(rds[block]) < count:
                rds[block].append(self._new_rd(model))

    def load_state(self, model: CLModel, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        assert self.retrieval is not None
        self.tasks_done = int(meta["tasks_done"])
        self.task1_accuracy = meta["task1_accuracy"]
        self.retrieval.load_state_dict({k[len("retrieval."):]: v for k, v in tensors.items()
                                        if k.startswith("retrieval.")})
