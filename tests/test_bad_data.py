"""Bad images and bad splits on generated fixtures: each kind stops with one line (exit 2 in the CLI) when the stream
is built, before anything trains; single-class tasks under a masked loss; exact accuracies."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cl.errors import ConfigError, DataError
from cl.registries import STREAMS
from streams.base import StreamConfig

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat", "dog"]


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                (root / split / name / f"{i}.png").write_bytes(_png(40 * c + i))
    return root


def _build(root: Path, **fields):
    return STREAMS.get("image_folder").build(
        StreamConfig(name="image_folder", root=str(root), increment=2, order_seed=None, **fields), 16)


def _config(tmp_path: Path, root: Path, strategy: str = "simplecil", **stream) -> Path:
    cfg = {"experiment": "bad", "seed": 0, "out": str(tmp_path / "runs"),
           "backbone": {"name": "test_vit", "img_size": 32},
           "stream": {"name": "image_folder", "root": str(root), "increment": 2, "order_seed": None, **stream},
           "strategy": {"name": strategy},
           "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "progress": False, "checkpoint": False}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(capsys, config: Path, *extra: str) -> str:
    from cl.cli import main

    code = main(["run", str(config), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("clsim: error: "), err
    return err


def _nothing_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "bad" / "0"
    assert not (run_dir / "result.json").exists() and not (run_dir / "checkpoint").exists()


def _truncated_png() -> bytes:
    data = _png(7, 32)
    return data[: len(data) // 2]


BAD_FILES = {"truncated": _truncated_png(), "empty": b"", "not_an_image": b"hello, I am text"}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_undecodable_image_stops_when_the_stream_is_built(kind, tmp_path, capsys):
    root = _tree(tmp_path / "data")
    bad = root / "train" / "cat" / "1.png"
    bad.write_bytes(BAD_FILES[kind])
    with pytest.raises(DataError) as err:
        _build(root)  # the header scan runs at build time: nothing has trained
    msg = str(err.value)
    assert msg.startswith(f"cannot decode {bad} (") and msg.endswith(")") and "\n" not in msg
    if kind == "empty":
        assert "empty file" in msg
    line = _cli(capsys, _config(tmp_path, root))
    assert line == f"clsim: error: {msg}"
    _nothing_written(tmp_path)


def test_undecodable_image_exit_code_of_the_process(tmp_path):
    root = _tree(tmp_path / "data")
    bad = root / "test" / "dog" / "0.png"
    bad.write_bytes(_truncated_png())
    proc = subprocess.run([sys.executable, "-m", "cl.cli", "run", str(_config(tmp_path, root))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("clsim: error:")]
    assert lines == [f"clsim: error: cannot decode {bad} (Truncated File Read)"], proc.stderr
    assert "Traceback" not in proc.stderr
    _nothing_written(tmp_path)


def test_unconvertible_mode_names_file_and_mode(tmp_path, capsys):
    """A float image outside [0, 1] passes the header scan (its mode is known) and stops at decoding, one line."""
    root = _tree(tmp_path / "data")
    bad = root / "test" / "ant" / "0.tif"
    Image.fromarray(np.full((8, 8), 500.0, dtype=np.float32)).save(bad)
    (root / "test" / "ant" / "0.png").unlink()
    line = _cli(capsys, _config(tmp_path, root))
    assert line.startswith(f"clsim: error: {bad}: image mode F ")
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("split", "classes", "expected"), [
    ("test", ["cat", "dog"], "task 1 (classes 2 (cat), 3 (dog)) has no test images; looked in {test}"),
    ("train", ["bee"], "task 0 (classes 0 (ant), 1 (bee)) has no train images for class 1 (bee); looked in {train}"),
    ("test", ["ant"], "task 0 (classes 0 (ant), 1 (bee)) has no test images for class 0 (ant); looked in {test}"),
])
def test_task_or_class_without_images_stops_at_build(split, classes, expected, tmp_path, capsys):
    root = _tree(tmp_path / "data")
    for name in classes:
        for f in (root / split / name).iterdir():
            f.unlink()
    where = {"train": f"{root / 'train'}/<class>/", "test": f"{root / 'test'}/<class>/"}
    msg = "image_folder: " + expected.format(**where)
    with pytest.raises(DataError) as err:
        _build(root)
    assert str(err.value) == msg
    assert _cli(capsys, _config(tmp_path, root)) == f"clsim: error: {msg}"
    _nothing_written(tmp_path)


def test_split_sizes_are_logged(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    with caplog.at_level("INFO", logger="streams.base"):
        s = STREAMS.get("image_folder").build(
            StreamConfig(name="image_folder", root=str(root), init_classes=3, increment=2, order_seed=None), 16)
    assert [t.num_classes for t in s.tasks] == [3, 1] and s.meta["task_sizes"] == [3, 1]
    assert "image_folder: 2 tasks of [3, 1] classes" in caplog.text


# --- single-class tasks under a masked loss -------------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "extra", "bad_tasks"), [
    ("finetune", ["strategy.mask_old=true"], [1]),  # 5 classes, B4 Inc2 -> [4, 1]: task 1 has one class
    ("sema", [], [1]),
    ("finetune", [], []),  # CE over every seen class: 5 classes, not degenerate
    ("simplecil", [], []),  # nothing trained
])
def test_single_class_task_under_masked_loss(strategy, extra, bad_tasks, smoke_config):
    from cl.loop import Session

    cfg = smoke_config(f"strategy.name={strategy}", "stream.num_classes=5", "stream.init_classes=4",
                       "stream.increment=2", "stream.train_images_per_class=2", "stream.test_images_per_class=1",
                       *extra)
    if not bad_tasks:
        Session.create(cfg)
        return
    with pytest.raises(ConfigError) as err:
        Session.create(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "task 1 (class " in msg and "identically zero" in msg and strategy in msg


def test_single_class_first_task_without_masking(smoke_config):
    from cl.loop import Session

    cfg = smoke_config("strategy.name=finetune", "stream.num_classes=3", "stream.init_classes=1",
                       "stream.increment=2", "stream.train_images_per_class=2", "stream.test_images_per_class=1")
    with pytest.raises(ConfigError, match=r"task 0 \(class \d+ class_\d+\)"):
        Session.create(cfg)


def test_single_class_task_cli(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    err = _cli(capsys, _config(tmp_path, root, "finetune", init_classes=3), "--set", "strategy.mask_old=true")
    assert "task 1 (class 3 dog)" in err
    _nothing_written(tmp_path)


# --- exact accuracies ------------------------------------------------------------------------------------------------

def test_accuracies_are_exact_fractions(tiny_model, tiny_stream):
    """11 of 12 correct is 91.66666666666667 (100 * 11 / 12 in float64), for accuracy, retrieval and extra rows."""
    from cl.config import TrainConfig
    from cl.loop import RunContext, _evaluate, percent_correct
    from cl.runlog import JsonlLog
    from cl.strategy import Strategy
    from cl.types import Prediction

    test = tiny_stream.tasks[0].test  # 2 classes x 6 images = 12 samples
    assert len(test) == 12
    truth = {test[i][0].numpy().tobytes(): int(test.labels[i]) for i in range(len(test))}
    wrong = test[0][0].numpy().tobytes()

    class AllButOne(Strategy):
        """Predicts every test label (and task) correctly except the first sample's."""

        def __init__(self) -> None:  # no config or context needed: only predict() and the defaults run
            pass

        def predict(self, model, x):
            y = torch.tensor([truth[v.numpy().tobytes()] ^ (v.numpy().tobytes() == wrong) for v in x.cpu()])
            logits = torch.nn.functional.one_hot(y, 6).float()
            return Prediction(logits, task_pred=torch.where(y < 2, 0, 1), extras={"head_pred": y})

    ctx = RunContext(TrainConfig(eval_batch_size=5, progress=False), torch.device("cpu"), 0, JsonlLog(None))
    ev = _evaluate(tiny_model, AllButOne(), tiny_stream, 0, ctx, future=False)
    assert ev["row"] == [91.66666666666667] and ev["extra_rows"]["head_pred"] == [91.66666666666667]
    assert ev["tra_row"] == [100.0] and ev["acc_given_correct_task"] == 91.66666666666667
    hits = torch.tensor([True] * 11 + [False])
    assert percent_correct(hits) == 91.66666666666667 == 100 * 11 / 12
    assert percent_correct(torch.tensor([], dtype=torch.bool)) is None

    from evaluation.metrics import acc_given_correct_task, task_retrieval_accuracy, task_retrieval_per_task

    true, pred = [0] * 12, [0] * 11 + [1]
    assert task_retrieval_accuracy(true, pred) == 91.66666666666667
    assert task_retrieval_per_task(true, pred, 1) == [91.66666666666667]
    assert acc_given_correct_task([0] * 13, [0] * 12 + [1], [True] * 11 + [False, True]) == 91.66666666666667
