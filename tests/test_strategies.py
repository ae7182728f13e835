"""Contract tests over every registered strategy (smoke config + the strategy's ``smoke`` overrides)."""

from __future__ import annotations

import json

import pytest
import torch

import cl.loop as loop
from cl.registries import STRATEGIES

NAMES = STRATEGIES.names()


def _overrides(name: str, *extra: str) -> list[str]:
    cls = STRATEGIES.get(name)
    sets = [f"strategy.name={name}"]
    sets += [f"strategy.{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in cls.smoke.items()]
    return [*sets, *extra]


@pytest.mark.parametrize("name", NAMES)
def test_strategy_runs_and_keeps_backbone_bit_identical(name, smoke_config):
    cfg = smoke_config(*_overrides(name))
    with loop.rng_scope(cfg.seed, torch.device("cpu")):
        sess = loop.Session.create(cfg)
        before = {k: v.clone() for k, v in sess.model.backbone.state_dict().items()}
        rows = []
        for task in sess.stream.tasks:
            sess.train_task(task)
            rows.append(sess.evaluate(task.task_id)["row"])
    after = sess.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in sess.model.backbone.parameters())
    assert [len(r) for r in rows] == [1, 2, 3]
    assert all(0.0 <= a <= 100.0 for r in rows for a in r)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name, smoke_config, tmp_path):
    a = loop.run(smoke_config(*_overrides(name, f"out={tmp_path}/a")))
    b = loop.run(smoke_config(*_overrides(name, f"out={tmp_path}/b")))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["metrics"] == b["metrics"]
    R = a["accuracy_matrix"]
    assert len(R) == 3 and all(R[i][j] is None for i in range(3) for j in range(i + 1, 3))
    run_dir = tmp_path / "a" / f"smoke_{name}" / "0"
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["metrics"] == a["metrics"]
    assert {"config.json", "metrics.jsonl", "result.json", "forgetting_curve.png", "accuracy_matrix.png"} <= {
        p.name for p in run_dir.iterdir()}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert "git_sha" in cfg["versions"] and cfg["strategy"]["name"] == name


def test_baselines_order_forgetting(smoke_config, tmp_path):
    """On a stream where old classes stay learnable, finetune forgets; simplecil and joint do not."""
    sets = ["stream.train_images_per_class=30", "train.epochs=4", "train.optimizer=adamw", "train.lr=0.003"]
    res = {n: loop.run(smoke_config(f"strategy.name={n}", f"out={tmp_path}", *sets))["metrics"]
           for n in ("finetune", "simplecil", "joint")}
    assert res["finetune"]["forgetting"] > res["joint"]["forgetting"] + 20
    assert res["finetune"]["forgetting"] > res["simplecil"]["forgetting"] + 20
    assert res["finetune"]["a_last"] < res["joint"]["a_last"]
    assert res["finetune"]["a_last"] < res["simplecil"]["a_last"]


def test_interrupted_run_resumes_to_the_same_result(smoke_config, tmp_path, interrupt_run):
    full = loop.run(smoke_config("strategy.name=finetune", f"out={tmp_path}/full"))
    cfg = smoke_config("strategy.name=finetune", f"out={tmp_path}/cut")
    interrupt_run(cfg, 2)
    run_dir = loop.run_dir_of(cfg)
    assert not (run_dir / "result.json").exists() and (run_dir / "checkpoint" / "task_001" / "manifest.json").exists()
    resumed = loop.run(cfg, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["metrics"] == full["metrics"]
    with pytest.raises(RuntimeError, match="different config"):
        loop.run(smoke_config("strategy.name=finetune", f"out={tmp_path}/cut", "train.lr=0.5"), resume=True)


def test_bf16_autocast_runs(smoke_config, tmp_path):
    res = loop.run(smoke_config("strategy.name=finetune", f"out={tmp_path}", "train.bf16=true", "train.epochs=1"))
    assert len(res["accuracy_matrix"]) == 3


def test_progress_bars_do_not_change_results(smoke_config, tmp_path):
    quiet = loop.run(smoke_config("strategy.name=finetune", f"out={tmp_path}/a", "train.progress=false"))
    shown = loop.run(smoke_config("strategy.name=finetune", f"out={tmp_path}/b", "train.progress=true"))
    assert quiet["accuracy_matrix"] == shown["accuracy_matrix"]


def _one_epoch_sets(name: str) -> list[str]:
    """``strategy.<field>=1`` for every epoch-count field of the strategy's config (nothing else changes)."""
    import dataclasses
    import re

    cfg_cls = STRATEGIES.get(name).config_cls
    return [f"strategy.{f.name}=1" for f in dataclasses.fields(cfg_cls)
            if re.fullmatch(r"(.+_)?epochs?", f.name) and type(f.default) is int]  # not flags (eval_every_epoch)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_config_runs_every_strategy_with_its_defaults(name, tmp_path, capsys):
    """configs/smoke.yaml's promise: ``--set strategy.name=<name>`` runs, with the strategy's own defaults (no
    ``smoke`` overrides; only epoch counts and the stream are shrunk), so defaults that do not fit the 6-block test
    ViT (SEMA's blocks 9-11 once) fail here."""
    from cl.cli import main
    from tests.conftest import SMOKE

    sets = [f"strategy.name={name}", f"out={tmp_path}", "train.epochs=1", "stream.train_images_per_class=8",
            "stream.test_images_per_class=4", *_one_epoch_sets(name)]
    assert main(["run", str(SMOKE), *[x for s in sets for x in ("--set", s)]]) == 0, capsys.readouterr().err
    assert (tmp_path / f"smoke_{name}" / "0" / "result.json").exists()
