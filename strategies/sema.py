"""SEMA: Self-Expansion of pre-trained models with Modularized Adaptation.

H. Wang, H. Lu, L. Yao, D. Gong, "Self-Expansion of Pre-trained Models with Mixture of Adapters for Continual
Learning", CVPR 2025, arXiv 2403.18886; official code ``huiyiwang01/SEMA-CL``. Specification: ``specs/sema.md``.

A frozen ViT carries one bottleneck adapter per block (parallel to the MLP). At the expandable blocks each adapter is
paired with a representation descriptor (RD, a linear autoencoder on the token mean of the block input) and a column
of a softmax router. From task 2 on, a detection pass over the task's training data computes the z-score of every
frozen RD's reconstruction error; at the first block where *every* RD finds a batch novel (min_k mean_b z > tau), a
new adapter + RD + router column is added, trained for one round (classification phase, then RD phase), frozen, and
detection continues (section 5.5). Inference mixes all adapters of an expandable block with the router's softmax.

Deviations from the official code (each a documented switch or a change that does not alter the method):

- detection runs under ``torch.no_grad()`` and stops the forward after the last expandable block (the logits of a
  detection batch are unused); the RD phase likewise stops after the last block with a trainable RD;
- once every expandable block has expanded in a task, the remaining detection batches and the final (necessarily
  silent) detection pass are skipped, so ``detection_passes`` can be one lower than the official count;
- RD errors are computed from the same forward as the classification loss (a hook on the block input), in float32;
- switches: ``adapter_scale`` (official effective 1.0), ``z_score: upper`` (one-sided), ``rd_training: joint`` (one
  optimiser over CE + sum of RD losses for ``func_epoch`` epochs, RD parameters at ``rd_lr``; paper Eq. 4),
  ``router_init: match_old_bias`` (a new router column's bias starts at the mean bias of the frozen columns, against
  the imbalance of ``specs/sema.md`` section 12 row 10), ``router_init: cosine`` (every column of an expandable
  block's router scores the token mean by ``router_cosine_scale * cos(u, w_k)``, biases unused: logits bounded by
  the scale, against the same imbalance; the official code has no such router). Any non-default value is a deviation.

Diagnostics (no effect on training): ``eval_every_epoch`` evaluates on the seen tasks' test sets after every epoch of
a classification phase (the official trainer does this for logging, section 7) and logs ``epoch_eval`` records to
``metrics.jsonl`` (never into the accuracy matrix); ``sema_router_usage`` (section 10) records, after each task's
evaluation, the mean softmax weight of every adapter at every expandable block over the evaluated test samples
(gathered from the routers' own forward during that evaluation, no second pass).

Frozen computation (performance only, ``train.cache: auto``; exact with deterministic training inputs, i.e.
``stream.augment: none``; see ``cl/cache/``): after task 1 blocks before the first expandable one never change,
so the loop computes their output once per task for detection and every training round (a round at block b declares
``Phase.trainable_from = b``; a head-only phase ``len(blocks)``) and once per run for the test sets
(``frozen_prefix``). The RD phase trains the descriptors on their inputs (token means of the block inputs), computed
once per round from the frozen model: 20 epochs of small autoencoders instead of 20 backbone passes. The old
``prefix_cache`` switch is deprecated and ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from cl.adapters import BottleneckConfig, adapter_name
from cl.adapters.inject import site_key
from cl.cache import declared_hook
from cl.config import StrategyConfig
from cl.heads import IncrementalLinear
from cl.mixture import ExpandableRouter, Route
from cl.model import CLModel
from cl.strategy import Strategy, masked_cross_entropy, register_strategy
from cl.types import Batch, Phase, StepOutput, Stream, Task
from strategies._sema_parts import (
    CosineRouter,
    ExpansionSignal,
    RepresentationDescriptor,
    StopForward,
    buffer_stats,
    descriptor_errors,
    layer_fires,
    z_scores,
)

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block

    from cl._typing import ModuleDictOf

__all__ = ["SemaConfig", "SemaStrategy"]

log = logging.getLogger(__name__)

BASE = adapter_name(0)
RD_KEY = "sema_rd"


def _rd_lists(model: CLModel) -> ModuleDictOf[nn.ModuleList]:
    """``model.extras[RD_KEY]``: ``str(block)`` -> the block's representation descriptors, oldest first."""
    return cast("ModuleDictOf[nn.ModuleList]", model.extras[RD_KEY])


