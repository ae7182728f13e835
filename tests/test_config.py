"""Strict configuration: unknown keys and names fail with one line naming the valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cl.config import ConfigError, apply_overrides, load_config
from cl.registry import Registry, RegistryError
from tests.conftest import SMOKE


def test_smoke_config_loads_with_typed_sections():
    cfg = load_config(SMOKE)
    assert cfg.backbone.name == "test_vit"
    assert cfg.stream.name == "synthetic" and cfg.stream.num_classes == 6
    assert cfg.experiment == "smoke_finetune"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'; valid keys for train: batch_size"),
        ("strategy.name=nope", "unknown strategy 'nope'"),
        ("stream.name=cifar10", "unknown stream 'cifar10'"),
        ("train.optimizer=lion", "valid choices: sgd, adam, adamw"),
        ("train.epochs=two", "train.epochs must be an integer"),
        ("bogus.key=1", "unknown section 'bogus'"),
        ("stream.increment=0", "stream.increment must be positive"),
        ("seed=4294967296", "seed must be in [0, 4294967295]"),  # bounds in full, not 4.29497e+09
    ],
)
def test_bad_config_fails_with_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_literals():
    d = apply_overrides({"train": {"lr": 1}}, ["train.lr=1e-3", "stream.class_order=[1,0]", "train.bf16=true"])
    assert d["train"]["lr"] == 1e-3 and d["stream"]["class_order"] == [1, 0] and d["train"]["bf16"] is True
    cfg = load_config(SMOKE, ["train.lr=1e-3", "stream.class_order=[5,4,3,2,1,0]"])
    assert cfg.train.lr == 1e-3 and cfg.stream.class_order == (5, 4, 3, 2, 1, 0)


def test_registry_strictness():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha_one", 1)
    with pytest.raises(RegistryError, match="duplicate"):
        reg.add("alpha_one", 2)
    with pytest.raises(ValueError, match="snake_case"):
        reg.add("Alpha", 3)
    with pytest.raises(RegistryError, match="did you mean alpha_one"):
        reg.get("alpha_on")
    with reg.temporary("beta", 2):
        assert reg.names() == ["alpha_one", "beta"]
    assert "beta" not in reg


def test_cli_exit_code_2_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cl.cli", "run", str(SMOKE), "--set", "train.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("clsim: error: unknown key 'train.lrr'")
    cfg = tmp_path / "cub.yaml"
    cfg.write_text(f"backbone: {{name: test_vit, img_size: 32}}\nstream: {{name: cub, root: {tmp_path}}}\n"
                   f"out: {tmp_path}/runs\n")
    proc = subprocess.run([sys.executable, "-m", "cl.cli", "run", str(cfg)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def test_cli_report_without_runs_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cl.cli", "report", str(tmp_path / "none"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no result.json found" in proc.stderr and "Traceback" not in proc.stderr
