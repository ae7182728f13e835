"""Avalanche (avalanche-lib 0.6) bridge: clsim strategies as Avalanche strategies, stream converters, metrics.

The only module of clsim that imports Avalanche; import it explicitly (``import cl`` never does).

- :class:`ClsimStrategy` is a ``SupervisedTemplate`` that drives the *same* clsim strategy code through a
  :class:`cl.loop.Session`: each training experience becomes a clsim :class:`~cl.types.Task` and runs the strategy's
  whole routine (``before_task`` -> every phase -> ``after_task``), seeded exactly like ``clsim run``. Avalanche keeps
  the stream, evaluation, plugins, loggers and checkpoints.
- :func:`avalanche_to_stream` / :func:`stream_to_avalanche` convert benchmarks and streams.
- :class:`ExpansionMetric` / :class:`TaskRetrievalMetric` report clsim statistics as Avalanche ``PluginMetric``s.
- Checkpoints: ``avalanche.checkpointing.save_checkpoint`` / ``maybe_load_checkpoint`` work on a ClsimStrategy as
  they are (no ``dill`` settings needed): the clsim session pickles as its own task-boundary checkpoint (structure,
  adapters, heads, strategy state incl. indexes) and is rebuilt on load; the frozen backbone is recreated from the
  config and checked against a fingerprint. :func:`save_clsim_checkpoint` / :func:`load_clsim_checkpoint` wrap them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

with warnings.catch_warnings():  # avalanche warns at import that the optional QP solver (GEM) is missing
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.benchmarks.scenarios import CLScenario, benchmark_from_datasets, with_classes_timeline
    from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream
    from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.evaluation import PluginMetric
    from avalanche.evaluation.metric_results import MetricValue
    from avalanche.training.plugins.evaluation import default_evaluator
    from avalanche.training.templates import SupervisedTemplate

from cl.backbone import DataSpec, adopt_backbone
from cl.config import ExperimentConfig, config_to_dict, load_config
from cl.errors import DataError
from cl.loop import Session, derive_seed, load_run_checkpoint, resolve_device, rng_scope, save_run_checkpoint
from cl.plugins import load_builtin
from cl.strategy import check_loss_classes
from cl.transforms import Preprocessing, mix_seed, to_chw_image
from cl.types import Prediction, Stream, Task, ViewableDataset, labels_of

if TYPE_CHECKING:
    from cl.model import CLModel

__all__ = ["ClsimStrategy", "avalanche_to_stream", "stream_to_avalanche", "ExpansionMetric", "TaskRetrievalMetric",
           "save_clsim_checkpoint", "load_clsim_checkpoint", "IgnoredPluginWarning", "RandomBackboneWarning"]


class IgnoredPluginWarning(UserWarning):
    """A plugin passed to :class:`ClsimStrategy` acts through callbacks or objects clsim's training does not use."""


class RandomBackboneWarning(UserWarning):
    """:class:`ClsimStrategy` built a backbone without pretrained weights (no ``model=``, no weights in the config)."""


#: training callbacks that never fire in the bridge (clsim trains each experience in its own loop)
_NEVER_FIRED = ("before_training_iteration", "after_training_iteration", "before_forward", "after_forward",
                "before_backward", "after_backward", "before_update", "after_update")
#: callbacks that fire, but whose usual effect (a new dataset, dataloader, optimizer or scheduler) clsim ignores
_INEFFECTIVE = ("before_training_exp", "before_train_dataset_adaptation", "after_train_dataset_adaptation")


# ----------------------------------------------------------------------------------------------------------------------
# datasets and converters


_MARK = "clsim_view"  # data attribute of the datasets stream_to_avalanche makes: items are clsim views already


def _is_clsim_view(data: Any) -> bool:
    try:
        return getattr(data, _MARK, None) is not None
    except Exception:  # avalanche raises various errors for unknown attributes of some dataset kinds
        return False


