""":class:`ClsimStrategy`: a clsim strategy driven as an Avalanche ``SupervisedTemplate`` (see
:mod:`cl.integrations.avalanche`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():  # avalanche warns at import that the optional QP solver (GEM) is missing
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream
    from avalanche.training.plugins.evaluation import default_evaluator
    from avalanche.training.templates import SupervisedTemplate

from cl.backbone import DataSpec, adopt_backbone
from cl.config import ExperimentConfig, config_to_dict, load_config
from cl.context import derive_seed, resolve_device, rng_scope
from cl.integrations.avalanche.data import (
    AvalancheView,
    _classes,
    _EvalPrep,
    _is_clsim_view,
    _stream_from,
    avalanche_to_stream,
)
from cl.integrations.avalanche.session import _BridgeSession, _hook_free, _SessionBox
from cl.loop import Session
from cl.plugins import load_builtin
from cl.strategy import check_loss_classes
from cl.transforms import Preprocessing
from cl.types import Prediction, Stream, Task

if TYPE_CHECKING:
    from cl.model import CLModel

__all__ = ["ClsimStrategy", "IgnoredPluginWarning", "RandomBackboneWarning"]


class IgnoredPluginWarning(UserWarning):
    """A plugin passed to :class:`ClsimStrategy` acts through callbacks or objects clsim's training does not use."""


class RandomBackboneWarning(UserWarning):
    """:class:`ClsimStrategy` built a backbone without pretrained weights (no ``model=``, no weights in the config)."""


#: training callbacks that never fire in the bridge (clsim trains each experience in its own loop)
_NEVER_FIRED = ("before_training_iteration", "after_training_iteration", "before_forward", "after_forward",
                "before_backward", "after_backward", "before_update", "after_update")
#: callbacks that fire, but whose usual effect (a new dataset, dataloader, optimizer or scheduler) clsim ignores
_INEFFECTIVE = ("before_training_exp", "before_train_dataset_adaptation", "after_train_dataset_adaptation")


def _warn_unhonoured(plugins: Any) -> None:
    """One :class:`IgnoredPluginWarning` per plugin the bridge cannot honour (see :class:`ClsimStrategy`)."""
    from avalanche.core import BaseSGDPlugin
    from avalanche.training.plugins import EvaluationPlugin

    for plugin in plugins or []:
        if isinstance(plugin, EvaluationPlugin):
            continue
        never = [n for n in _NEVER_FIRED if getattr(type(plugin), n, None) not in (None, getattr(BaseSGDPlugin, n))]
        moot = [n for n in _INEFFECTIVE if getattr(type(plugin), n, None) not in (None, getattr(BaseSGDPlugin, n))]
        if never or moot:
            why = []
            if never:
                why.append(f"its {', '.join(never)} callbacks never fire (clsim trains each experience in its own "
                           "loop)")
            if moot:
                why.append(f"its {', '.join(moot)} callbacks act on Avalanche's training dataset, dataloader or "
                           f"optimizer, which clsim does not use")
            warnings.warn(f"ClsimStrategy ignores plugin {type(plugin).__name__}: {'; '.join(why)}",
                          IgnoredPluginWarning, stacklevel=4)


def _resolve_config(config: Any, overrides: Sequence[str] | None, **train: Any) -> ExperimentConfig:
    load_builtin()
    from cl.registries import STRATEGIES

    if isinstance(config, ExperimentConfig):
        cfg = load_config(config_to_dict(config), list(overrides)) if overrides else config
    elif isinstance(config, str) and config in STRATEGIES:
        cfg = load_config({"strategy": {"name": config}}, list(overrides or []))
    else:
        cfg = load_config(config, list(overrides or []))
    changes = {k: v for k, v in train.items() if v is not None}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes)) if changes else cfg


