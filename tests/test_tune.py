"""``clsim tune``: the validation protocol (first k tasks, held-out training samples, test sets never read), the tune
file's validation. One search on Ray Tune runs in tests/test_sweep_ray.py (its Ray session)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.cli import main
from cl.config import ConfigError, load_config
from cl.tune import held_out_stream, load_tune, validation_protocol

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = {"train.epochs": 1, "stream.train_images_per_class": 10, "stream.test_images_per_class": 2,
        "train.progress": False}


def test_held_out_stream_splits_each_class_of_the_first_tasks(tiny_stream) -> None:
    held = held_out_stream(tiny_stream, 2, 0.25, seed=0)
    assert len(held) == 2 and held.num_classes == 4
    for task, orig in zip(held.tasks, tiny_stream.tasks, strict=False):
        train, val = task.train, task.test
        assert set(train.positions.tolist()).isdisjoint(val.positions.tolist())
        assert len(train) + len(val) == len(orig.train)
        for label in task.labels:  # 12 images per class: 3 held out, 9 kept
            assert int((val.labels == label).sum()) == 3 and int((train.labels == label).sum()) == 9
        x, y = val[0]
        x_ref, y_ref = orig.train.view("eval")[int(val.positions[0])]
        assert y == y_ref and torch.equal(x, x_ref)  # validation samples are read with the eval transform
        assert val.deterministic and val.view("train").base.deterministic == orig.train.deterministic
    again = held_out_stream(tiny_stream, 2, 0.25, seed=0)
    assert np.array_equal(again.tasks[1].test.positions, held.tasks[1].test.positions)
    with pytest.raises(ConfigError, match="protocol.tasks=4"):
        held_out_stream(tiny_stream, 4, 0.25, seed=0)


class _NeverRead(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        raise AssertionError("a test set was read during tuning")


def test_validation_protocol_never_reads_test_sets(monkeypatch) -> None:
    import cl.loop

    build = cl.loop.build_model_and_stream

    def poisoned(cfg, device):
        model, stream = build(cfg, device)
        for task in stream.tasks:
            task.test = _NeverRead()
        return model, stream

    monkeypatch.setattr(cl.loop, "build_model_and_stream", poisoned)
    cfg = load_config(SMOKE, [f"{k}={v!r}" for k, v in TINY.items()])
    reports: list[dict] = []
    metrics = validation_protocol(cfg, tasks=2, val_fraction=0.2, report=reports.append)
    assert [r["task"] for r in reports] == [1, 2]
    assert metrics["task"] == 2 and len(metrics["accuracy_matrix"]) == 2
    assert metrics["a_avg"] == pytest.approx((reports[0]["a_last"] + reports[1]["a_last"]) / 2)


def _tune_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(f"base: {SMOKE}\nset: {json.dumps(TINY)}\nout: {tmp_path / 'tune'}\n{body}")
    return path


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("space: {train.lrr: {uniform: [0.1, 1.0]}}\n", "train.lrr"),
        ("space: {train.lr: {normal: [0.1, 1.0]}}\n", "space.train.lr"),
        ("space: {train.lr: {loguniform: [0.0, 1.0]}}\n", "space.train.lr.loguniform"),
        ("space: {train.lr: {uniform: [1.0]}}\n", "space.train.lr.uniform"),
        ("space: {seed: {choice: [0, 1]}}\n", "space.seed"),
        ("space: {train.lr: {choice: [0.1]}}\nmetric: accuracy\n", "metric"),
        ("space: {train.lr: {choice: [0.1]}}\nprotocol: {tasks: 0}\n", "protocol.tasks"),
        ("space: {train.lr: {choice: [0.1]}}\nprotocol: {val_fraction: 1.5}\n", "protocol.val_fraction"),
        ("space: {train.lr: {choice: [0.1]}}\nscheduler: asha\n", "scheduler"),
        ("space: {train.batch_size: {choice: [0, 8]}}\n", "train.batch_size"),
    ],
)
def test_bad_tune_files_fail_in_one_line(tmp_path: Path, body: str, named: str, capsys) -> None:
    path = _tune_file(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_tune(path)
    assert named in str(err.value)
    assert main(["tune", str(path), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clsim: error: ") and named in lines[0]
    assert not (tmp_path / "tune").exists()


def test_tune_dry_run_states_the_protocol(tmp_path: Path, capsys) -> None:
    path = _tune_file(tmp_path, "space: {train.lr: {loguniform: [0.001, 0.1]}}\nprotocol: {tasks: 2}\n")
    assert main(["tune", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "first 2 tasks" in out and "test sets never read" in out and "train.lr: loguniform" in out
