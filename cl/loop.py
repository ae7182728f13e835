"""The one training and evaluation loop: ``run(cfg) -> result dict`` (also written to ``result.json``).

For each task: ``strategy.before_task`` -> every phase the strategy yields (optimiser rebuilt per phase from its
parameters; only those parameters have ``requires_grad`` while it runs) -> ``strategy.after_task`` -> evaluation on
every seen task (one pass over their test sets, which fills row i of the accuracy matrix) -> checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cl.backbone import create_backbone
from cl.config import ExperimentConfig, TrainConfig, config_to_dict
from cl.model import CLModel
from cl.registries import STRATEGIES, STREAMS
from cl.runlog import JsonlLog, atomic_write_json
from cl.strategy import Strategy
from cl.types import Batch, Phase, Prediction, Stream, Task

__all__ = [
    "RunContext",
    "Session",
    "run",
    "run_dir_of",
    "build_model_and_stream",
    "resolve_device",
    "rng_scope",
    "derive_seed",
    "save_run_checkpoint",
    "load_run_checkpoint",
]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return dev


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out) / cfg.experiment / str(cfg.seed)


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed derived from any hashable description (stable across processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@dataclass
class RunContext:
    """What a strategy may use from the loop: device, data loaders, autocast, logging, the current task."""

    train: TrainConfig
    device: torch.device
    seed: int
    log: JsonlLog
    stream: Stream | None = None
    task: Task | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_seen(self) -> int:
        assert self.task is not None
        return self.task.labels[-1] + 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def loader(self, dataset: Dataset, batch_size: int | None = None, shuffle: bool = False, key: Any = 0,
               drop_last: bool = False, num_workers: int | None = None) -> DataLoader:
        """A DataLoader; shuffling is seeded by ``(seed, task, key)`` so runs and resumes are reproducible."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.task.task_id if self.task else -1, key))
        return DataLoader(
            dataset, batch_size=batch_size or self.train.batch_size, shuffle=shuffle, generator=gen,
            num_workers=self.train.num_workers if num_workers is None else num_workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def to_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Any:
        if not self.train.progress:
            return iterable
        from tqdm.auto import tqdm

        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        # iterate our own iterator: handing a DataLoader to tqdm changes the order its seeded generator yields,
        # which would make results depend on whether progress bars are shown
        return tqdm(iter(iterable), desc=desc, total=total, leave=False, dynamic_ncols=True)

    @torch.no_grad()
    def extract(self, model: CLModel, dataset: Dataset, fn: Callable[[Tensor], Tensor] | None = None,
                desc: str = "features") -> tuple[Tensor, Tensor]:
        """Apply ``fn`` (default ``model.features``) to a dataset in eval mode; returns ``(outputs, labels)`` on CPU."""
        fn = fn or model.features
        was = model.training
        model.eval()
        outs, labels = [], []
        loader = self.loader(dataset, self.train.eval_batch_size)
        for x, y in self.progress(loader, desc):
            with self.autocast():
                outs.append(fn(self.to_device(x)).float().cpu())
            labels.append(y)
        model.train(was)
        return torch.cat(outs), torch.cat(labels)

    def event(self, kind: str, **fields: Any) -> None:
        """Record a strategy event (e.g. an expansion) in the JSONL log and in ``result.json``."""
        rec = {"event": kind, "task": self.task.task_id if self.task else None, **fields}
        self.events.append(rec)
        self.log.write(kind, **{k: v for k, v in rec.items() if k != "event"})


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
    loader = ctx.loader(data, phase.batch_size, shuffle=True, key=("phase", phase.name, index),
                        num_workers=phase.num_workers)
    opt = _build_optimizer(groups, phase, ctx.train) if params else None
    sched_kind = phase.scheduler or ctx.train.scheduler
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs, eta_min=0.0)
             if opt is not None and sched_kind == "cosine" else None)
    model.train()
    step = 0
    for epoch in range(phase.epochs):
        total, count = 0.0, 0
        bar = ctx.progress(loader, f"task {task.task_id} {phase.name} ep {epoch + 1}/{phase.epochs}")
        for x, y in bar:
            batch = Batch(ctx.to_device(x), ctx.to_device(y), task.task_id)
            with ctx.autocast():
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
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in task {task.task_id} phase {phase.name}")
            total += loss * len(y)
            count += len(y)
            step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.3f}")
        if sched is not None:
            sched.step()
        ctx.log.write("train_epoch", task=task.task_id, phase=phase.name, epoch=epoch,
                      **{"train/loss": total / max(count, 1), "train/lr": opt.param_groups[0]["lr"] if opt else None},
                      **phase.info)
    for p in params:
        p.requires_grad_(False)
    model.eval()
    model.assert_backbone_frozen()


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
    for x, y in ctx.progress(ctx.loader(ds, ctx.train.eval_batch_size), f"eval after task {upto}"):
        with ctx.autocast():
            out = strategy.predict(model, ctx.to_device(x))
        pred = out if isinstance(out, Tensor) else out.logits
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
    pred_t, y_t = torch.cat(preds), torch.cat(labels)
    true_task = torch.as_tensor(np.searchsorted(offsets, y_t.numpy(), side="right") - 1)
    row: list[float | None] = []
    for j, _ in enumerate(tasks):
        m = true_task == j
        row.append(float((pred_t[m] == y_t[m]).float().mean() * 100) if m.any() else None)
    result: dict[str, Any] = {"row": row, "extra_rows": {}}
    for k, chunks in extra_preds.items():  # e.g. MOS's prototype-only and head-only class predictions
        ep = torch.cat(chunks)
        result["extra_rows"][k] = [float((ep[true_task == j] == y_t[true_task == j]).float().mean() * 100)
                                   for j in range(len(tasks))]
    if task_preds:
        tp = torch.cat(task_preds)
        result["tra_row"] = [float((tp[true_task == j] == j).float().mean() * 100) for j in range(len(tasks))]
        correct_task = tp == true_task
        result["acc_given_correct_task"] = (
            float((pred_t[correct_task] == y_t[correct_task]).float().mean() * 100) if correct_task.any() else None
        )
        if task_init:
            ti = torch.cat(task_init)
            result["tra_initial_row"] = [float((ti[true_task == j] == j).float().mean() * 100)
                                         for j in range(len(tasks))]
    return result


