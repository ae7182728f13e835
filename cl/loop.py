"""The one training and evaluation loop: ``run(cfg) -> result dict`` (also written to ``result.json``).

For each task: ``strategy.before_task`` -> every phase the strategy yields (optimiser rebuilt per phase from its
parameters; only those parameters have ``requires_grad`` while it runs) -> ``strategy.after_task`` -> evaluation on
every seen task (one pass over their test sets, which fills row i of the accuracy matrix) -> checkpoint.

:class:`~cl.context.RunContext` (what strategies may use from the loop), :func:`~cl.context.derive_seed`,
:func:`~cl.context.rng_scope` and :func:`~cl.context.resolve_device` live in :mod:`cl.context` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import pickle
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from cl.backbone import DataSpec, create_backbone
from cl.checkpoint import VOLATILE_KEYS, CheckpointStore, load_run_checkpoint, save_run_checkpoint, verify_checkpoint
from cl.config import ExperimentConfig, TrainConfig, config_to_dict
from cl.context import RunContext, derive_seed, resolve_device, rng_scope
from cl.errors import ClsimError, ConfigError, DataError, NumericalError, RunFolderError
from cl.model import CLModel
from cl.numerics import LogitWatch, check_loss
from cl.registries import STRATEGIES, STREAMS
from cl.runfolder import check_out_path, check_resume_config, prepare_folder
from cl.runlock import RunLock, lock_holder, refusal
from cl.runlog import JsonlLog, atomic_write_json
from cl.strategy import Strategy, check_loss_classes
from cl.transforms import set_augmentation_seed
from cl.types import Batch, Phase, Prediction, Stream, Task
from cl.validate import check_run_name

__all__ = [
    "RunContext",
    "Session",
    "run",
    "run_dir_of",
    "build_model_and_stream",
    "resolve_device",
    "rng_scope",
    "derive_seed",
    "percent_correct",
    "save_run_checkpoint",
    "load_run_checkpoint",
]

log = logging.getLogger(__name__)


def run_dir_of(cfg: ExperimentConfig) -> Path:
    """``<out>/<experiment>/<seed>``; raises :class:`ConfigError` if the experiment name would leave ``out``."""
    check_run_name(cfg.experiment)
    return Path(cfg.out) / cfg.experiment / str(cfg.seed)


def _param_groups(phase: Phase) -> list[dict[str, Any]]:
    items = list(phase.params)
    if items and isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": items}] if items else []


def _build_optimizer(groups: list[dict[str, Any]], phase: Phase, tc: TrainConfig) -> torch.optim.Optimizer:
    name = phase.optimizer or tc.optimizer
    lr = phase.lr if phase.lr is not None else tc.lr
    wd = phase.weight_decay if phase.weight_decay is not None else tc.weight_decay
    if name == "sgd":
        mom = phase.momentum if phase.momentum is not None else tc.momentum
        return torch.optim.SGD(groups, lr=lr, momentum=mom, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    raise ValueError(f"optimizer={name!r}; valid choices: sgd, adam, adamw")


def _run_phase(model: CLModel, strategy: Strategy, phase: Phase, ctx: RunContext, trained: dict[int, nn.Parameter],
               index: int = 0) -> None:
    task = ctx.task
    assert task is not None
    groups = _param_groups(phase)
    params = [p for g in groups for p in g["params"]]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        trained[id(p)] = p  # keeps the parameter alive so its id cannot be reused within the task
    model.assert_backbone_frozen()
    data = phase.data if phase.data is not None else task.train
    # CACHE: tokens entering phase.trainable_from, computed once per task (cl/cache/); input_block 0 = images
    data, input_block = ctx.cache.phase_inputs(model, phase, data)
    loader = ctx.loader(data, phase.batch_size, shuffle=True, key=("phase", phase.name, index),
                        num_workers=0 if input_block else phase.num_workers, drop_last=phase.drop_last)
    frozen = _frozen_subset(phase, params)
    opt = _build_optimizer(groups, phase, ctx.train) if params else None
    sched_kind = phase.scheduler or ctx.train.scheduler
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs, eta_min=0.0)
             if opt is not None and sched_kind == "cosine" else None)
    model.train()
    step = 0
    for epoch in range(phase.epochs):
        # augmentation seed per (run seed, task, phase, epoch): set before the loader forks its workers
        set_augmentation_seed(data, derive_seed(ctx.seed, task.task_id, phase.name, index, epoch))
        for p in frozen:  # Phase.freeze: no gradient (hence no update) for the first freeze_epochs epochs
            p.requires_grad_(epoch >= phase.freeze_epochs)
        total, count = 0.0, 0
        bar = ctx.progress(loader, f"task {task.task_id} {phase.name} ep {epoch + 1}/{phase.epochs}")
        for x, y in bar:
            batch = Batch(ctx.to_device(x), ctx.to_device(y), task.task_id)
            with ctx.autocast(), model.input_at(input_block):
                out = strategy.loss(model, batch, phase)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if ctx.train.grad_clip:
                    nn.utils.clip_grad_norm_(params, ctx.train.grad_clip)
                opt.step()
            if phase.after_step is not None:
                phase.after_step()
            loss = float(out.loss.detach())
            check_loss(loss, ctx.train.loss_limit, ctx.log, task.task_id, phase.name, epoch, step)
            total += loss * len(y)
            count += len(y)
            step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.3f}")
        if sched is not None:
            sched.step()
        ctx.cache.check_phase()  # CACHE: the frozen prefix must not have changed (a wrong declaration raises)
        ctx.log.write("train_epoch", task=task.task_id, phase=phase.name, epoch=epoch,
                      **{"train/loss": total / max(count, 1), "train/lr": opt.param_groups[0]["lr"] if opt else None},
                      **({"frozen": epoch < phase.freeze_epochs} if frozen else {}), **phase.info)
        if phase.eval_every_epoch and ctx.stream is not None:  # diagnostic only: metrics.jsonl, never the matrix
            ev = _evaluate(model, strategy, ctx.stream, task.task_id, ctx, future=False)
            ctx.log.write("epoch_eval", task=task.task_id, phase=phase.name, epoch=epoch,
                          **{"test/accuracy_row": ev["row"]}, **phase.info)
            model.train()
    ctx.cache.end_phase()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    model.assert_backbone_frozen()


def _frozen_subset(phase: Phase, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``phase.freeze`` checked to be a subset of the phase's parameters."""
    ids = {id(p) for p in params}
    frozen = list(phase.freeze)
    if any(id(p) not in ids for p in frozen):
        raise ValueError(f"phase {phase.name}: Phase.freeze must be a subset of the phase's parameters")
    return frozen


