"""The strategy protocol and its base class.

A strategy says *what* to train (``phases``, a generator, so it can decide the next phase after the previous one
ran), *which loss* (``loss``), what happens after a task (``after_task``), and *how to predict* (``predict``). The
loop (``cl.loop``) owns the device, autocast, data loaders, optimisers (rebuilt for every phase), evaluation,
logging and checkpoints. Strategies never build their own loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cl.config import StrategyConfig
from cl.errors import ConfigError
from cl.registries import STRATEGIES
from cl.types import Batch, Phase, Prediction, StepOutput, Stream, Task

if TYPE_CHECKING:
    from cl.context import RunContext
    from cl.model import CLModel

__all__ = ["Strategy", "register_strategy", "masked_cross_entropy", "check_loss_classes"]


def register_strategy(name: str):
    """Class decorator registering a :class:`Strategy` subclass in ``STRATEGIES``."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        STRATEGIES.add(name, cls)
        cls.name = name
        return cls

    return deco


def masked_cross_entropy(logits: Tensor, y: Tensor, num_seen: int, old: int = 0) -> Tensor:
    """CE over the first ``num_seen`` logits with the ``old`` oldest classes set to -inf (PILOT/SEMA/MOS masking)."""
    logits = logits[:, :num_seen].float()
    if old:
        logits = logits.clone()
        logits[:, :old] = float("-inf")
    return F.cross_entropy(logits, y)


class Strategy:
    """Base class: sensible defaults so a simple method only overrides ``setup`` and ``phases``.

    Attributes set by the loop: ``ctx`` (the :class:`~cl.context.RunContext`), ``stream``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: config overrides that make this strategy fast under ``configs/smoke.yaml``
    smoke: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: StrategyConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.stream: Stream | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def setup(self, model: CLModel, stream: Stream) -> None:
        """Called once before the first task (attach the first adapters, create heads)."""
        self.stream = stream

    def before_task(self, model: CLModel, task: Task) -> None:
        """Called before ``phases`` for every task (grow heads, add task adapters)."""

    def phases(self, model: CLModel, task: Task) -> Iterator[Phase]:
        """Yield the phases to train, in order; code after a ``yield`` runs once that phase finished."""
        return iter(())

    def loss(self, model: CLModel, batch: Batch, phase: Phase) -> StepOutput:
        """Default: CE over the seen classes with old classes masked (the PILOT-family convention)."""
        task = self.ctx.task
        assert task is not None  # the loop sets ctx.task before training
        logits = model(batch.x)
        return StepOutput(masked_cross_entropy(logits, batch.y, task.labels[-1] + 1, task.label_offset))

    def loss_classes(self, stream: Stream, task: Task) -> int | None:
        """How many classes the training loss of ``task`` tells apart (``None``: no classification loss to check).

        Default: the task's own classes, since old classes are masked (the PILOT-family convention of :meth:`loss`).
        A strategy whose cross-entropy covers every seen class returns ``stream.seen_labels(task.task_id)``. A value of
        1 means an identically zero loss: :func:`check_loss_classes` refuses such a stream before anything trains.
        """
        return task.num_classes

    def after_task(self, model: CLModel, task: Task) -> None:
        """Freeze, merge, compute statistics, update indexes."""

    def after_eval(self, model: CLModel, task: Task) -> None:
        """Called after the evaluation that follows ``task`` (diagnostics that need the evaluated model)."""

    def eval_batching(self, dataset: Dataset) -> tuple[int | None, Sequence[int] | None]:
        """Batch size and sample order of an evaluation pass over ``dataset`` (the evaluated test sets, concatenated).

        ``(None, None)`` (default): ``train.eval_batch_size``, dataset order. For strategies whose predictions depend
        on the batching (MOS ``merge_mode: official`` mutates stored adapters once per test batch).
        """
        return None, None

    def frozen_prefix(self, model: CLModel) -> int:
        """Blocks ``0..k-1`` of the prediction path that will not change again in this run (0 = none).

        With ``train.cache: auto`` the loop computes the test-set tokens entering block ``k`` once and passes them
        to :meth:`predict` at every later evaluation (``len(blocks)``: the features; ``predict`` must then read its
        input only through ``model.features``). Verified by a fingerprint, so an optimistic answer costs a
        recomputation, never a wrong result.
        """
        return 0

    def predict(self, model: CLModel, x: Tensor) -> Tensor | Prediction:
        """Logits over all classes seen so far (class-incremental: no task id)."""
        return model(x)[:, : self.ctx.num_seen]

    # --- accounting ---------------------------------------------------------------------------------------------
    def expansion_info(self, model: CLModel) -> dict[str, Any]:
        """Growth bookkeeping for ``result.json`` (metrics.md section 9).

        Returns ``expandable_blocks`` (the site set S as block indices), ``deployed_params`` P(t) and
        ``reference_params`` P_ref(t) (``None`` where one-module-per-task growth is not meaningful).
        """
        per_block = model.adapters_per_block()
        return {
            "expandable_blocks": [b for b, k in enumerate(per_block) if k],
            "deployed_params": model.deployed_params(),
            "reference_params": None,
        }

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON-able state and extra tensors to checkpoint (modules in ``model.extras`` are saved by the loop)."""
        return {}, {}

    def rebuild(self, model: CLModel, meta: dict[str, Any]) -> None:
        """Recreate ``model.extras`` modules before tensors are loaded on resume."""

    def load_state(self, model: CLModel, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`state` returned."""


def check_loss_classes(strategy: Strategy, stream: Stream, tasks: list[Task] | None = None) -> None:
    """Refuse tasks whose training loss would separate a single class (old classes masked, one new class: the
    cross-entropy is identically zero and nothing would be learnt). Called when a session is built.

    Raises:
        ConfigError: one line naming those tasks and their classes.
    """
    bad = [t for t in (stream.tasks if tasks is None else tasks) if strategy.loss_classes(stream, t) == 1]
    if not bad:
        return
    names = stream.class_names
    what = "; ".join(f"task {t.task_id} (class {t.class_ids[0]}{f' {names[t.class_ids[0]]}' if names else ''})"
                     for t in bad)
    raise ConfigError(f"stream: {what} would train strategy {strategy.name or type(strategy).__name__} on a single "
                      f"class, whose masked cross-entropy is identically zero; choose stream.init_classes / "
                      f"stream.increment so that every task has at least 2 classes")


def tensor_features(model: CLModel, x: Tensor) -> Tensor:
    """Helper: backbone features without gradient."""
    with torch.no_grad():
        return model.features(x)
