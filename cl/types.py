"""Plain data types shared by the loop, strategies, streams and evaluation."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Task", "Stream", "Batch", "StepOutput", "Prediction", "Phase", "ViewableDataset"]


class ViewableDataset(Dataset, abc.ABC):
    """A dataset yielding ``(image_tensor, label)`` that can be re-viewed with the train or the eval transform.

    ``view("train")`` applies the training augmentation, ``view("eval")`` the deterministic test transform. Labels are
    *incremental* class indices (position of the class in the stream's class order), so task t's classes are the
    contiguous range ``[offset_t, offset_t + n_t)``.
    """

    labels: Tensor

    if TYPE_CHECKING:  # every subclass defines it (torch's Dataset does not declare it)

        def __len__(self) -> int: ...

    @abc.abstractmethod
    def view(self, kind: Literal["train", "eval"]) -> ViewableDataset:
        """The same samples with the training or the evaluation transform."""

    @property
    def deterministic(self) -> bool:
        """Whether item ``i`` is the same tensor every time it is read (no random augmentation in this view).

        Frozen-computation caches may only reuse outputs computed from a deterministic view. Subclasses that know
        better override it; the default is the safe answer.
        """
        return False


@dataclass
class Task:
    """One experience of a class-incremental stream.

    Attributes:
        task_id: 0-based position in the stream.
        class_ids: original dataset class ids introduced by this task, in stream order.
        labels: the incremental labels of those classes (contiguous range).
        train: training set (training transform).
        test: test set (eval transform).
    """

    task_id: int
    class_ids: list[int]
    labels: list[int]
    train: ViewableDataset
    test: ViewableDataset

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_offset(self) -> int:
        return self.labels[0]


@dataclass
class Stream:
    """A class-incremental stream: an ordered list of tasks over ``num_classes`` classes."""

    name: str
    tasks: list[Task]
    num_classes: int
    class_order: list[int]
    class_names: list[str] | None = None
    image_size: int = 224
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def seen_labels(self, task_id: int) -> int:
        """Number of classes seen after training on ``task_id``."""
        return sum(t.num_classes for t in self.tasks[: task_id + 1])


@dataclass
class Batch:
    """A training or evaluation minibatch already on the run's device."""

    x: Tensor
    y: Tensor
    task_id: int


@dataclass
class StepOutput:
    """What ``Strategy.loss`` returns: the loss to minimise plus scalars to log (``{"ce": 0.7}``)."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    """Evaluation output: logits over all seen classes, optionally the inferred task per sample.

    ``task_pred`` (and ``task_pred_initial``) feed task-retrieval accuracy (metrics.md section 8).
    """

    logits: Tensor
    task_pred: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Phase:
    """One training phase a strategy asks the loop to run.

    Attributes:
        name: log name (``"adapters"``, ``"rd"``, ``"head"``...).
        params: parameters to optimise, or parameter groups (dicts with ``params`` and optional ``lr`` or
            ``weight_decay``).
        epochs: number of passes over ``data``.
        data: ``None`` = the task's training set; otherwise any dataset yielding ``(x, y)``.
        lr, optimizer, weight_decay, momentum, batch_size, scheduler: ``None`` falls back to ``train`` config values.
        after_step: called after every optimiser step (e.g. MOS adapter merging, LAE's EMA).
        num_workers: DataLoader workers for this phase (``None`` = ``train.num_workers``; use 0 for in-memory
            feature datasets).
        drop_last: drop the last incomplete training batch (LAE's data loader).
        freeze / freeze_epochs: a subset of ``params`` kept frozen for the first ``freeze_epochs`` epochs of the
            phase (``requires_grad`` off: no gradient, so the optimiser applies no update, weight decay or momentum
            to them), then trained. One optimiser serves the whole phase, so the state of the other parameters
            continues across the boundary (LAE's PET freeze, gqk/LAE ``main.py::pre_train_epoch``).
        info: free-form fields copied into the phase's log records.
        eval_every_epoch: after every epoch, evaluate on the test sets of the tasks seen so far and log the row to
            ``metrics.jsonl`` (``epoch_eval``); a diagnostic that never enters the accuracy matrix.
        trainable_from: the first block whose computation can change (or be observed by a hook) during the phase:
            ``len(blocks)`` when no block can (a head-only phase), 0 when block 0 trains, ``None`` = undeclared.
            With ``train.cache: auto`` the loop then computes the tokens entering that block once per task and
            feeds them to the phase instead of images (``cl.cache``; checked, so a wrong value raises).
    """

    name: str
    params: Sequence[Any]
    epochs: int
    data: Dataset | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    batch_size: int | None = None
    scheduler: Literal["cosine", "constant"] | None = None
    after_step: Callable[[], None] | None = None
    num_workers: int | None = None
    drop_last: bool = False
    freeze: Sequence[Any] = ()
    freeze_epochs: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    eval_every_epoch: bool = False
    trainable_from: int | None = None


def labels_of(ds: Dataset) -> Tensor:
    """Labels of a dataset (uses ``ds.labels`` when present, else iterates)."""
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels)
    # torch's Dataset declares no __len__ (map-style datasets define it): the stub is narrower than the protocol
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]
