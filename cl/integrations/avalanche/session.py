"""The bridge's clsim session and its checkpoints: :class:`_SessionBox` pickles the session as a clsim
task-boundary checkpoint (no backbone unless user-given) and rebuilds it on load (see
:mod:`cl.integrations.avalanche`)."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

with warnings.catch_warnings():  # avalanche warns at import that the optional QP solver (GEM) is missing
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

from cl.backbone import adopt_backbone
from cl.config import ExperimentConfig
from cl.context import resolve_device, rng_scope
from cl.errors import DataError
from cl.loop import Session, load_run_checkpoint, save_run_checkpoint

if TYPE_CHECKING:
    from cl.integrations.avalanche.strategy import ClsimStrategy

__all__ = ["save_clsim_checkpoint", "load_clsim_checkpoint"]


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
