"""The one-line run summary of ``clsim run``: undefined metrics (``null`` in result.json) print as ``—``, not 0."""

from __future__ import annotations

import json

from cl.cli import format_metric, main
from tests.conftest import SMOKE


def test_format_metric():
    assert format_metric(None) == "—"
    assert format_metric(0.0) == "0.00"
    assert format_metric(12.345) == "12.35"


def test_run_summary_prints_dash_for_undefined_forgetting(tmp_path, capsys):
    """One task: forgetting is undefined (null), and the summary must not pretend it is 0.00."""
    out = tmp_path / "runs"
    code = main(["run", str(SMOKE), "--set", f"out={out}", "--set", "stream.num_classes=2",
                 "--set", "stream.train_images_per_class=4", "--set", "stream.test_images_per_class=2",
                 "--set", "train.epochs=1"])
    assert code == 0
    result = json.loads(next(out.rglob("result.json")).read_text())
    assert result["metrics"]["forgetting"] is None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "forgetting —" in line and "forgetting 0.00" not in line
