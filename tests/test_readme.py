"""The README is followed literally: its "Adding a strategy" example runs, and the files and links it names exist."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

import cl.loop as loop
from cl.registries import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_adding_a_strategy_example_runs_as_written(smoke_config):
    blocks = re.findall(r"```python\n(.*?)```", _section("Adding a strategy"), re.S)
    assert len(blocks) == 1, "the section should hold exactly one python example"
    module = types.ModuleType("strategies.my_method")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(blocks[0], "README.md#adding-a-strategy", "exec"), module.__dict__)
        assert "my_method" in STRATEGIES
        cfg = smoke_config("strategy.name=my_method", "strategy.epochs=1")
        with loop.rng_scope(cfg.seed, torch.device("cpu")):
            sess = loop.Session.create(cfg)
            before = {k: v.clone() for k, v in sess.model.backbone.state_dict().items()}
            for task in sess.stream.tasks:
                sess.train_task(task)
                row = sess.evaluate(task.task_id)["row"]
        assert len(row) == len(sess.stream.tasks)
        assert all(torch.equal(v, sess.model.backbone.state_dict()[k]) for k, v in before.items())
        names = {name for site in sess.model.sites.values() for name in site.adapters}
        assert names == {f"t{i:03d}" for i in range(len(sess.stream.tasks))}  # one adapter set per task, as written
    finally:
        STRATEGIES._items.pop("my_method", None)
        sys.modules.pop(module.__name__, None)


def test_files_and_links_named_in_the_docs_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for path in set(re.findall(r"\b((?:configs|scripts|benchmarks|docs)/[\w./-]+\.(?:yaml|sh|py|md))\b", text)):
            if "*" not in path and "{" not in path and not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for link in re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", text):
            if not (doc.parent / link).exists():
                missing.append(f"{doc.name}: link {link}")
    assert not missing, missing