class AvalancheView(ViewableDataset):
    """An Avalanche dataset seen as a clsim dataset: ``(image, incremental label)``; ``(x, y, t)`` items are fine.

    ``view("train")`` / ``view("eval")`` read the dataset's own ``train()`` / ``eval()`` transform groups, then apply
    clsim's train / eval preprocessing (``prep``, :mod:`cl.transforms`), exactly as a clsim stream does: images of any
    size (PIL, numpy, uint8 or float tensors) become ``(3, S, S)``. Datasets made by :func:`stream_to_avalanche`
    already yield clsim views and pass unchanged. The train view's randomness is seeded per sample and per epoch
    (``set_augmentation_seed``, called by the loop). ``prep=None`` only converts to 3 channels.

    Limitation: the clsim views inside a :func:`stream_to_avalanche` benchmark are out of the loop's reach, so with a
    random train view (``augment: flip | crop``) they keep their first epoch's augmentation in every epoch; such runs
    match ``clsim run`` only with ``augment: none``.
    """

    def __init__(self, data: Any, label_of: dict[int, int], prep: Preprocessing | None, kind: str = "train",
                 aug_seed: int = 0) -> None:
        self.data, self.label_of, self.prep, self.kind, self.aug_seed = data, label_of, prep, kind, aug_seed
        self._view = data.train() if kind == "train" else data.eval()
        self._as_is = _is_clsim_view(data)
        self.epoch_seed = 0
        self.labels = torch.tensor([label_of[int(c)] for c in data.targets], dtype=torch.long)

    def view(self, kind: str) -> AvalancheView:
        return AvalancheView(self.data, self.label_of, self.prep, kind, self.aug_seed)

    def __len__(self) -> int:
        return len(self.labels)

    def set_augmentation_seed(self, seed: int) -> None:
        self.epoch_seed = int(seed)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self._view[i]
        label = self.label_of[int(item[1])]
        if self._as_is:
            return item[0], label
        x = to_chw_image(item[0])
        if self.prep is None:
            return x, label
        if self.kind == "train":
            gen = torch.Generator().manual_seed(mix_seed(self.aug_seed, self.epoch_seed, i))
            return self.prep.train_view(x, gen), label
        return self.prep.eval_view(x), label


