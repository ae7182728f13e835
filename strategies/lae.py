"""``lae``: Learning–Accumulation–Ensemble with a general parameter-efficient tuning module (Adapter, LoRA, Prefix).

Q. Gao, C. Zhao, Y. Sun, T. Xi, G. Zhang, B. Ghanem, J. Zhang, "A Unified Continual Learning Framework with General
Parameter-Efficient Tuning", ICCV 2023, arXiv 2303.10070; official code ``gqk/LAE`` (``main.py``; lae.md).

Mechanisms:

- **Learning.** One *online* PET set (``t000``) on ``adapt_blocks`` (default 0–4) of the frozen ViT, of one type:
  ``adapter`` (``attn_adapter``: a bottleneck parallel to the attention branch), ``lora`` (``kv_lora``: low-rank
  updates of the K and V rows of ``qkv``) or ``prefix`` (``prefix``: key/value tokens with the adaptation-speed
  calibration), each with learnable output scalers. Per-task linear heads (``cl.heads.TaskHeads``, weights
  N(0, 0.001²)); CE on the current task's logit slice only. A fresh Adam per task (default betas, weight decay 0,
  constant lr) over all heads and the online PETs; in every task after the first the PETs stay frozen for the first
  ``num_freeze_epochs`` epochs (one optimiser for the whole task: ``Phase.freeze``).
- **Accumulation.** The *offline* PET set (``t001``) is created at the start of task 1 as a copy of the online set,
  then updated after every optimiser step of tasks ≥ 1 (also while the online PETs are frozen) by
  ``θ_off ← d · θ_off + (1 − d) · θ_on`` over all PET parameters, scalers included (one fused ``foreach`` call).
- **Ensemble.** Inference runs the backbone and heads with each set; the prediction is the argmax of the
  element-wise maximum of the two softmax vectors (``ensemble: max_softmax``; ``online`` / ``offline`` for
  ablations). After task 0 there is no offline set and the online expert alone predicts. The online-only,
  offline-only and ensemble predictions are returned as ``online_pred``, ``offline_pred`` and ``ensemble_pred``
  (``result.json`` → ``extra_accuracy_matrices``); after task 0 the offline row repeats the online one.

Deviations (lae.md §9, §10): the class order, backbone and data transform come from the experiment config (the
paper configs set the official ones); blocks before the first adapted block run once per test batch and are shared
by both experts (identical results, less frozen work); the offline set's creation is logged as the event
``lae_offline_set``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.adapters import AttnAdapterConfig, KvLoraConfig, PrefixConfig, adapter_name
from cl.adapters.base import AdapterConfig
from cl.adapters.inject import block_of
from cl.config import StrategyConfig
from cl.context import derive_seed
from cl.heads import TaskHeads
from cl.mixture import Route
from cl.model import CLModel
from cl.strategy import Strategy, register_strategy
from cl.types import Batch, Phase, Prediction, StepOutput, Stream, Task
from strategies._lae_parts import ema_update_, max_softmax, pet_pairs

__all__ = ["LaeConfig", "LaeStrategy", "ONLINE", "OFFLINE", "PET_TYPES"]

#: adapter names of the two PET sets (the offline one is created at task 1)
ONLINE, OFFLINE = adapter_name(0), adapter_name(1)
#: ``strategy.pet`` -> registered adapter type
PET_TYPES = {"adapter": "attn_adapter", "lora": "kv_lora", "prefix": "prefix"}


@dataclass(frozen=True)
class LaeConfig(StrategyConfig):
    """``strategy.name: lae`` (defaults: the official CIFAR-100 config; lae.md §7).

    Attributes:
        pet: PET type (``adapter`` = Adapter5, ``lora`` = LoRA5, ``prefix`` = Prefix10).
        adapt_blocks: blocks holding the PETs.
        down_sample / rank / length: Adapter bottleneck, LoRA rank, Prefix length.
        prefix_compensation: Prefix's adaptation-speed calibration (``compensatory``).
        learnable_scale: learnable output scalers on every PET (init 1.0); off = fixed 1.0.
        epochs / num_freeze_epochs: epochs per task; PET-frozen epochs at the start of tasks ≥ 1.
        lr / batch_size / drop_last: Adam learning rate (constant; the configs use base lr × batch / 256),
            minibatch size, drop the last incomplete batch.
        ema_decay: d of the offline EMA.
        ensemble: ``max_softmax`` (LAE), ``online`` or ``offline`` (ablations).
        head_init_std: standard deviation of the task heads' initial weights.
    """

    name: str = "lae"
    pet: Literal["adapter", "lora", "prefix"] = "adapter"
    adapt_blocks: tuple[int, ...] = (0, 1, 2, 3, 4)
    down_sample: int = 5
    rank: int = 5
    length: int = 10
    prefix_compensation: bool = True
    learnable_scale: bool = True
    epochs: int = 5
    num_freeze_epochs: int = 3
    lr: float = 0.0028125
    batch_size: int = 24
    drop_last: bool = True
    ema_decay: float = 0.9999
    ensemble: Literal["max_softmax", "online", "offline"] = "max_softmax"
    head_init_std: float = 0.001

    def __post_init__(self) -> None:
        if self.pet not in PET_TYPES:
            raise ValueError(f"strategy.pet={self.pet!r}; valid choices: {', '.join(PET_TYPES)}")
        if self.ensemble not in ("max_softmax", "online", "offline"):
            raise ValueError(f"strategy.ensemble={self.ensemble!r}; valid choices: max_softmax, online, offline")
        for key in ("epochs", "batch_size", "down_sample", "rank", "length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"strategy.{key} must be positive, got {getattr(self, key)}")
        if self.num_freeze_epochs < 0:
            raise ValueError(f"strategy.num_freeze_epochs must be >= 0, got {self.num_freeze_epochs}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"strategy.ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.lr <= 0 or self.head_init_std <= 0:
            raise ValueError("strategy.lr and strategy.head_init_std must be positive")
        if not self.adapt_blocks:
            raise ValueError("strategy.adapt_blocks must name at least one block")


@register_strategy("lae")
class LaeStrategy(Strategy):
    """LAE (Gao et al., ICCV 2023, arXiv 2303.10070). Deviations: module docstring; switches: lae.md §9."""

    config_cls = LaeConfig
    cfg: LaeConfig
    smoke = {"epochs": 2, "num_freeze_epochs": 1, "lr": 0.01, "batch_size": 8, "ema_decay": 0.9}

    # --- PETs ---------------------------------------------------------------------------------------------------
    def pet_config(self) -> AdapterConfig:
        cfg, blocks = self.cfg, self.cfg.adapt_blocks
        if cfg.pet == "adapter":
            return AttnAdapterConfig(blocks=blocks, down_sample=cfg.down_sample, learnable_scale=cfg.learnable_scale)
        if cfg.pet == "lora":
            return KvLoraConfig(blocks=blocks, rank=cfg.rank, learnable_scale=cfg.learnable_scale)
        return PrefixConfig(blocks=blocks, length=cfg.length, compensation=cfg.prefix_compensation,
                            learnable_scale=cfg.learnable_scale)

    @staticmethod
    def has_offline(model: CLModel) -> bool:
        return OFFLINE in model.adapter_names()

    def create_offline(self, model: CLModel) -> None:
        """Attach the offline set as an exact copy of the online one (lae.md §5: at the start of task 1)."""
        keys = model.attach(PET_TYPES[self.cfg.pet], self.pet_config(), OFFLINE)
        online, offline = pet_pairs(model, ONLINE, OFFLINE)
        with torch.no_grad():
            torch._foreach_copy_(offline, online)
        self.ctx.event("lae_offline_set", sites=len(keys), params=sum(p.numel() for p in offline))

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def setup(self, model: CLModel, stream: Stream) -> None:
        super().setup(model, stream)
        model.attach(PET_TYPES[self.cfg.pet], self.pet_config(), ONLINE)
        model.set_route(Route.select(ONLINE))
        model.heads["main"] = TaskHeads(model.spec.num_features, init_std=self.cfg.head_init_std).to(self.ctx.device)

    def before_task(self, model: CLModel, task: Task) -> None:
        gen = torch.Generator(device=self.ctx.device).manual_seed(derive_seed(self.ctx.seed, "lae_head", task.task_id))
        model.head("main", TaskHeads).add_task(task.num_classes, generator=gen)
        if task.task_id >= 1 and not self.has_offline(model):
            self.create_offline(model)

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        cfg = self.cfg
        online = model.adapter_parameters(ONLINE)
        params = list(model.heads["main"].parameters()) + online
        after_step = None
        freeze: list[Any] = []
        if task.task_id >= 1:
            on, off = pet_pairs(model, ONLINE, OFFLINE)

            def after_step() -> None:
                ema_update_(off, on, cfg.ema_decay)

            freeze = online if cfg.num_freeze_epochs > 0 else []
        yield Phase("lae", params, cfg.epochs, lr=cfg.lr, optimizer="adam", weight_decay=0.0,
                    batch_size=cfg.batch_size, scheduler="constant", after_step=after_step, drop_last=cfg.drop_last,
                    freeze=freeze, freeze_epochs=min(cfg.num_freeze_epochs, cfg.epochs) if freeze else 0,
                    info={"pet": cfg.pet})

    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        """CE on the current task's logits only, targets shifted by the number of old classes."""
        heads = model.head("main", TaskHeads)
        cols = heads.task_slice(batch.task_id)
        logits = heads(model.features(batch.x))[:, cols]
        return StepOutput(F.cross_entropy(logits.float(), batch.y - cols.start))

    # --- inference ----------------------------------------------------------------------------------------------
    def expert_logits(self, model: CLModel, x: Tensor, names: list[str]) -> list[Tensor]:
        """Logits over the seen classes under each PET set in ``names``; the blocks before the first adapted block
        run once and are shared."""
        first = min(block_of(site.target) for site in model.sites.values())
        tokens = model.run_blocks(model.embed(x), 0, first)
        heads = model.heads["main"]
        out = []
        for name in names:
            with model.routing(Route.select(name)):
                out.append(heads(model.pool(model.run_blocks(tokens, first)))[:, : self.ctx.num_seen])
        return out

    @torch.no_grad()
    def predict(self, model: CLModel, x: Tensor) -> Prediction:
        """Scores ``(B, seen)``: max of the two softmaxes (``max_softmax``), or one expert's softmax."""
        if self.has_offline(model):
            z_on, z_off = self.expert_logits(model, x, [ONLINE, OFFLINE])
        else:
            (z_on,) = self.expert_logits(model, x, [ONLINE])
            z_off = z_on
        p_on, p_off, p_ens = max_softmax(z_on), max_softmax(z_off), max_softmax(z_on, z_off)
        scores = {"max_softmax": p_ens, "online": p_on, "offline": p_off}[self.cfg.ensemble]
        return Prediction(scores, extras={"online_pred": p_on.argmax(1), "offline_pred": p_off.argmax(1),
                                          "ensemble_pred": p_ens.argmax(1)})