class ClsimStrategy(SupervisedTemplate):
    """A clsim strategy as an Avalanche strategy (same code, same seeding, same results as ``clsim run``).

    Args:
        config: an :class:`~cl.config.ExperimentConfig`, a YAML path, a config dict, or a registered strategy name.
        model / backbone (aliases; give at most one): the frozen backbone, a timm ``VisionTransformer`` such as
            ``timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", pretrained=True)``. Used instead of
            the config's ``backbone`` (whose ``normalize`` / ``mean`` / ``std`` still apply); its classifier is
            removed and it is frozen and set to eval mode in place; checkpoints then carry it. Without it, the
            backbone comes from the config, and a :class:`RandomBackboneWarning` is issued when the config gives it
            no weights (``backbone.pretrained: false`` and no ``backbone.weights``, e.g. a bare strategy name).
        overrides: ``["strategy.k=v", ...]`` applied to ``config``.
        benchmark: the benchmark that will be trained; gives the strategy the whole class timeline at setup
            (strategies such as MOS read ``stream.num_classes`` and all tasks in ``setup``). Without it, the timeline
            is taken from the first training experience's ``origin_stream`` (the untrained session is then rebuilt,
            identically seeded, so ``strategy.model`` changes object once); experiences of lazy (generator) streams
            grow the clsim stream one task at a time.
        num_classes: output width of :meth:`forward` (default: the benchmark's, else the largest class id seen + 1).
        train_mb_size / train_epochs / eval_mb_size / device: override ``train.batch_size`` / ``train.epochs`` /
            ``train.eval_batch_size`` / ``train.device`` of the config (``None``: keep the config's).
        plugins, evaluator, eval_every, **kwargs: as for ``SupervisedTemplate``. A plugin that acts through callbacks
            the bridge never fires or through objects clsim's training does not use gets one
            :class:`IgnoredPluginWarning` naming it (see below).

    Training: ``_train_exp`` hands the experience to ``Session.train_task`` (a multi-phase routine such as SEMA's or
    MOS's runs there whole, with clsim's optimisers, schedulers and seeded loaders). Avalanche fires
    ``before/after_training``, ``before/after_training_exp``, dataset-adaptation callbacks and
    ``before/after_training_epoch`` (once per experience); the iteration-level callbacks (``before/after_training_
    iteration``, ``*_forward``, ``*_backward``, ``*_update``) do **not** fire, so minibatch/epoch training metrics stay
    empty and plugins that change the loss, the dataloader or the dataset (replay, LwF, EWC) have no effect.
    Honoured: the evaluator and its metrics and loggers (except minibatch/epoch training metrics), and plugins that
    only act in evaluation callbacks, ``before/after_training``, ``after_training_exp`` or ``after_training_epoch``.
    Every other plugin — one defining a never-fired callback, or ``before_training_exp`` /
    ``*_train_dataset_adaptation`` (where replay, schedulers, early stopping and from-scratch training install their
    dataloader, dataset or optimizer) — is warned about once, by name, at construction. Model
    adaptation and ``make_optimizer`` are no-ops (expansion happens in the clsim strategy, in training only).
    Evaluation is Avalanche's: :meth:`forward` returns ``strategy.predict`` logits placed at the Avalanche class ids
    of the seen classes, ``-inf`` elsewhere.
    """

    adapted_dataset: Any  # Avalanche's (set by the dataset-adaptation hooks)

    def __init__(self, *, config: Any, overrides: Sequence[str] | None = None, benchmark: Any = None,
                 model: nn.Module | None = None, backbone: nn.Module | None = None, num_classes: int | None = None,
                 train_mb_size: int | None = None, train_epochs: int | None = None, eval_mb_size: int | None = None,
                 device: str | torch.device | None = None, plugins: Any = None, evaluator: Any = default_evaluator,
                 eval_every: int = -1, **kwargs: Any) -> None:
        if model is not None and backbone is not None:
            raise ValueError("ClsimStrategy: give the backbone as model= or as backbone=, not both")
        given = model if model is not None else backbone
        cfg = _resolve_config(config, overrides, batch_size=train_mb_size, epochs=train_epochs,
                              eval_batch_size=eval_mb_size, device=None if device is None else str(device))
        if given is None and not cfg.backbone.pretrained and cfg.backbone.weights is None:
            warnings.warn(f"ClsimStrategy: backbone {cfg.backbone.name} is randomly initialised (no model= given, "
                          f"backbone.pretrained false, no backbone.weights); pass model=<a pretrained timm ViT> or a "
                          f"config with weights", RandomBackboneWarning, stacklevel=3)
        _warn_unhonoured(plugins)
        stream = avalanche_to_stream(benchmark, None) if benchmark is not None else None
        adopted = adopt_backbone(given, cfg.backbone) if given is not None else None
        session = self._create(cfg, stream, adopted)
        self._box = _SessionBox(session, cfg, adopted=adopted is not None)
        self._prebuilt = stream is not None
        self.num_classes = num_classes
        self.last_prediction: Prediction | None = None
        self.trained_params: list[int] = []
        self._placeholder = nn.Parameter(torch.zeros(1))
        super().__init__(model=session.model, optimizer=torch.optim.SGD([self._placeholder], lr=0.0),
                         train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.epochs,
                         eval_mb_size=cfg.train.eval_batch_size, device=session.ctx.device, plugins=plugins,
                         evaluator=evaluator, eval_every=eval_every, **kwargs)

    @staticmethod
    def _create(cfg: ExperimentConfig, stream: Stream | None,
                backbone: tuple[nn.Module, DataSpec] | None = None) -> Session:
        """``Session.create`` seeded like ``clsim run`` (backbone init, ``setup``); an empty stream grows later."""
        stream = stream if stream is not None else Stream("avalanche", [], 0, [])
        with rng_scope(cfg.seed, resolve_device(cfg.train.device)):
            session = _BridgeSession.create(cfg, stream=stream, backbone=backbone)
        stream.image_size = size = session.model.spec.img_size
        prep = Preprocessing.from_config(cfg.stream, size)
        for t in stream.tasks:  # built by avalanche_to_stream: AvalancheView datasets
            cast(AvalancheView, t.train).prep = cast(AvalancheView, t.test).prep = prep
        return session

    @property
    def preprocessing(self) -> Preprocessing:
        """clsim's preprocessing (``stream.transform`` / ``augment`` of the config, the backbone's input size): every
        tensor entering the model through this strategy goes through it."""
        return Preprocessing.from_config(self.config.stream, self.model.spec.img_size)

    # --- state ----------------------------------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        return self._box.session

    @property
    def config(self) -> ExperimentConfig:
        return self._box.cfg

    @property
    def model(self) -> CLModel:  # not in __dict__: Avalanche checkpoints pickle the session box instead
        return self._box.session.model

    @model.setter
    def model(self, value: nn.Module) -> None:
        if value is not self._box.session.model:
            raise ValueError("ClsimStrategy.model is the clsim session's model and cannot be replaced")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("optimizer", None)  # a placeholder (clsim builds its optimisers per phase); rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.optimizer = torch.optim.SGD([self._placeholder], lr=0.0)

    def _label_map(self) -> tuple[dict[int, int], list[int]]:
        tasks = self.session.stream.tasks
        class_of = [c for t in tasks for c in t.class_ids]
        return {c: i for i, c in enumerate(class_of)}, class_of

    # --- training -------------------------------------------------------------------------------------------------
    def _task_for(self, experience: Any) -> Task:
        done = self._box.done
        try:
            origin = experience.origin_stream
        except (AttributeError, AssertionError):  # avalanche asserts when it is unset
            origin = None
        if not self._prebuilt and done == 0 and isinstance(origin, EagerCLStream):
            # first experience without benchmark=: take the class timeline from its stream and rebuild the
            # (untrained, identically seeded) session on it, so ``setup`` sees every task as with benchmark=
            box = self._box
            model = box.session.model
            given = (_hook_free(model.backbone, copy=False), model.spec) if box.adopted else None
            self._box = _SessionBox(self._create(self.config, _stream_from(list(origin), [], None), given),
                                    self.config, adopted=box.adopted)
            self._prebuilt = True
        stream = self.session.stream
        cls = _classes(experience)
        if done < len(stream.tasks):  # pre-built from the benchmark
            task = stream.tasks[done]
            if set(task.class_ids) != cls:
                raise ValueError(f"experience classes {sorted(cls)} differ from task {done}'s {task.class_ids}: "
                                 f"train the benchmark's experiences in order")
            return task
        label_of, _ = self._label_map()
        if cls & set(label_of):
            raise ValueError(f"experience classes {sorted(cls)} were seen before: class-incremental streams only")
        new = sorted(cls)
        offset = len(label_of)
        label_of.update({c: offset + i for i, c in enumerate(new)})
        prep = self.preprocessing
        task = Task(done, new, list(range(offset, offset + len(new))),  # no test data: see _BridgeSession
                    AvalancheView(experience.dataset, label_of, prep, "train", aug_seed=done),
                    AvalancheView(experience.dataset.subset([]), label_of, prep, "eval", aug_seed=done))
        check_loss_classes(self.session.strategy, stream, [task])
        stream.tasks.append(task)
        stream.class_order += new
        stream.num_classes = max(stream.num_classes, len(stream.class_order))
        return task

    def _train_exp(self, experience: Any, eval_streams: Any = None, **kwargs: Any) -> None:
        task = self._task_for(experience)
        self._before_training_epoch(**kwargs)
        cfg = self.config
        with rng_scope(derive_seed(cfg.seed, "task", task.task_id), self.session.ctx.device):
            self.trained_params.append(self.session.train_task(task))
        self._box.done += 1
        self._stop_training = False
        self._after_training_epoch(**kwargs)

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        return self.model  # expansion is the clsim strategy's (before_task, training only)

    def make_optimizer(self, **kwargs: Any) -> None:
        """No-op: the clsim loop builds an optimiser per phase from the parameters the strategy declares."""

    # --- evaluation -----------------------------------------------------------------------------------------------
    def eval_dataset_adaptation(self, **kwargs: Any) -> None:
        """Avalanche's eval dataset, each image through clsim's eval view (unless it already yields clsim views)."""
        super().eval_dataset_adaptation(**kwargs)
        if not _is_clsim_view(self.adapted_dataset):
            self.adapted_dataset = _EvalPrep(self.adapted_dataset, self.preprocessing)

    def forward(self) -> Tensor:
        x = self.mb_x
        size = self.model.spec.img_size
        if tuple(x.shape[-2:]) != (size, size):  # a batch that bypassed eval_dataset_adaptation (custom loops)
            x = self.preprocessing.eval_view(x)
        label_of, class_of = self._label_map()
        ids = list(class_of) + [int(self.mb_y.max()) if self.mb_y is not None and len(self.mb_y) else 0]
        width = max(self.num_classes or self.session.stream.num_classes, max(ids) + 1)
        self.last_prediction = None
        if self._box.done == 0:
            return torch.zeros(len(x), width, device=x.device)
        sess = self.session
        with sess.ctx.autocast():
            out = sess.strategy.predict(self.model, x)
        logits = (out.logits if isinstance(out, Prediction) else out).float()
        if isinstance(out, Prediction):
            self.last_prediction = out
        full = torch.full((len(x), width), float("-inf"), device=logits.device)
        full[:, torch.tensor(class_of[: logits.shape[1]], device=logits.device)] = logits
        return full

    def criterion(self) -> Tensor:
        out = self.mb_output
        finite = out[torch.isfinite(out)]
        low = (float(finite.min()) if finite.numel() else 0.0) - 1e3
        return F.cross_entropy(torch.nan_to_num(out, neginf=low), self.mb_y)

    def true_tasks(self, y: Tensor) -> Tensor:
        """Task index (in the clsim stream) of Avalanche labels ``y``; -1 for classes not trained yet."""
        tasks = self.session.stream.tasks[: self._box.done]
        table = {c: t.task_id for t in tasks for c in t.class_ids}
        return torch.tensor([table.get(int(v), -1) for v in y], device=y.device)