@torch.no_grad()
def _evaluate(model: CLModel, strategy: Strategy, stream: Stream, upto: int, ctx: RunContext,
              future: bool) -> dict[str, Any]:
    """One pass over the test sets of tasks 0..upto (or all tasks if ``future``): per-task accuracy and retrieval."""
    tasks = stream.tasks if future else stream.tasks[: upto + 1]
    model.eval()
    ds: ConcatDataset[tuple[Tensor, int]] = ConcatDataset([t.test for t in tasks])
    offsets = np.cumsum([0] + [t.num_classes for t in stream.tasks])
    preds, labels, task_preds, task_init = [], [], [], []
    extra_preds: dict[str, list[Tensor]] = {}
    batch_size, order = strategy.eval_batching(ds)  # e.g. MOS official mode: the code's test batch and order
    # CACHE: test-set tokens entering strategy.frozen_prefix(model), computed once per run (cl/cache/); per-sample
    # row memos assume the dataset order, so a strategy-defined order turns them off for this evaluation
    src, input_block = ctx.cache.eval_inputs(model, ds.datasets, strategy.frozen_prefix(model), rows=order is None)
    data: Dataset = src if order is None else Subset(src, list(order))
    loader = ctx.loader(data, batch_size or ctx.train.eval_batch_size, num_workers=0 if input_block else None)
    watch = LogitWatch()  # non-finite predictions are numeric faults (cl.numerics), read once after the pass
    for x, y in ctx.progress(loader, f"eval after task {upto}"):
        ctx.cache.next_batch(len(y))
        with ctx.autocast(), model.input_at(input_block):
            out = strategy.predict(model, ctx.to_device(x))
        pred = out if isinstance(out, Tensor) else out.logits
        watch.observe(pred)
        preds.append(pred.float().argmax(1).cpu())
        labels.append(y)
        if isinstance(out, Prediction) and out.task_pred is not None:
            task_preds.append(out.task_pred.cpu())
            if "task_pred_initial" in out.extras:
                task_init.append(out.extras["task_pred_initial"].cpu())
        if isinstance(out, Prediction):
            for k, v in out.extras.items():
                if k.endswith("_pred") and not k.startswith("task_pred"):
                    extra_preds.setdefault(k, []).append(v.cpu())
    ctx.cache.end_eval()
    watch.check(ctx.log, upto)
    pred_t, y_t = torch.cat(preds), torch.cat(labels)
    true_task = torch.as_tensor(np.searchsorted(offsets, y_t.numpy(), side="right") - 1)
    row = [percent_correct(pred_t[true_task == j] == y_t[true_task == j]) for j in range(len(tasks))]
    result: dict[str, Any] = {"row": row, "extra_rows": {}}
    for k, chunks in extra_preds.items():  # e.g. MOS's prototype-only and head-only class predictions
        ep = torch.cat(chunks)
        result["extra_rows"][k] = [percent_correct(ep[true_task == j] == y_t[true_task == j])
                                   for j in range(len(tasks))]
    if task_preds:
        tp = torch.cat(task_preds)
        result["tra_row"] = [percent_correct(tp[true_task == j] == j) for j in range(len(tasks))]
        correct_task = tp == true_task
        result["acc_given_correct_task"] = percent_correct(pred_t[correct_task] == y_t[correct_task])
        if task_init:
            ti = torch.cat(task_init)
            result["tra_initial_row"] = [percent_correct(ti[true_task == j] == j) for j in range(len(tasks))]
    return result