def build_model_and_stream(cfg: ExperimentConfig, device: torch.device) -> tuple[CLModel, Stream]:
    backbone, spec = create_backbone(cfg.backbone)
    stream = STREAMS.get(cfg.stream.name).build(cfg.stream, spec.img_size)
    return CLModel(backbone, spec).to(device), stream


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
    keep.get("train", {}).pop("progress", None)
    keep.get("train", {}).pop("num_workers", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def rng_scope(seed: int, device: torch.device) -> Iterator[None]:  # noqa: D401
    """Seeded RNG for the run, restored afterwards (library code never leaves the global RNG changed)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cuda"):
        torch.manual_seed(seed)
        yield


class Session:
    """A model, a stream and a strategy wired to a :class:`RunContext`: what ``run`` drives task by task.

    Other drivers (the Avalanche bridge) reuse :meth:`train_task` and :meth:`evaluate`, so no method is implemented
    twice.
    """

    def __init__(self, model: CLModel, stream: Stream, strategy: Strategy, ctx: RunContext) -> None:
        self.model, self.stream, self.strategy, self.ctx = model, stream, strategy, ctx

    @classmethod
    def create(cls, cfg: ExperimentConfig, jlog: JsonlLog | None = None, stream: Stream | None = None) -> Session:
        """Build backbone, stream (unless given), model and strategy; call ``strategy.setup``."""
        device = resolve_device(cfg.train.device)
        ctx = RunContext(cfg.train, device, cfg.seed, jlog or JsonlLog(None))
        if stream is None:
            model, stream = build_model_and_stream(cfg, device)
        else:
            backbone, spec = create_backbone(cfg.backbone)
            model = CLModel(backbone, spec).to(device)
        ctx.stream = stream
        strategy: Strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, ctx)
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

    Args:
        cfg: the validated experiment config.
        resume: continue from the last task-boundary checkpoint in the run folder (must be the same config).
        summarize: ``(accuracy_matrix, n_test, expansion_inputs) -> (metrics, expansion)``; defaults to
            ``evaluation.summarize_result``.
        figures: ``(result, run_dir) -> paths``; defaults to ``evaluation.report.write_run_figures``.
    """
    if summarize is None or figures is None:
        from cl.plugins import default_finalizers

        s, f = default_finalizers()
        summarize, figures = summarize or s, figures or f
    run_dir = run_dir_of(cfg)
    cfg_dict = config_to_dict(cfg)
    cfg_hash = _config_hash(cfg_dict)
    ckpt_dir = run_dir / "checkpoint"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    atomic_write_json(run_dir / "config.json", {**cfg_dict, "versions": _versions(), "config_hash": cfg_hash})
    jlog = JsonlLog(run_dir / "metrics.jsonl", seed=cfg.seed, strategy=cfg.strategy.name)
    t_start = time.time()
    with rng_scope(cfg.seed, resolve_device(cfg.train.device)):
        sess = Session.create(cfg, jlog)
        model, stream, strategy, ctx = sess.model, sess.stream, sess.strategy, sess.ctx
        state: dict[str, Any] = {"R": [], "tra": [], "tra_initial": [], "acc_given_correct_task": [],
                                 "K": [], "trainable": [], "deployed": [], "reference": [], "expandable": None,
                                 "per_task_s": [], "events": []}
        start_task = 0
        if resume and (ckpt_dir / "state.json").exists():
            start_task = load_run_checkpoint(ckpt_dir, model, strategy, state, cfg_hash)
            ctx.events = state["events"]
            log.info("resumed %s after task %d", run_dir, start_task - 1)
            jlog.write("resume", from_task=start_task)
        jlog.write("start", experiment=cfg.experiment, tasks=len(stream), device=str(ctx.device))
        for task in stream.tasks[start_task:]:
            t0 = time.time()
            n_trained = sess.train_task(task)
            ev = sess.evaluate(task.task_id, cfg.eval.future_tasks)
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
            state["per_task_s"].append(time.time() - t0)
            state["events"] = ctx.events
            seen = [x for x in ev["row"][: task.task_id + 1] if x is not None]
            jlog.write("eval", task=task.task_id, **{"test/accuracy_row": ev["row"],
                                                     "test/a_task_mean": float(np.mean(seen)) if seen else None})
            log.info("task %d: accuracy per task %s", task.task_id, [round(a, 2) for a in ev["row"] if a is not None])
            if cfg.train.checkpoint:
                save_run_checkpoint(ckpt_dir, model, strategy, state, task.task_id, cfg_hash)
    result = _finalize(cfg, stream, state, summarize, time.time() - t_start)
    result["config_hash"] = cfg_hash  # sweeps: a result.json is "done" only for the config that wrote it
    atomic_write_json(run_dir / "result.json", result)
    try:
        figures(result, run_dir)
    except Exception as err:  # figures must never lose a finished result
        log.warning("could not draw figures: %s", err)
    jlog.write("end", **{"test/a_last": result["metrics"].get("a_last"), "test/a_avg": result["metrics"].get("a_avg")})
    return result


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


def save_run_checkpoint(ckpt_dir: Path, model: CLModel, strategy: Strategy, state: dict[str, Any], task_id: int,
                     cfg_hash: str) -> None:
    """Atomic task-boundary checkpoint: safetensors (model minus backbone + strategy tensors) + JSON state."""
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta, extra = strategy.state()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tensors.update({f"strategy.{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    tmp = ckpt_dir / ".tensors.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt_dir / "tensors.safetensors")
    atomic_write_json(ckpt_dir / "state.json", {
        "task_done": task_id, "config_hash": cfg_hash, "structure": model.structure(), "strategy": meta,
        "loop": state, "routes": {k: _route_spec(s.route) for k, s in model.sites.items()},
    })


def _route_spec(route: Any) -> dict[str, Any] | None:
    if route.index is not None or route.weights is not None:
        return None  # transient routes are not persisted; strategies set them per forward
    return {"kind": route.kind, "names": list(route.names)}


def load_run_checkpoint(ckpt_dir: Path, model: CLModel, strategy: Strategy, state: dict[str, Any],
                        cfg_hash: str) -> int:
    from safetensors.torch import load_file

    from cl.mixture import Route

    meta = json.loads((ckpt_dir / "state.json").read_text())
    if meta["config_hash"] != cfg_hash:
        raise RuntimeError(f"checkpoint in {ckpt_dir} was written by a different config; rerun without --resume "
                           f"or with the original config")
    tensors = load_file(str(ckpt_dir / "tensors.safetensors"))
    model.load_structure(meta["structure"])
    strategy.rebuild(model, meta["strategy"])
    model_t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_t, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, r in meta["routes"].items():
        if r is not None and key in model.sites:
            model.sites[key].route = Route(r["kind"], tuple(r["names"]))
    strategy.load_state(model, meta["strategy"],
                        {k[len("strategy."):]: v for k, v in tensors.items() if k.startswith("strategy.")})
    state.update(meta["loop"])
    return int(meta["task_done"]) + 1
