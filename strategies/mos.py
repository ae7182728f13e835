"""``mos``: MOS, model surgery for pre-trained-model class-incremental learning.

H.-L. Sun, D.-W. Zhou, H. Zhao, L. Gan, D.-C. Zhan, H.-J. Ye, "MOS: Model Surgery for Pre-Trained Model-Based
Class-Incremental Learning", AAAI 2025, arXiv 2412.09441; official code ``sun-hailong/AAAI25-MOS`` (mos.md).

Mechanisms: one AdaptFormer adapter set per task in all blocks (``t000``, ``t001``, ...; task b's set starts from
task b - 1's), trained with CE over the new classes + ``reg * L_orth``; merging of the current set towards the mean
of the earlier snapshots (β = ``adapter_momentum``); per-class Gaussian statistics on the eval transform; classifier
alignment of the linear head on sampled features (tasks ≥ 1); a frozen cosine prototype classifier on adapter-0
features, looked up through the retrieval index (``cl.retrieval``); training-free self-refined adapter retrieval
at inference (≤ ``max_iter`` head evaluations); ensemble ``softmax(z) + softmax((T + 1) z_proto)``.

Deviations and switches (mos.md §10):

- ``merge_mode: paper`` (default) merges once after every optimiser step; statistics use the snapshot; evaluation
  never changes the model and (``lazy_features``) computes only the adapters the refinement loop asks for, several
  adapters per batch through a per-sample route. ``merge_mode: official`` reproduces the code: 12 in-place merges
  inside every training forward (one per block) plus one after the step, merging of the current set during the
  statistics (the next task starts from that state), and merging of the stored snapshots at every evaluation, with
  all T + 1 adapters run on every test batch in the code's order.
- Official-mode statistics are computed per class in batches of ``3 * batch_size`` as in the code; paper mode uses
  one pass over the task with ``train.eval_batch_size`` (no mutation, so the batching does not matter).
- Official-mode evaluation uses the code's test loader: batches of the training ``batch_size`` (48 / 32 / 16 per
  dataset) over the seen classes' test images sorted by class (stable), whatever ``train.eval_batch_size`` says
  (``Strategy.eval_batching``): the stored snapshots are merged 12 times per test batch, so the batching changes
  the results (after task 1 and 240 test images at batch 48, ‖θ₁ − m₁‖ = 0.9⁶⁰ ‖θ₁^snap − m₁‖). Paper mode
  evaluates with ``train.eval_batch_size`` in stream order (no mutation: the batching does not matter).
- Prototypes (``replace_fc``) are computed in eval mode by default. The code computes those of tasks ≥ 1 with the
  backbone left in train mode by classifier alignment, i.e. with adapter dropout (p = ``adapter_dropout``) active;
  ``official_proto_train_mode: true`` (official mode only; set in the reproduction configs) does the same
  (batches of ``batch_size``; dropout draws from the loop's seeded RNG).
- The head is an :class:`~cl.heads.IncrementalLinear` grown per task instead of one full-size ``Linear``; the rows of
  future classes (which only receive weight decay in the code) are created when their task starts.
- Sampling for classifier alignment uses Cholesky factors (float64, jitter raised only if a factorisation fails)
  and a seeded generator instead of ``MultivariateNormal.sample`` on the global RNG.
- Prototype logits are exact cosine scores from the stored class means (one matmul); the retrieval index
  (``index_backend``) serves only the top-1 of the initial guess ``g_0`` (exact for ``flat`` / ``torch``).
- The loop only scores ``task_pred`` / ``task_pred_initial``; the prototype-only and head-only predictions are
  returned in ``Prediction.extras`` (``proto_pred``, ``head_pred``) for a loop that scores them. The adapter drift
  ‖θ_t − θ_0^snap‖ is logged (``mos_adapter_drift``) before each evaluation and after it.
- Performance only (``train.cache: auto``): the adapter-0 features of a test image (prototype classifier, first
  guess) are computed at its first evaluation and reused by later ones (``FrozenCache.rows``, guarded by a
  fingerprint of the backbone and adapter 0). The adapter phase trains every block, so its inputs are not cached.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from cl.adapters import BottleneckConfig, adapter_name
from cl.cache import Fingerprint, fingerprint
from cl.config import StrategyConfig
from cl.heads import IncrementalLinear
from cl.mixture import Route
from cl.model import CLModel
from cl.strategy import Strategy, masked_cross_entropy, register_strategy
from cl.types import Batch, Phase, Prediction, StepOutput, Stream, Task, labels_of
from strategies._mos_parts import (
    GaussianFeatureBatches,
    PrototypeIndex,
    class_statistics,
    ensemble_scores,
    flat_params,
    merge_params_,
    merging_forward,
    orth_loss,
    self_refine,
    split_like,
)

__all__ = ["MosConfig", "MosStrategy"]


@dataclass(frozen=True)
class MosConfig(StrategyConfig):
    """``strategy.name: mos`` (defaults: CIFAR-100 values of ``exps/mos_cifar.json``; mos.md §8).

    Attributes:
        tuned_epoch / init_lr / batch_size / weight_decay: adapter phase (SGD momentum 0.9, cosine per epoch).
        reg / orth_temperature: weight and temperature of ``L_orth``.
        adapter_momentum: merge coefficient β.
        bottleneck / adapter_dropout / adapter_scale: the AdaptFormer adapter.
        head_lr_scale: head learning rate = ``head_lr_scale * init_lr`` in the adapter phase.
        classifier_alignment / crct_epochs / ca_lr / ca_samples_per_class_factor: head retraining on sampled
            features (``factor * batch_size`` samples per class and epoch).
        stats / cov_shrink: ``covariance`` (full, + shrink · I) or ``variance`` (its diagonal).
        max_iter: cap on head evaluations in the self-refinement loop.
        ensemble: add the prototype classifier's softmax to the head's.
        merge_mode: ``paper`` (one merge per step) or ``official`` (the code's in-place merging, mos.md §5.2).
        lazy_features: paper mode computes only the adapters the refinement needs (forced off in official mode).
        official_proto_train_mode: official mode only: compute the prototypes of tasks ≥ 1 with adapter dropout
            active, as the code does (its classifier alignment leaves the backbone in train mode); default off
            (eval mode, mos.md §6.4).
        index_backend: retrieval-index backend of the prototype classifier's top-1 lookup (the initial task guess
            ``g_0``). The ensemble's prototype logits are always exact cosine scores of every seen class (one matmul
            over the stored means), whatever the backend. ``flat`` (default) and ``torch`` are exact: ``g_0`` is
            the argmax of those scores, no second search runs; use them up to a few hundred thousand classes.
            ``hnsw`` / ``ivf`` make ``g_0`` approximate and only pay off with very many classes (a sub-linear
            top-1), never at the 50-300 classes of the paper's benchmarks; ``ivf`` searches exactly until
            ``ivf_min_train_keys`` (1000) classes were added.
    """

    name: str = "mos"
    tuned_epoch: int = 20
    init_lr: float = 0.03
    batch_size: int = 48
    weight_decay: float = 5e-4
    reg: float = 0.1
    orth_temperature: float = 0.8
    adapter_momentum: float = 0.1
    bottleneck: int = 16
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    head_lr_scale: float = 0.1
    classifier_alignment: bool = True
    crct_epochs: int = 30
    ca_lr: float = 0.005
    ca_samples_per_class_factor: int = 5
    stats: Literal["covariance", "variance"] = "covariance"
    cov_shrink: float = 1e-4
    max_iter: int = 4
    ensemble: bool = True
    merge_mode: Literal["paper", "official"] = "paper"
    lazy_features: bool = True
    official_proto_train_mode: bool = False
    index_backend: Literal["torch", "flat", "hnsw", "ivf"] = "flat"

    def __post_init__(self) -> None:
        if self.merge_mode not in ("paper", "official"):
            raise ValueError(f"strategy.merge_mode={self.merge_mode!r}; valid choices: paper, official")
        if self.stats not in ("covariance", "variance"):
            raise ValueError(f"strategy.stats={self.stats!r}; valid choices: covariance, variance")
        if self.index_backend not in ("torch", "flat", "hnsw", "ivf"):
            raise ValueError(f"strategy.index_backend={self.index_backend!r}; valid choices: torch, flat, hnsw, ivf")
        for key in ("tuned_epoch", "batch_size", "crct_epochs", "ca_samples_per_class_factor", "max_iter",
                    "bottleneck"):
            if getattr(self, key) <= 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        if self.official_proto_train_mode and self.merge_mode != "official":
            raise ValueError("strategy.official_proto_train_mode reproduces the official code and needs "
                             "strategy.merge_mode: official")
        if not 0.0 <= self.adapter_momentum <= 1.0:
            raise ValueError(f"strategy.adapter_momentum must be in [0, 1], got {self.adapter_momentum}")
        if self.init_lr <= 0 or self.ca_lr <= 0 or self.orth_temperature <= 0:
            raise ValueError("strategy.init_lr, ca_lr and orth_temperature must be positive")


@register_strategy("mos")
class MosStrategy(Strategy):
    """MOS (Sun et al., AAAI 2025, arXiv 2412.09441). Deviations: module docstring; switches: ``merge_mode``."""

    config_cls = MosConfig
    cfg: MosConfig
    smoke = {"tuned_epoch": 2, "crct_epochs": 2, "init_lr": 0.05, "batch_size": 16}

    def __init__(self, cfg: MosConfig, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self.snapshots: list[Tensor] = []  # θ_k^snap as trained (flat, CPU); merge targets come from these only
        self.carry: Tensor | None = None  # official mode: the merged current set the next task starts from
        self.cls_mean = torch.zeros(0)  # (C, d) class means under each class's task adapter
        self.cls_cov = torch.zeros(0)  # (C, d, d) or (C, d)
        self.proto: PrototypeIndex | None = None
        self.task_of = torch.zeros(0, dtype=torch.long)
        self._targets: dict[int, list[Tensor]] = {}
        self._train_state: tuple[list[nn.Parameter], list[Tensor] | None, Tensor | None] | None = None
        self._proto_feats: tuple[Tensor, Tensor] | None = None

    @property
    def official(self) -> bool:
        return self.cfg.merge_mode == "official"

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        dim = model.spec.num_features
        model.heads["main"] = IncrementalLinear(dim).to(self.ctx.device)
        task_of = torch.zeros(stream.num_classes, dtype=torch.long)
        for t in stream.tasks:
            task_of[torch.tensor(t.labels)] = t.task_id
        self.task_of = task_of
        self.proto = PrototypeIndex(self.cfg.index_backend, dim)
        self.cls_mean = torch.zeros(0, dim)
        self.cls_cov = torch.zeros((0, dim, dim) if self.cfg.stats == "covariance" else (0, dim))

    def adapter_config(self) -> BottleneckConfig:
        return BottleneckConfig(bottleneck=self.cfg.bottleneck, scale=self.cfg.adapter_scale,
                                dropout=self.cfg.adapter_dropout)

    def set_params(self, model: CLModel, task_id: int) -> list[nn.Parameter]:
        """The parameters of adapter set ``task_id`` in a fixed order (sites, then down/up weight/bias)."""
        return model.adapter_parameters(adapter_name(task_id))

    def merge_target(self, model: CLModel, task_id: int) -> list[Tensor]:
        """m_b = mean of the *trained* snapshots 0..b-1 (the code's prefix sums; later merges never enter)."""
        if task_id not in self._targets:
            mean = torch.stack(self.snapshots[:task_id]).sum(0) / task_id
            self._targets[task_id] = split_like(mean, self.set_params(model, task_id))
        return self._targets[task_id]

    def before_task(self, model: CLModel, task: Task) -> None:
        b = task.task_id
        model.head("main", IncrementalLinear).grow(task.num_classes)
        name = adapter_name(b)
        if name not in model.adapter_names():
            model.attach("bottleneck", self.adapter_config(), name)
            if b > 0:  # the current set continues from the previous task's end state
                src = self.carry if (self.official and self.carry is not None) else self.snapshots[b - 1]
                params = self.set_params(model, b)
                with torch.no_grad():
                    for p, v in zip(params, split_like(src, params), strict=True):
                        p.copy_(v)
        model.set_route(Route.select(name))

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        cfg, b = self.cfg, task.task_id
        params = self.set_params(model, b)
        targets = self.merge_target(model, b) if b > 0 else None
        old = self.cls_mean[: task.label_offset].to(self.ctx.device) if task.label_offset else None
        self._train_state = (params, targets, old)
        head_params = list(model.heads["main"].parameters())
        after_step = None
        if targets is not None:
            def after_step() -> None:
                merge_params_(params, targets, cfg.adapter_momentum)
        groups = [{"params": params, "lr": cfg.init_lr, "weight_decay": cfg.weight_decay},
                  {"params": head_params, "lr": cfg.init_lr * cfg.head_lr_scale, "weight_decay": cfg.weight_decay}]
        yield Phase("adapters", groups, cfg.tuned_epoch, lr=cfg.init_lr, optimizer="sgd", momentum=0.9,
                    weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, scheduler="cosine",
                    after_step=after_step, info={"merge_mode": cfg.merge_mode}, trainable_from=0)
        self._train_state = None
        self.snapshots.append(flat_params(params).cpu())
        self.update_statistics(model, task)
        if b > 0 and cfg.classifier_alignment:
            dev = self.ctx.device
            gen = torch.Generator(device=dev).manual_seed(self.ctx.seed * 100_003 + b)
            data = GaussianFeatureBatches(self.cls_mean.to(dev), self.cls_cov.to(dev),
                                          cfg.ca_samples_per_class_factor * cfg.batch_size, cfg.crct_epochs, gen)
            yield Phase("align", list(model.heads["main"].parameters()), cfg.crct_epochs, data=data, lr=cfg.ca_lr,
                        optimizer="sgd", momentum=0.9, weight_decay=cfg.weight_decay, batch_size=1,
                        scheduler="cosine", after_step=data.after_step)

    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        head = model.heads["main"]
        num_seen = self.ctx.num_seen
        if phase.name == "align":  # batch.x: one minibatch of sampled features (1, S, d)
            x, y = batch.x.reshape(-1, batch.x.shape[-1]), batch.y.reshape(-1)
            return StepOutput(F.cross_entropy(head(x.float())[:, :num_seen].float(), y))
        assert self._train_state is not None
        params, targets, old = self._train_state
        if self.official and targets is not None:
            with merging_forward(model.backbone.blocks, params, targets, self.cfg.adapter_momentum):
                feats = model.features(batch.x)
        else:
            feats = model.features(batch.x)
        assert self.ctx.task is not None  # the loop sets ctx.task before training
        ce = masked_cross_entropy(head(feats), batch.y, num_seen, self.ctx.task.label_offset)
        return StepOutput(ce + self.cfg.reg * orth_loss(feats, old, self.cfg.orth_temperature))

    def update_statistics(self, model: CLModel, task: Task) -> None:
        """Class means and covariances of the new classes (eval transform, eval mode, task adapter; mos.md §6.2)."""
        b = task.task_id
        data = task.train.view("eval")
        if self.official and b > 0:
            feats, labels = self.official_statistics_features(model, data, b)
        else:
            with model.routing(Route.select(adapter_name(b))):
                feats, labels = self.ctx.extract(model, data, desc=f"statistics task {b}")
        classes, means, covs = class_statistics(feats, labels, self.cfg.stats, self.cfg.cov_shrink)
        need = int(classes.max()) + 1
        if need > self.cls_mean.shape[0]:
            grow = need - self.cls_mean.shape[0]
            self.cls_mean = torch.cat([self.cls_mean, self.cls_mean.new_zeros((grow,) + self.cls_mean.shape[1:])])
            self.cls_cov = torch.cat([self.cls_cov, self.cls_cov.new_zeros((grow,) + self.cls_cov.shape[1:])])
        self.cls_mean[classes] = means.cpu()
        self.cls_cov[classes] = covs.cpu()
        self._proto_feats = (feats, labels) if b == 0 else None  # adapter 0 = the prototype adapter

    @torch.no_grad()
    def official_statistics_features(self, model: CLModel, data: Any, b: int) -> tuple[Tensor, Tensor]:
        """The code's ``_compute_mean``: per class, batches of 3 × batch_size, each forward merging the *current*
        set 12 times in place; the merged state becomes the next task's start, the snapshot stays as trained."""
        params, targets = self.set_params(model, b), self.merge_target(model, b)
        labels_all = labels_of(data)
        was = model.training
        model.eval()
        feats, labels = [], []
        with model.routing(Route.select(adapter_name(b))):
            for c in labels_all.unique(sorted=True).tolist():
                idx = (labels_all == c).nonzero(as_tuple=True)[0].tolist()
                for x, y in self.ctx.loader(Subset(data, idx), 3 * self.cfg.batch_size):
                    with self.ctx.autocast(), merging_forward(model.backbone.blocks, params, targets,
                                                              self.cfg.adapter_momentum):
                        feats.append(model.features(self.ctx.to_device(x)).float().cpu())
                    labels.append(y)
        model.train(was)
        self.carry = flat_params(params).cpu()
        for p, v in zip(params, split_like(self.snapshots[b], params), strict=True):
            p.data = v.clone()
        return torch.cat(feats), torch.cat(labels)

    def after_task(self, model: CLModel, task: Task) -> None:
        """Prototype rows of the new classes: class means of adapter-0 features (eval transform), into the index."""
        assert self.proto is not None
        if self._proto_feats is not None:
            feats, labels = self._proto_feats
        else:
            data = task.train.view("eval")
            with model.routing(Route.select(adapter_name(0))):
                if self.official and self.cfg.official_proto_train_mode and task.task_id > 0:
                    feats, labels = self.train_mode_features(model, data)
                else:
                    feats, labels = self.ctx.extract(model, data, desc=f"prototypes task {task.task_id}")
        classes = labels.unique(sorted=True)
        self.proto.add(classes, torch.stack([feats[labels == c].float().mean(0) for c in classes]))
        self._proto_feats = None
        self.log_drift(model, "before_eval")

    @torch.no_grad()
    def train_mode_features(self, model: CLModel, data: Any) -> tuple[Tensor, Tensor]:
        """Features with the model in train mode (adapter dropout on; the frozen backbone stays in eval mode), in
        batches of ``batch_size``: the code's ``replace_fc`` after ``classifer_align`` (``model.train()``)."""
        was = model.training
        model.train()
        feats, labels = [], []
        for x, y in self.ctx.loader(data, self.cfg.batch_size):
            with self.ctx.autocast():
                feats.append(model.features(self.ctx.to_device(x)).float().cpu())
            labels.append(y)
        model.train(was)
        return torch.cat(feats), torch.cat(labels)

    def eval_batching(self, dataset: Dataset) -> tuple[int | None, Sequence[int] | None]:
        """Official mode: the code's test loader, batches of ``batch_size`` over the images sorted by class (stable:
        each class in dataset order), since every test batch merges the stored snapshots (mos.md §5.2)."""
        if not self.official:
            return None, None
        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        labels = torch.cat([labels_of(d).reshape(-1) for d in parts])
        return self.cfg.batch_size, torch.sort(labels, stable=True).indices.tolist()

    def after_eval(self, model: CLModel, task: Task) -> None:
        self.log_drift(model, "after_eval")  # official mode mutates stored snapshots during evaluation

    # --- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: CLModel, x: Tensor) -> Prediction:
        assert self.proto is not None and self.ctx.task is not None
        num_seen, num_tasks = self.ctx.num_seen, self.ctx.task.task_id + 1
        names = tuple(adapter_name(t) for t in range(num_tasks))
        task_of = self.task_of.to(x.device)
        with model.routing(Route.select(names[0])):  # adapter 0 is frozen after task 1: one pass per test image
            f0 = self.ctx.cache.rows("mos_adapter0_features", lambda: model.features(x).float(),
                                     lambda: self.adapter0_fingerprint(model))
        z_proto = self.proto.scores(f0, num_seen)  # exact cosine logits of every seen class
        g0 = task_of[self.proto.nearest(f0, z_proto)]  # top-1 prototype (through the index for hnsw / ivf)
        batch = x.shape[0]
        cache = f0.new_zeros(num_tasks, batch, f0.shape[1])
        have = torch.zeros(num_tasks, batch, dtype=torch.bool, device=x.device)
        cache[0], have[0] = f0, True
        if self.official or not self.cfg.lazy_features:
            for t in range(1, num_tasks):  # the code's order: every adapter on every batch
                cache[t] = self.adapter_features(model, x, t)
            have[:] = True

        def features_for(rows: Tensor, tasks: Tensor) -> Tensor:
            need = ~have[tasks, rows]
            if need.any():
                r, t = rows[need], tasks[need]
                with model.routing(Route.per_sample(names, t)):
                    cache[t, r] = model.features(x[r]).float()
                have[t, r] = True
            return cache[tasks, rows]

        def head(f: Tensor) -> Tensor:
            return model.heads["main"](f)[:, :num_seen].float()

        z, g, _ = self_refine(g0, features_for, head, task_of, self.cfg.max_iter)
        scores = ensemble_scores(z, z_proto, num_tasks) if self.cfg.ensemble else z
        return Prediction(scores, task_pred=g, extras={"task_pred_initial": g0, "proto_pred": z_proto.argmax(1),
                                                       "head_pred": z.argmax(1)})

    def adapter0_fingerprint(self, model: CLModel) -> Fingerprint:
        """What adapter-0 features depend on (backbone, adapter ``t000``, normalisation): guards their cache."""
        name = adapter_name(0)
        named = [*model.backbone.named_parameters(), *model.backbone.named_buffers(), ("mean", model.mean),
                 ("std", model.std)]
        named += [(f"{key}.{k}", p) for key, site in model.sites.items() if name in site.adapters
                  for k, p in site.adapters[name].named_parameters()]
        return fingerprint(named, (name, tuple(sorted(k for k, s in model.sites.items() if name in s.merged))))

    def adapter_features(self, model: CLModel, x: Tensor, task_id: int) -> Tensor:
        """Features under stored adapter ``task_id``; official mode merges that snapshot 12 times in place."""
        with model.routing(Route.select(adapter_name(task_id))):
            if self.official and task_id > 0:
                params = self.set_params(model, task_id)
                with merging_forward(model.backbone.blocks, params, self.merge_target(model, task_id),
                                     self.cfg.adapter_momentum):
                    return model.features(x).float()
            return model.features(x).float()

    def log_drift(self, model: CLModel, when: str) -> None:
        """‖θ_t − θ_0^snap‖ for every stored adapter (mos.md §5 logging)."""
        if not self.snapshots:
            return
        ref = self.snapshots[0]
        norms = [float((flat_params(self.set_params(model, t)).cpu() - ref).norm()) for t in range(len(self.snapshots))]
        self.ctx.log.write("mos_adapter_drift", task=self.ctx.task.task_id if self.ctx.task else None, when=when,
                           **{"adapter/drift_from_t000": norms})

    # --- accounting and checkpoints -----------------------------------------------------------------------------
    def expansion_info(self, model: CLModel) -> dict[str, Any]:
        """One adapter set per task in every block: ρ = 1 by construction (reference = deployed)."""
        names = model.adapter_names()
        per_set = sum(p.numel() for p in model.adapter_parameters(names[0])) if names else 0
        return {"expandable_blocks": list(range(len(model.backbone.blocks))),
                "deployed_params": model.deployed_params(), "reference_params": per_set * len(names)}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        assert self.proto is not None
        tensors = {"cls_mean": self.cls_mean, "cls_cov": self.cls_cov,
                   **{f"proto.{k}": v for k, v in self.proto.state_dict().items()}}
        if self.snapshots:
            tensors["snapshots"] = torch.stack(self.snapshots)
        if self.carry is not None:
            tensors["carry"] = self.carry
        return {"snapshots": len(self.snapshots), "merge_mode": self.cfg.merge_mode}, tensors

    def load_state(self, model: CLModel, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.cls_mean = tensors["cls_mean"].float()
        self.cls_cov = tensors["cls_cov"].float()
        self.snapshots = list(tensors["snapshots"].float()) if "snapshots" in tensors else []
        self.carry = tensors["carry"].float() if "carry" in tensors else None
        self._targets = {}
        self.proto = PrototypeIndex(self.cfg.index_backend, model.spec.num_features)
        self.proto.load_state_dict({k[len("proto."):]: v for k, v in tensors.items() if k.startswith("proto.")})