def percent_correct(hits: Tensor) -> float | None:
    """``100 * correct / total`` from a boolean tensor, computed exactly from the integer counts in float64
    (11 of 12 -> 91.66666666666667); ``None`` for an empty tensor."""
    total = int(hits.numel())
    return 100.0 * int(hits.sum()) / total if total else None


def build_model_and_stream(cfg: ExperimentConfig, device: torch.device) -> tuple[CLModel, Stream]:
    backbone, spec = create_backbone(cfg.backbone)
    # unreadable or malformed files on disk (torn archives, corrupt pickles, bad headers) are bad data, not bugs
    with _as_user_error(DataError, f"stream ({cfg.stream.name})", (ValueError, OSError, EOFError,
                                                                    pickle.UnpicklingError)):
        stream = STREAMS.get(cfg.stream.name).build(cfg.stream, spec.img_size)
    return CLModel(backbone, spec).to(device), stream


@contextlib.contextmanager
def _as_user_error(kind: type[ClsimError], where: str,
                   catch: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
    """Re-raise ``catch`` errors from building a component of the config as a one-line user error."""
    try:
        yield
    except ClsimError:
        raise
    except catch as err:
        raise kind(f"{where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("clsim", "torch", "timm", "numpy", "faiss-cpu", "avalanche-lib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        out["git_sha"] = sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = "unknown"
    return out


def _config_hash(cfg_dict: dict[str, Any]) -> str:
    """Hash of the settings that shape results; progress bars and worker counts may change on resume."""
    keep = json.loads(json.dumps(cfg_dict))
    for key in VOLATILE_KEYS:
        section, name = key.split(".")
        keep.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Session:
    """A model, a stream and a strategy wired to a :class:`RunContext`: what ``run`` drives task by task.

    Other drivers (the Avalanche bridge) reuse :meth:`train_task` and :meth:`evaluate`, so no method is implemented
    twice.
    """

    def __init__(self, model: CLModel, stream: Stream, strategy: Strategy, ctx: RunContext) -> None:
        self.model, self.stream, self.strategy, self.ctx = model, stream, strategy, ctx

    @classmethod
    def create(cls, cfg: ExperimentConfig, jlog: JsonlLog | None = None, stream: Stream | None = None,
               backbone: tuple[nn.Module, DataSpec] | None = None) -> Session:
        """Build backbone, stream (unless given), model and strategy; call ``strategy.setup``.

        ``backbone``: an already built frozen backbone and its spec (``cl.backbone.adopt_backbone``) used instead of
        ``cfg.backbone``; only together with ``stream``.
        """
        device = resolve_device(cfg.train.device)
        ctx = RunContext(cfg.train, device, cfg.seed, jlog or JsonlLog(None))
        if stream is None:
            if backbone is not None:
                raise ValueError("Session.create(backbone=...) needs stream= too")
            model, stream = build_model_and_stream(cfg, device)
        else:
            net, spec = backbone if backbone is not None else create_backbone(cfg.backbone)
            model = CLModel(net, spec).to(device)
        ctx.stream = stream
        strategy: Strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, ctx)
        check_loss_classes(strategy, stream)
        with _as_user_error(ConfigError, f"strategy ({cfg.strategy.name})"):
            strategy.setup(model, stream)
        return cls(model, stream, strategy, ctx)

    def train_task(self, task: Task) -> int:
        """``before_task`` -> every phase -> ``after_task``; returns the number of parameters trained.

        Reseeds torch's RNG from ``(seed, task id)`` first, so every driver (``run``, the Avalanche bridge, a resumed
        run) trains a task from the same random state. Wrap calls in :func:`rng_scope` to leave the caller's RNG as
        it was.
        """
        torch.manual_seed(derive_seed(self.ctx.seed, "task", task.task_id))
        self.ctx.task = task
        trained: dict[int, nn.Parameter] = {}
        self.strategy.before_task(self.model, task)
        for index, phase in enumerate(self.strategy.phases(self.model, task)):
            _run_phase(self.model, self.strategy, phase, self.ctx, trained, index)
        self.strategy.after_task(self.model, task)
        self.ctx.cache.release("task")  # CACHE: the task's training inputs are not needed again
        self.model.assert_backbone_frozen()
        return sum(p.numel() for p in trained.values())

    def evaluate(self, upto: int, future: bool = False) -> dict[str, Any]:
        """Evaluate on the test sets of tasks ``0..upto`` (all tasks if ``future``), then ``strategy.after_eval``."""
        result = _evaluate(self.model, self.strategy, self.stream, upto, self.ctx, future)
        self.strategy.after_eval(self.model, self.stream.tasks[upto])
        return result


def run(cfg: ExperimentConfig, *, resume: bool = False, summarize: Callable[..., Any] | None = None,
        figures: Callable[[dict, Path], Any] | None = None) -> dict[str, Any]:
    """Run one experiment end to end and return the result dict (also written to ``result.json``).

    Everything that can reject the inputs runs before the run folder is touched: the run name, the device, the
    folder's lock, on ``resume`` the folder's config, then backbone + weights, stream and strategy setup, and the
    checkpoint to resume from. Only then is the folder created and locked (:class:`~cl.runlock.RunLock`, held until
    this returns), so a rejected input leaves no folder behind and a rejected rerun changes nothing in a finished one.

    Args:
        cfg: the validated experiment config.
        resume: continue from the newest verified task-boundary checkpoint in the run folder (falling back to the
            previous boundary when the newest fails verification); without one, start fresh (logged). The config
            must equal the folder's ``config.json`` except ``train.progress`` / ``train.num_workers``.
        summarize: ``(accuracy_matrix, n_test, expansion_inputs) -> (metrics, expansion)``; defaults to
            ``evaluation.summarize_result``.
        figures: ``(result, run_dir) -> paths``; defaults to ``evaluation.report.write_run_figures``.

    Raises:
        ClsimError: bad input (config, weights, data), a locked or unusable run folder, a numeric fault.
    """
    if summarize is None or figures is None:
        from cl.plugins import default_finalizers

        s, f = default_finalizers()
        summarize, figures = summarize or s, figures or f
    run_dir = run_dir_of(cfg)
    cfg_dict = config_to_dict(cfg)
    cfg_hash = _config_hash(cfg_dict)
    device = resolve_device(cfg.train.device)
    check_out_path(run_dir)
    holder = lock_holder(run_dir)
    if holder is not None:
        raise refusal(run_dir, holder)
    store = CheckpointStore(run_dir / "checkpoint")
    if resume:
        check_resume_config(run_dir, store, cfg_dict, cfg_hash)
    jlog = JsonlLog(run_dir / "metrics.jsonl", deferred=True, seed=cfg.seed, strategy=cfg.strategy.name)
    t_start = time.time()
    with rng_scope(cfg.seed, device):
        sess = Session.create(cfg, jlog)
        state = _fresh_state()
        start_task, boundary, rejected = 0, None, []
        for task_done, path in store.boundaries() if resume else []:
            reason = verify_checkpoint(path, cfg_hash)
            if reason is None:
                try:
                    start_task = load_run_checkpoint(path, sess.model, sess.strategy, state, cfg_hash)
                    boundary = path
                    break
                except RunFolderError as err:
                    reason = str(err)
                    sess, state = Session.create(cfg, jlog, stream=sess.stream), _fresh_state()
            log.warning("checkpoint after task %d rejected: %s; trying the previous boundary", task_done, reason)
            rejected.append({"task_done": task_done, "reason": reason})
        stream, ctx = sess.stream, sess.ctx
        with RunLock(run_dir) as lock:
            if lock.took_over is not None:
                jlog.write("lock_taken_over", previous=lock.took_over)
            prepare_folder(run_dir, store, jlog, resume, boundary, start_task, rejected)
            ctx.events = state["events"]
            atomic_write_json(run_dir / "config.json", {**cfg_dict, "versions": _versions(), "config_hash": cfg_hash},
                              point="config")
            jlog.write("start", experiment=cfg.experiment, tasks=len(stream), device=str(ctx.device))
            with _named_run(run_dir):
                try:
                    _train_tasks(sess, stream.tasks[start_task:], state, store, jlog, cfg, cfg_hash)
                finally:
                    ctx.cache.close()  # CACHE: free every entry (spill files are already unlinked)
            result = _finalize(cfg, stream, state, summarize, time.time() - t_start)
            result["config_hash"] = cfg_hash  # sweeps: a result.json is "done" only for the config that wrote it
            atomic_write_json(run_dir / "result.json", result, point="result")
            try:
                figures(result, run_dir)
            except Exception as err:  # figures must never lose a finished result
                log.warning("could not draw figures: %s", err)
            jlog.write("end", **{"test/a_last": result["metrics"].get("a_last"),
                                 "test/a_avg": result["metrics"].get("a_avg")})
    return result


@contextlib.contextmanager
def _named_run(run_dir: Path) -> Iterator[None]:
    """Numeric faults name the run folder whose ``metrics.jsonl`` holds the event."""
    try:
        yield
    except NumericalError as err:
        raise NumericalError(f"{run_dir}: {err}") from None


def _train_tasks(sess: Session, tasks: list[Task], state: dict[str, Any], store: CheckpointStore, jlog: JsonlLog,
                 cfg: ExperimentConfig, cfg_hash: str) -> None:
    """Train, evaluate and checkpoint each task in turn (one boundary per task)."""
    model, strategy, ctx = sess.model, sess.strategy, sess.ctx
    for task in tasks:
        t0 = time.time()
        n_trained = sess.train_task(task)
        ev = sess.evaluate(task.task_id, cfg.eval.future_tasks)
        _record_task(state, ev, model, strategy, n_trained, ctx, time.time() - t0)
        seen = [x for x in ev["row"][: task.task_id + 1] if x is not None]
        jlog.write("eval", task=task.task_id, **{"test/accuracy_row": ev["row"],
                                                 "test/a_task_mean": float(np.mean(seen)) if seen else None})
        log.info("task %d: accuracy per task %s", task.task_id, [round(a, 2) for a in ev["row"] if a is not None])
        if cfg.train.checkpoint:
            store.write(task.task_id, functools.partial(
                save_run_checkpoint, model=model, strategy=strategy, state=state, task_id=task.task_id,
                cfg_hash=cfg_hash, log_bytes=jlog.sync()))


def _fresh_state() -> dict[str, Any]:
    return {"R": [], "tra": [], "tra_initial": [], "acc_given_correct_task": [], "K": [], "trainable": [],
            "deployed": [], "reference": [], "expandable": None, "per_task_s": [], "events": []}


def _record_task(state: dict[str, Any], ev: dict[str, Any], model: CLModel, strategy: Strategy, n_trained: int,
                 ctx: RunContext, seconds: float) -> None:
    """Append one task's evaluation and growth bookkeeping to the loop state (saved with every checkpoint)."""
    info = strategy.expansion_info(model)
    state["R"].append(ev["row"])
    if "tra_row" in ev:
        state["tra"].append(ev["tra_row"])
        state["acc_given_correct_task"].append(ev["acc_given_correct_task"])
    if "tra_initial_row" in ev:
        state["tra_initial"].append(ev["tra_initial_row"])
    for k, r in ev["extra_rows"].items():
        state.setdefault("extra", {}).setdefault(k, []).append(r)
    state["K"].append(model.adapters_per_block())
    state["trainable"].append(n_trained)
    state["deployed"].append(info["deployed_params"])
    state["reference"].append(info.get("reference_params"))
    state["expandable"] = info["expandable_blocks"]
    state["per_task_s"].append(seconds)
    state["events"] = ctx.events


def _square(rows: list[list[float | None]], n: int) -> list[list[float | None]]:
    return [list(r[:n]) + [None] * (n - len(r[:n])) for r in rows]


def _finalize(cfg: ExperimentConfig, stream: Stream, state: dict[str, Any], summarize: Callable[..., Any],
              total_s: float) -> dict[str, Any]:
    n = len(stream)
    R = _square(state["R"], n)
    n_test = [len(t.test) for t in stream.tasks]
    n_blocks = len(state["K"][0]) if state["K"] else 0
    exp_inputs = {
        "sites": [f"blocks.{b}" for b in range(n_blocks)],
        "expandable_sites": state["expandable"] or [],
        "adapters_per_layer": state["K"],
        "trainable_params_per_task": state["trainable"],
        "deployed_params": state["deployed"],
        "reference_params": state["reference"] if all(r is not None for r in state["reference"]) else None,
    }
    metrics, expansion = summarize(R, n_test, exp_inputs)
    tra = None
    if state["tra"]:
        tra = {"accuracy_matrix": _square(state["tra"], n),
               "initial_accuracy_matrix": _square(state["tra_initial"], n) if state["tra_initial"] else None,
               "acc_given_correct_task": state["acc_given_correct_task"]}
    return {
        "experiment": cfg.experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "stream": cfg.stream.name,
        "backbone": cfg.backbone.name,
        "tasks": [{"id": t.task_id, "class_ids": t.class_ids, "labels": t.labels, "n_train": len(t.train),
                   "n_test": len(t.test)} for t in stream.tasks],
        "accuracy_matrix": R,
        "metrics": metrics,
        "task_retrieval": tra,
        # accuracy matrices of auxiliary predictors a strategy reports (e.g. MOS ``proto_pred``, ``head_pred``)
        "extra_accuracy_matrices": {k: _square(v, n) for k, v in state.get("extra", {}).items()},
        "expansion": expansion,
        "events": state["events"],
        "timing": {"total_s": round(total_s, 3), "per_task_s": [round(s, 3) for s in state["per_task_s"]]},
    }