def _rd_loss(rd_out: dict[int, Tensor] | None) -> Tensor:
    """Sum over blocks of the summed per-descriptor mean RD errors (``rd_out`` holds at least one block)."""
    assert rd_out is not None
    return cast(Tensor, sum(e.mean(dim=1).sum() for e in rd_out.values()))


@dataclass(frozen=True)
class SemaConfig(StrategyConfig):
    """``strategy.name: sema`` (defaults = the official CIFAR-100 recipe, ``specs/sema.md`` section 7).

    Attributes:
        expandable_blocks: 0-based blocks with RDs and routers that may grow (checked against the backbone at setup);
            empty (the default) = the backbone's last three blocks, resolved at setup and recorded in
            ``metrics.jsonl`` and ``result.json`` (the paper configs set ``[9, 10, 11]`` of ViT-B/16 explicitly).
        bottleneck: adapter hidden size r. rd_dim: RD code size q. buffer_size: RD error FIFO capacity.
        exp_threshold: tau of the expansion test. z_score: ``abs`` (official) or ``upper`` (one-sided).
        func_epoch / rd_epoch: epochs of the classification and RD phases. init_lr / rd_lr: their learning rates.
        momentum / weight_decay / batch_size: SGD settings shared by all phases. detect_batch_size: detection batch.
        adapter_scale: adapter output scale (official effective value 1.0).
        rd_training: ``sequential`` (official: two phases) or ``joint`` (one phase, CE + sum of RD losses).
        router_init: ``faithful`` (default PyTorch init of a new column), ``match_old_bias`` or ``cosine``
            (scaled-cosine logits, see the module docstring). router_cosine_scale: the scale s of ``cosine``.
        eval_every_epoch: diagnostic test evaluation after every classification-phase epoch (``epoch_eval`` in
            ``metrics.jsonl``; the accuracy matrix is unaffected).
        prefix_cache: deprecated and ignored: the loop's frozen-computation cache (``train.cache: auto``) does this
            and more (kept so that old configs still load).
    """

    name: str = "sema"
    expandable_blocks: tuple[int, ...] = ()
    bottleneck: int = 16
    rd_dim: int = 128
    buffer_size: int = 500
    exp_threshold: float = 2.0
    func_epoch: int = 5
    rd_epoch: int = 20
    init_lr: float = 0.005
    rd_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    detect_batch_size: int = 128
    adapter_scale: float = 1.0
    z_score: Literal["abs", "upper"] = "abs"
    rd_training: Literal["sequential", "joint"] = "sequential"
    router_init: Literal["faithful", "match_old_bias", "cosine"] = "faithful"
    router_cosine_scale: float = 10.0
    eval_every_epoch: bool = False
    prefix_cache: bool = False  # deprecated (no effect): use train.cache: auto
    #: the official recipe uses SGD; ``adamw`` is a deviation for backbones/datasets where SGD at the paper's rates
    #: diverges or stalls (e.g. the CPU quickstart: DINOv2-S features, 120 images per task)
    optimizer: Literal["sgd", "adamw"] = "sgd"

    def __post_init__(self) -> None:
        blocks = self.expandable_blocks
        if any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"strategy.expandable_blocks must be distinct non-negative block indices, got {blocks}")
        if list(blocks) != sorted(blocks):
            raise ValueError(f"strategy.expandable_blocks must be increasing, got {blocks}")
        for key in ("bottleneck", "rd_dim", "buffer_size", "func_epoch", "rd_epoch", "batch_size",
                    "detect_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        for key in ("init_lr", "rd_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        if self.router_cosine_scale <= 0:
            raise ValueError(f"strategy.router_cosine_scale must be positive, got {self.router_cosine_scale}")
        choices = {"z_score": ("abs", "upper"), "rd_training": ("sequential", "joint"),
                   "router_init": ("faithful", "match_old_bias", "cosine")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"strategy.{key}={getattr(self, key)!r}; valid choices: {', '.join(valid)}")


@dataclass
class _TaskStats:
    training_rounds: int = 0
    detection_passes: int = 0
    detection_batches: int = 0
    trainable_params_per_round: list[int] | None = None


@register_strategy("sema")
class SemaStrategy(Strategy):
    """SEMA (Wang et al., CVPR 2025, arXiv 2403.18886); see the module docstring for deviations."""

    config_cls = SemaConfig
    cfg: SemaConfig
    smoke = {"expandable_blocks": (3, 4, 5), "func_epoch": 2, "rd_epoch": 2, "init_lr": 0.005, "rd_lr": 0.05,
             "batch_size": 16, "detect_batch_size": 32, "rd_dim": 16}

    def __init__(self, cfg: SemaConfig, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self._model: CLModel | None = None
        self._handles: list = []
        self._detecting = False
        self._rd_out: dict[int, Tensor] | None = None  # RD errors with grad, collected for the RD loss
        self._stop_at: int | None = None
        self._expanded: set[int] = set()  # blocks expanded during the current task
        self._new: dict[int, str] = {}  # block -> adapter trained in the current round
        self._base_done = False
        self._tasks_done = 0
        self._stats = _TaskStats()
        self._added: dict[int, int] = {}
        self._keepalive: list[nn.Parameter] = []
        self._usage: dict[int, list[Tensor]] | None = None  # block -> [sum of softmax weights (K,), samples (1,)]
        self._capture: dict[int, Tensor] | None = None  # descriptor inputs collected by the block-input hook
        self._rd_blocks: list[int] = []  # blocks of the cached descriptor inputs of the current RD phase

    # --- setup --------------------------------------------------------------------------------------------------
    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        cfg, n_blocks = self.cfg, len(model.backbone.blocks)
        if not cfg.expandable_blocks:  # the default: the last three blocks of this backbone
            self.cfg = cfg = dataclasses.replace(cfg, expandable_blocks=tuple(range(max(0, n_blocks - 3), n_blocks)))
            self.ctx.log.write("sema_expandable_blocks", blocks=list(cfg.expandable_blocks), source="default")
        bad = [b for b in cfg.expandable_blocks if b >= n_blocks]
        if bad:
            raise ValueError(f"strategy.expandable_blocks {bad} out of range: the backbone has blocks 0..{n_blocks - 1}"
                             f" (e.g. expandable_blocks: {list(range(max(0, n_blocks - 3), n_blocks))})")
        if cfg.prefix_cache:
            log.warning("strategy.prefix_cache is deprecated and has no effect: use train.cache: auto (the loop's "
                        "frozen-computation cache, cl/cache/)")
        d, device = model.spec.num_features, self.ctx.device
        model.attach("bottleneck", self._adapter_cfg(None), BASE)
        model.set_route(Route.select(BASE))
        model.extras[RD_KEY] = nn.ModuleDict()
        for b in cfg.expandable_blocks:
            site = model.sites[self._site(b)]
            site.router = self._new_router(d, columns=0, pending=1).to(device)  # the task-1 placeholder column
            site.route = Route.soft()
            _rd_lists(model)[str(b)] = nn.ModuleList([self._new_rd(d)])
            norm2 = cast("Block", model.backbone.blocks[b]).norm2
            # declared: its effects are covered by trainable_from / frozen_prefix (it records only for unfrozen RDs)
            hook = declared_hook(functools.partial(self._on_block_input, b))
            self._handles.append(norm2.register_forward_pre_hook(hook))
        model.heads["main"] = IncrementalLinear(d, stream.num_classes).to(device)
        self._model = model

    def _new_router(self, d: int, columns: int, pending: int) -> ExpandableRouter:
        if self.cfg.router_init == "cosine":
            return CosineRouter(d, columns, pending, self.cfg.router_cosine_scale)
        return ExpandableRouter(d, columns, pending)

    def _adapter_cfg(self, blocks: tuple[int, ...] | None) -> BottleneckConfig:
        return BottleneckConfig(blocks=blocks, bottleneck=self.cfg.bottleneck, scale=self.cfg.adapter_scale)

    def _new_rd(self, d: int) -> RepresentationDescriptor:
        rd = RepresentationDescriptor(d, self.cfg.rd_dim, self.cfg.buffer_size).to(self.ctx.device)
        rd.requires_grad_(False)
        return rd

    @staticmethod
    def _site(block: int) -> str:
        return site_key(f"blocks.{block}")

    def _router(self, model: CLModel, block: int) -> ExpandableRouter:
        """The router of an expandable block (``setup`` gave every expandable block one)."""
        router = model.sites[self._site(block)].router
        assert router is not None
        return router

    def rds(self, model: CLModel, block: int) -> list[RepresentationDescriptor]:
        """The representation descriptors of an expandable block, oldest first."""
        return cast("list[RepresentationDescriptor]", list(_rd_lists(model)[str(block)]))

    # --- the block-input hook (RD errors from the same forward; detection) ----------------------------------------
    def _on_block_input(self, block: int, _module: nn.Module, args: tuple) -> None:
        model = self._model
        assert model is not None
        h = args[0]  # (B, N, d): the residual stream after attention, the adapter's input
        if self._detecting:
            self._detect_at(model, block, h)
            if block == self.cfg.expandable_blocks[-1]:
                raise StopForward
            return
        if self._capture is not None:  # descriptor inputs for the cache (eval mode, no gradient)
            self._capture[block] = h.float().mean(dim=1)
            if self._stop_at == block:
                raise StopForward
            return
        if not model.training:
            return
        rds = [rd for rd in self.rds(model, block) if not rd.is_frozen]
        if rds:
            u = h.detach().float().mean(dim=1)  # (B, d) token mean
            with torch.autocast(u.device.type, enabled=False):
                if self._rd_out is not None:
                    errs = descriptor_errors(rds, u)  # (K, B), with grad for the RD loss
                    self._rd_out[block] = errs
                else:
                    with torch.no_grad():
                        errs = descriptor_errors(rds, u)
            for rd, e in zip(rds, errs, strict=True):
                rd.record(e)
        if self._stop_at == block:
            raise StopForward

    def _detect_at(self, model: CLModel, block: int, h: Tensor) -> None:
        if block in self._expanded:
            return
        rds = self.rds(model, block)
        u = h.float().mean(dim=1)
        with torch.autocast(u.device.type, enabled=False):
            errs = descriptor_errors(rds, u)
        stats = buffer_stats(rds)
        z_mean = z_scores(errs, stats, self.cfg.z_score).mean(dim=1)  # (K,)
        if layer_fires(z_mean, self.cfg.exp_threshold):
            raise ExpansionSignal(block, z_mean.tolist(), stats)

    @torch.no_grad()
    def detect_batch(self, model: CLModel, x: Tensor) -> ExpansionSignal | None:
        """One detection forward (eval mode, no gradient): the signal of the first firing block, or ``None``."""
        model.eval()
        self._detecting = True
        try:
            with self.ctx.autocast():
                model.features(x)
        except ExpansionSignal as sig:
            return sig
        except StopForward:
            return None
        finally:
            self._detecting = False
        return None

    # --- frozen computation (cl/cache/) ----------------------------------------------------------------------------
    def frozen_prefix(self, model: CLModel) -> int:
        """After task 1, blocks before the first expandable one never change (section 4, prefix caching)."""
        return self.cfg.expandable_blocks[0] if self._base_done else 0

    def descriptor_inputs(self, model: CLModel, x: Tensor, blocks: list[int]) -> Tensor:
        """Token means of the inputs of ``blocks`` (what their RDs see), ``(B, len(blocks), d)`` in float32.

        ``x``: images, or tokens under ``model.input_at``; the forward stops after the last of ``blocks``.
        """
        self._capture, self._stop_at = {}, max(blocks)
        try:
            model.features(x)
        except StopForward:
            pass
        finally:
            captured, self._capture, self._stop_at = self._capture, None, None
        return torch.stack([captured[b] for b in blocks], dim=1)

    def _rd_inputs(self, model: CLModel, task: Task) -> Dataset | None:
        """The RD phase's data: cached descriptor inputs of the task's training set (``None``: train from images)."""
        blocks = [b for b in self.cfg.expandable_blocks if any(not rd.is_frozen for rd in self.rds(model, b))]
        self._rd_blocks = blocks
        return self.ctx.cache.derived(model, task.train, f"sema_rd_inputs_{blocks}",
                                      lambda x: self.descriptor_inputs(model, x, blocks), max(blocks) + 1,
                                      "phase sema_rd", training=True)

    # --- phases ---------------------------------------------------------------------------------------------------
    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        cfg, ctx = self.cfg, self.ctx
        self._expanded, self._stats, self._added = set(), _TaskStats(trainable_params_per_round=[]), {}
        if not self._base_done:  # task 1: one round on every adapter, the three RDs and the placeholder columns
            self._new = {b: BASE for b in range(len(model.backbone.blocks))}
            yield from self._round(model, task)
            self._base_done = True
            return
        first = cfg.expandable_blocks[0]
        cached = ctx.cache.inputs(model, task.train, first, "sema detection")  # frozen blocks, once per task
        data, block = (cached, first) if cached is not None else (task.train, 0)
        n_sites = len(cfg.expandable_blocks)
        while len(self._expanded) < n_sites:
            self._stats.detection_passes += 1
            added, seen = False, 0
            loader = ctx.loader(data, cfg.detect_batch_size, shuffle=True, num_workers=0 if block else None,
                                key=("sema_detect", self._stats.detection_passes))
            for index, (x, _) in enumerate(loader):
                if len(self._expanded) == n_sites:
                    break
                seen += len(x)
                self._stats.detection_batches += 1
                with model.input_at(block):
                    sig = self.detect_batch(model, ctx.to_device(x))
                if sig is None:
                    continue
                self.expand(model, task.task_id, sig.layer)
                ctx.event("expansion", layer=sig.layer, detection_pass=self._stats.detection_passes,
                          batch_index=index, samples_seen=seen, z_mean_per_adapter=sig.z_mean,
                          z_min=min(sig.z_mean), threshold=cfg.exp_threshold,
                          buffer_stats=[list(s) for s in sig.stats])
                yield from self._round(model, task)
                added = True
            if not added:
                break
        if self._stats.training_rounds == 0:  # nothing fired: train the head only (section 5.5)
            yield self._phase("sema_head", list(model.heads["main"].parameters()), cfg.func_epoch, cfg.init_lr,
                              None, len(model.backbone.blocks))

    def _phase(self, name: str, params: list, epochs: int, lr: float, data: Dataset | None,
               trainable_from: int) -> Phase:
        cfg = self.cfg
        return Phase(name, params, epochs, data=data, lr=lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, scheduler="cosine",
                     info={"round": self._stats.training_rounds}, trainable_from=trainable_from,
                     eval_every_epoch=cfg.eval_every_epoch and name != "sema_rd")

    def expand(self, model: CLModel, task_id: int, block: int) -> None:
        """Add a fresh adapter, RD (empty buffer) and router column at ``block``; they train in the next round."""
        name = adapter_name(task_id)
        model.attach("bottleneck", self._adapter_cfg((block,)), name)
        router = model.sites[self._site(block)].router
        assert isinstance(router, ExpandableRouter)
        col = router.add_column()
        if self.cfg.router_init == "match_old_bias" and router.bias.numel():
            with torch.no_grad():
                col.bias.fill_(float(router.bias.mean()))
        _rd_lists(model)[str(block)].append(self._new_rd(model.spec.num_features))
        self._expanded.add(block)
        self._added[block] = 1
        self._new = {block: name}

    def _round(self, model: CLModel, task: Task) -> Iterator[Phase]:
        """One training round (section 7): classification phase, RD phase, then freeze everything and merge."""
        cfg = self.cfg
        first_trained = min(self._new)  # new adapters and pending router columns sit at these blocks
        cls_params: list[nn.Parameter] = []
        for block, name in self._new.items():
            cls_params += model.adapter_parameters(name, [self._site(block)])
        for block in cfg.expandable_blocks:
            cls_params += list(self._router(model, block).pending.parameters())
        cls_params += list(model.heads["main"].parameters())
        rd_params = [p for b in cfg.expandable_blocks for rd in self.rds(model, b) if not rd.is_frozen
                     for p in rd.parameters()]
        per_round = self._stats.trainable_params_per_round
        assert per_round is not None  # phases() starts every task with a list
        per_round.append(sum(p.numel() for p in cls_params + rd_params))
        # merge() below frees the pending router columns; keeping them alive until the task ends stops a later
        # parameter from reusing their id(), which the loop uses to count trained parameters and key its shuffles
        self._keepalive += cls_params
        if cfg.rd_training == "joint":
            groups = [{"params": cls_params, "lr": cfg.init_lr}, {"params": rd_params, "lr": cfg.rd_lr}]
            yield self._phase("sema_joint", groups, cfg.func_epoch, cfg.init_lr, None, first_trained)
        else:
            yield self._phase("sema_cls", cls_params, cfg.func_epoch, cfg.init_lr, None, first_trained)
            # the RDs only observe the now frozen model: their inputs are computed once (None: from images)
            yield self._phase("sema_rd", rd_params, cfg.rd_epoch, cfg.rd_lr, self._rd_inputs(model, task),
                              len(model.backbone.blocks))
        for block in cfg.expandable_blocks:
            for rd in self.rds(model, block):
                rd.freeze()
            self._router(model, block).merge()
        self._new = {}
        self._stats.training_rounds += 1

    # --- losses ---------------------------------------------------------------------------------------------------
    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        task = self.ctx.task
        assert task is not None
        rd_out: dict[int, Tensor] | None
        if phase.name == "sema_rd" and phase.data is not None:  # cached descriptor inputs (B, len(blocks), d)
            rd_loss = _rd_loss(self._cached_rd_errors(model, batch.x))
            return StepOutput(rd_loss, {"rd": float(rd_loss.detach())})
        if phase.name == "sema_rd":
            blocks = [b for b in self.cfg.expandable_blocks if any(not rd.is_frozen for rd in self.rds(model, b))]
            self._rd_out, self._stop_at = {}, max(blocks)
            try:
                model.features(batch.x)
            except StopForward:
                pass
            finally:
                rd_out, self._rd_out, self._stop_at = self._rd_out, None, None
            rd_loss = _rd_loss(rd_out)
            return StepOutput(rd_loss, {"rd": float(rd_loss.detach())})
        joint = phase.name == "sema_joint"
        self._rd_out = {} if joint else None
        try:
            logits = model.heads["main"](model.features(batch.x))
        finally:
            rd_out, self._rd_out = self._rd_out, None
        ce = masked_cross_entropy(logits, batch.y, self.ctx.num_seen, task.label_offset)
        if not joint:
            return StepOutput(ce, {"ce": float(ce.detach())})
        rd_loss = _rd_loss(rd_out)
        return StepOutput(ce + rd_loss, {"ce": float(ce.detach()), "rd": float(rd_loss.detach())})

    def _cached_rd_errors(self, model: CLModel, u: Tensor) -> dict[int, Tensor]:
        """RD errors (with gradient) on cached descriptor inputs, recorded as the block-input hook would."""
        out: dict[int, Tensor] = {}
        for i, block in enumerate(self._rd_blocks):
            rds = [rd for rd in self.rds(model, block) if not rd.is_frozen]
            with torch.autocast(u.device.type, enabled=False):
                errs = descriptor_errors(rds, u[:, i])  # (K, B)
            out[block] = errs
            for rd, e in zip(rds, errs, strict=True):
                rd.record(e)
        return out

    # --- after the task ---------------------------------------------------------------------------------------------
    def after_task(self, model: CLModel, task: Task) -> None:
        blocks = self.cfg.expandable_blocks
        routers = {b: self._router(model, b) for b in blocks}
        self.ctx.event(
            "sema_task",
            training_rounds=self._stats.training_rounds,
            detection_passes=self._stats.detection_passes,
            detection_batches=self._stats.detection_batches,
            head_only=self._stats.training_rounds == 0,
            adapters_per_layer=model.adapters_per_block(),
            added_per_layer=[self._added.get(b, 0) for b in blocks] if task.task_id else [1] * len(blocks),
            trainable_params_per_round=self._stats.trainable_params_per_round,
            rd_stats={str(b): [list(s) for s in buffer_stats(self.rds(model, b))] for b in blocks},
            router_columns={str(b): {"bias": r.bias.tolist(), "weight_norm": r.weight.norm(dim=1).tolist()}
                            for b, r in routers.items()},
        )
        self._expanded, self._keepalive = set(), []
        self._tasks_done += 1
        self._usage = {}  # collect router usage during the evaluation that follows

    # --- inference and router usage (section 10) -------------------------------------------------------------------
    def predict(self, model: CLModel, x: Tensor) -> Tensor:
        """Logits over the seen classes (one forward, every adapter mixed by its router's softmax, section 9)."""
        if self._usage is None:
            return model(x)[:, : self.ctx.num_seen]
        handles = [self._router(model, b).register_forward_hook(functools.partial(self._record_usage, b))
                   for b in self.cfg.expandable_blocks]
        try:
            return model(x)[:, : self.ctx.num_seen]
        finally:
            for h in handles:
                h.remove()

    def _record_usage(self, block: int, _module: nn.Module, _args: tuple, logits: Tensor) -> None:
        assert self._usage is not None
        w = torch.softmax(logits.detach().float(), dim=-1)  # (B, K): the weights the site mixes with
        acc = self._usage.get(block)
        if acc is None or acc[0].shape[0] != w.shape[1]:
            acc = self._usage[block] = [w.new_zeros(w.shape[1]), w.new_zeros(1)]
        acc[0] += w.sum(0)
        acc[1] += w.shape[0]

    def after_eval(self, model: CLModel, task: Task) -> None:
        """Log ``sema_router_usage``: per expandable block, the mean softmax weight of each adapter (oldest first)."""
        usage, self._usage = self._usage, None
        if usage:
            self.ctx.event("sema_router_usage",
                           router_usage={str(b): (s / n).tolist() for b, (s, n) in sorted(usage.items())},
                           samples=int(next(iter(usage.values()))[1]))

    def expansion_info(self, model: CLModel) -> dict[str, Any]:
        """P(t) = adapters + router columns (RDs and head excluded); P_ref(t) = one module per site per task."""
        blocks = self.cfg.expandable_blocks
        fixed = sum(p.numel() for k, s in model.sites.items() if k not in {self._site(b) for b in blocks}
                    for p in s.parameters())
        module = sum(p.numel() for p in model.adapter_parameters(BASE, [self._site(blocks[0])]))
        module += model.spec.num_features + 1  # one router column
        return {
            "expandable_blocks": list(blocks),
            "deployed_params": model.deployed_params(),
            "reference_params": fixed + len(blocks) * max(self._tasks_done, 1) * module,
        }

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """RD counts and flags; RD weights, error buffers and frozen flags are buffers in ``model.extras``."""
        model = self._model
        assert model is not None
        counts = {str(b): len(self.rds(model, b)) for b in self.cfg.expandable_blocks}
        return {"rd_counts": counts, "base_done": self._base_done, "tasks_done": self._tasks_done}, {}

    def rebuild(self, model: CLModel, meta: dict[str, Any]) -> None:
        if self.cfg.router_init == "cosine":  # load_structure recreated plain routers: same parameters, cosine logits
            for b in self.cfg.expandable_blocks:
                site = model.sites[self._site(b)]
                old = site.router
                assert old is not None
                site.router = self._new_router(old.in_features, old.weight.shape[0], len(old.pending)).to(
                    old.weight.device)
        for block, count in meta["rd_counts"].items():
            rds = _rd_lists(model)[block]
            while len(rds) < count:
                rds.append(self._new_rd(model.spec.num_features))

    def load_state(self, model: CLModel, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self._base_done = bool(meta["base_done"])
        self._tasks_done = int(meta["tasks_done"])