class _EvalPrep(Dataset):
    """An Avalanche eval dataset whose items' first element goes through clsim's eval view (before collation, so
    images of mixed sizes batch). Keeps the wrapped dataset's ``collate_fn``."""

    def __init__(self, data: Any, prep: Preprocessing) -> None:
        self.data, self.prep = data, prep
        self.collate_fn = getattr(data, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        return (self.prep.eval_view(to_chw_image(item[0])), *item[1:])


class _Indices(Dataset):
    """Yields ``(index, label)``; the transform groups turn the index into the image of the right clsim view."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor(i), self.labels[i]


class _Fetch:
    """Transform: index -> image of one clsim dataset view (a class, not a lambda, so checkpoints pickle)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __call__(self, i: Tensor) -> Tensor:
        return self.ds[int(i)][0]


def _as_avalanche(ds: ViewableDataset, targets: list[int], group: str) -> Any:
    views = TransformGroups({"train": _Fetch(ds.view("train")), "eval": _Fetch(ds.view("eval"))}, current_group=group)
    return make_avalanche_dataset(_Indices(targets), transform_groups=views,
                                  data_attributes=[DataAttribute(targets, "targets"),
                                                   DataAttribute([1] * len(targets), _MARK)])


def stream_to_avalanche(stream: Stream, label_space: str = "incremental") -> CLScenario:
    """A clsim stream as an Avalanche benchmark with one experience per task (a smaller last task included).

    ``label_space="incremental"`` (default) uses clsim's incremental labels as Avalanche class ids (what
    :class:`ClsimStrategy` reproduces ``clsim run`` with); ``"original"`` uses the dataset's class ids. Train
    experiences yield the train view (augmented) in ``dataset.train()`` and the eval view in ``dataset.eval()``.
    """
    if label_space not in ("incremental", "original"):
        raise ValueError(f"label_space={label_space!r}; valid choices: incremental, original")

    def ids(ds: Dataset) -> list[int]:
        lab = labels_of(ds).tolist()
        return lab if label_space == "incremental" else [int(stream.class_order[v]) for v in lab]

    train = [_as_avalanche(t.train, ids(t.train), "train") for t in stream.tasks]
    test = [_as_avalanche(t.test, ids(t.test), "eval") for t in stream.tasks]
    return with_classes_timeline(benchmark_from_datasets(train=train, test=test))


def _classes(exp: Any) -> set[int]:
    cls = getattr(exp, "classes_in_this_experience", None)
    return {int(c) for c in (cls if cls is not None else exp.dataset.targets.uniques)}


def avalanche_to_stream(benchmark: Any, image_size: int | None, name: str = "avalanche",
                        class_order: Sequence[int] | None = None, prep: Preprocessing | None = None) -> Stream:
    """An Avalanche class-incremental benchmark as a clsim stream (one task per training experience).

    Avalanche class ids get incremental labels in order of first appearance across experiences (sorted within an
    experience, or in ``class_order``); ``Task.class_ids`` are the Avalanche ids. Test data of each task are the
    test samples of its classes (index-aligned test experiences are used as they are). Images go through clsim's
    preprocessing for input size ``image_size`` (``prep``, default ``Preprocessing(image_size)``: the PILOT eval
    pipeline, no augmentation); ``image_size=None`` leaves their size as it comes.
    """
    if prep is None and image_size is not None:
        prep = Preprocessing(image_size)
    return _stream_from(list(benchmark.train_stream), list(benchmark.test_stream), prep, name, class_order)


def _stream_from(train_exps: list[Any], test_exps: list[Any], prep: Preprocessing | None, name: str = "avalanche",
                 class_order: Sequence[int] | None = None) -> Stream:
    """:func:`avalanche_to_stream` on lists of experiences; without test experiences the test sets are empty."""
    groups: list[list[int]] = []
    for exp in train_exps:
        cls = _classes(exp)
        new = sorted(cls) if class_order is None else [int(c) for c in class_order if int(c) in cls]
        if set(new) != cls or any(c in g for g in groups for c in new):
            raise ValueError(f"experience {len(groups)} has classes {sorted(cls)}: clsim tasks need new, disjoint "
                             f"classes (class-incremental benchmarks only)")
        groups.append(new)
    order = [c for g in groups for c in g]
    label_of = {c: i for i, c in enumerate(order)}
    tasks, offset = [], 0
    for t, (group, exp) in enumerate(zip(groups, train_exps, strict=True)):
        parts = []
        for te in test_exps:
            targets = np.asarray([int(c) for c in te.dataset.targets])
            keep = np.flatnonzero(np.isin(targets, group))
            if len(keep) == len(targets):
                parts.append(te.dataset)
            elif len(keep):
                parts.append(te.dataset.subset(keep.tolist()))
        if test_exps and not parts:
            raise ValueError(f"no test samples for the classes {group} of experience {t}")
        test = parts[0] if parts else exp.dataset.subset([])
        for p in parts[1:]:
            test = test.concat(p)
        tasks.append(Task(t, group, list(range(offset, offset + len(group))),
                          AvalancheView(exp.dataset, label_of, prep, "train", aug_seed=t),
                          AvalancheView(test, label_of, prep, "eval", aug_seed=t)))
        offset += len(group)
    return Stream(name, tasks, len(order), order, image_size=prep.img_size if prep else 0)


# ----------------------------------------------------------------------------------------------------------------------
# the strategy


def _fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{float(v.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")


def _hook_free(backbone: nn.Module, copy: bool) -> nn.Module:
    """``backbone`` without the forward hooks a session installed (adapter sites, strategy hooks): a deep copy made
    with the hooks left out (``copy=True``), or the module itself with its hooks removed. A new session installs
    its own; the old ones would add a second set of adapter outputs."""
    saved = [(m, {a: m.__dict__[a] for a in _HOOK_DICTS if a in m.__dict__}) for m in backbone.modules()]
    for m, hooks in saved:
        for a, v in hooks.items():
            m.__dict__[a] = type(v)()
    if not copy:
        return backbone
    try:
        return deepcopy(backbone)
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)


class _BridgeSession(Session):
    """The bridge's session: :meth:`evaluate` fails in one line when the evaluated tasks have no test data (the
    strategy was built without ``benchmark=``, so only training experiences reached it)."""

    def evaluate(self, upto: int, future: bool = False) -> dict[str, Any]:
        tasks = self.stream.tasks if future else self.stream.tasks[: upto + 1]
        empty = [t.task_id for t in tasks if len(t.test) == 0]
        if empty or not tasks:
            raise DataError(f"session.evaluate({upto}): no test data for task(s) {empty or [upto]}: the clsim session "
                            f"only has the test sets of a benchmark; pass ClsimStrategy(benchmark=...) or evaluate "
                            f"with strategy.eval(benchmark.test_stream)")
        return super().evaluate(upto, future)


class _SessionBox:
    """Holds the clsim session; pickles as a clsim task-boundary checkpoint (no backbone), rebuilt on unpickling."""

    _FILES = ("state.json", "tensors.safetensors")

    def __init__(self, session: Session, cfg: ExperimentConfig, done: int = 0, adopted: bool = False) -> None:
        self.session, self.cfg, self.done = session, cfg, done
        self.adopted = adopted  # the backbone came from model= (it cannot be rebuilt from the config)

    def __getstate__(self) -> dict[str, Any]:
        s = self.session
        with tempfile.TemporaryDirectory() as d:
            save_run_checkpoint(Path(d), s.model, s.strategy, {}, self.done - 1, "avalanche")
            files = {f: (Path(d) / f).read_bytes() for f in self._FILES}
        state = {"cfg": self.cfg, "stream": s.stream, "done": self.done, "files": files,
                 "backbone": _fingerprint(s.model.backbone)}
        if self.adopted:  # a user-given backbone travels with the checkpoint (without this session's hooks)
            state["backbone_module"] = _hook_free(s.model.backbone, copy=True)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        cfg, stream = state["cfg"], state["stream"]
        given = state.get("backbone_module")
        with rng_scope(cfg.seed, resolve_device(cfg.train.device)):
            s = _BridgeSession.create(cfg, stream=stream,
                                      backbone=adopt_backbone(given, cfg.backbone) if given is not None else None)
        if _fingerprint(s.model.backbone) != state["backbone"]:
            raise RuntimeError(f"the backbone rebuilt from the config ({cfg.backbone.name}) differs from the one "
                               f"the checkpoint was trained with")
        with tempfile.TemporaryDirectory() as d:
            for f, data in state["files"].items():
                (Path(d) / f).write_bytes(data)
            load_run_checkpoint(Path(d), s.model, s.strategy, {}, "avalanche")
        s.ctx.task = stream.tasks[state["done"] - 1] if state["done"] else None
        self.session, self.cfg, self.done, self.adopted = s, cfg, state["done"], given is not None


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


# ----------------------------------------------------------------------------------------------------------------------
# metrics


class ExpansionMetric(PluginMetric[dict]):
    """After each training experience: ``clsim/adapters_total`` (sum over blocks of K_b),
    ``clsim/adapters_per_layer/BlockXX``, ``clsim/deployed_params``, ``clsim/trained_params``.
    x = the experience index (clsim trains outside Avalanche's iteration counter)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, int] = {}

    def reset(self) -> None:
        self._last = {}

    def result(self) -> dict[str, int]:
        return dict(self._last)

    def after_training_exp(self, strategy: ClsimStrategy) -> list[MetricValue]:
        model, sess = strategy.model, strategy.session
        per_block = model.adapters_per_block()
        vals = {"clsim/adapters_total": sum(per_block),
                "clsim/deployed_params": int(sess.strategy.expansion_info(model)["deployed_params"]),
                "clsim/trained_params": strategy.trained_params[-1] if strategy.trained_params else 0}
        vals.update({f"clsim/adapters_per_layer/Block{b:02d}": k for b, k in enumerate(per_block)})
        self._last = vals
        x = strategy.clock.train_exp_counter
        return [MetricValue(self, k, v, x) for k, v in vals.items()]

    def __str__(self) -> str:
        return "clsim/expansion"


class TaskRetrievalMetric(PluginMetric[float]):
    """Task-retrieval accuracy (fraction) over the evaluated samples of trained classes, for strategies whose
    ``predict`` returns a :class:`~cl.types.Prediction` with ``task_pred``; emitted after each ``eval`` as
    ``clsim/task_retrieval_acc/eval_phase/<stream>_stream``. Nothing is emitted for other strategies."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._correct, self._total = 0, 0

    def result(self) -> float | None:
        return self._correct / self._total if self._total else None

    def before_eval(self, strategy: ClsimStrategy) -> None:
        self.reset()

    def after_eval_iteration(self, strategy: ClsimStrategy) -> None:
        pred = strategy.last_prediction
        if pred is None or pred.task_pred is None:
            return
        true = strategy.true_tasks(strategy.mb_y)
        seen = true >= 0
        self._correct += int((pred.task_pred.to(true.device)[seen] == true[seen]).sum())
        self._total += int(seen.sum())

    def after_eval(self, strategy: ClsimStrategy) -> list[MetricValue] | None:
        acc = self.result()
        if acc is None:
            return None
        name = strategy.experience.origin_stream.name
        return [MetricValue(self, f"clsim/task_retrieval_acc/eval_phase/{name}_stream", acc,
                            strategy.clock.train_exp_counter)]

    def __str__(self) -> str:
        return "clsim/task_retrieval_acc"


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def save_clsim_checkpoint(strategy: ClsimStrategy, path: str | Path) -> None:
    """``avalanche.checkpointing.save_checkpoint`` written atomically (the clsim session pickles without backbone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_checkpoint(strategy, str(tmp))
    tmp.replace(path)


def load_clsim_checkpoint(strategy: ClsimStrategy, path: str | Path) -> tuple[ClsimStrategy, int]:
    """``maybe_load_checkpoint``: ``(strategy, number of experiences already trained)``; ``(strategy, 0)`` if absent.

    Only load files you wrote: the format is a full (dill) unpickling.
    """
    return maybe_load_checkpoint(strategy, str(path), map_location=strategy.session.ctx.device)
