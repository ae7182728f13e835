"""Crash drill, run-folder locks, resume semantics, numeric faults, file permissions (issue 9).

The drill kills real ``clsim run`` processes with SIGKILL inside every write of a task boundary (each checkpoint
file, the rename, the pruning of old boundaries, ``metrics.jsonl`` appends, ``result.json``, ``config.json``) through
the ``CLSIM_FAULT`` injection point (:mod:`cl.faults`), resumes each, and requires the uninterrupted run's exact
accuracy matrix and metrics plus a parseable log with one evaluation record per task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cl.loop as loop
from cl.cli import main
from cl.errors import NumericalError, RunFolderError
from cl.registries import STRATEGIES
from cl.runlock import LOCK_NAME, RunLock
from strategies.finetune import FinetuneStrategy
from strategies.simplecil import SimplecilStrategy
from tests.conftest import ROOT, SMOKE

TINY = ["strategy.name=finetune", "train.epochs=1", "stream.train_images_per_class=8", "stream.test_images_per_class=4"]


def _sets(out: Path, *extra: str) -> list[str]:
    return [f"--set={s}" for s in (*TINY, f"out={out}", *extra)]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _spawn(out: Path, fault: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "CLSIM_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "cl.cli", "run", str(SMOKE), *_sets(out), *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# kill point -> what a resume must find (each is the n-th time the point is reached in the killed process)
DRILL = {
    "config@1": "torn config.json before any boundary",
    "checkpoint.tensors@1": "first boundary torn: nothing to resume, starts fresh",
    "checkpoint.tensors@2": "second boundary torn in its tensors",
    "checkpoint.state@2": "second boundary torn in its state",
    "checkpoint.manifest@2": "second boundary torn in its manifest",
    "checkpoint.rename@2": "second boundary complete but not yet renamed",
    "checkpoint.prune@1": "third boundary renamed, the oldest half-deleted",
    "metrics@4": "torn train_epoch record of task 1",
    "metrics@5": "torn eval record of task 1 (before its boundary)",
    "result@1": "torn result.json after the last boundary",
    "metrics@8": "torn 'end' record after result.json",
}


# One process pays the imports, then forks one ``clsim run`` child per kill point (no torch work happens before the
# fork, so no thread pool is duplicated); each child sets CLSIM_FAULT and runs ``cl.cli.main``. Prints wait statuses.
_ZYGOTE = """
import json, os, sys
import timm  # noqa: F401  (timm pulls torchvision and torch._dynamo: seconds of imports, paid once here)
from cl.cli import main
from cl.plugins import load_builtin
load_builtin()
jobs, status = json.loads(sys.argv[1]), {}
for i in range(0, len(jobs), 2):
    pids = {}
    for point, argv in jobs[i:i + 2]:
        pid = os.fork()
        if pid == 0:
            os.environ["CLSIM_FAULT"] = point
            os.close(1)
            os._exit(main(argv))
        pids[pid] = point
    for pid, point in pids.items():
        status[point] = os.waitpid(pid, 0)[1]
print(json.dumps(status))
"""


def _kill_all(points: list[str], tmp_path: Path) -> None:
    """Run one killed ``clsim run`` process per point (forked from one parent that imported everything once)."""
    jobs = [[p, ["run", str(SMOKE), *_sets(tmp_path / p.replace("@", "_"))]] for p in points]
    proc = subprocess.run([sys.executable, "-c", _ZYGOTE, json.dumps(jobs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    for point in points:
        st = status[point]
        assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL, f"{point}: not killed ({st})"


def test_kill_drill_every_boundary_write_resumes_exactly(tmp_path, capsys):
    """SIGKILL inside every write of a task boundary; every resume reaches the uninterrupted run's exact metrics."""
    ref_out = tmp_path / "reference"
    assert main(["run", str(SMOKE), *_sets(ref_out)]) == 0
    ref = json.loads(next(ref_out.glob("*/0/result.json")).read_text())
    _kill_all(list(DRILL), tmp_path)
    for point in DRILL:
        out = tmp_path / point.replace("@", "_")
        run_dir = next(out.glob("*/0"))
        assert main(["run", str(SMOKE), *_sets(out), "--resume"]) == 0, f"{point}: resume failed"
        res = json.loads((run_dir / "result.json").read_text())
        assert res["accuracy_matrix"] == ref["accuracy_matrix"], point
        assert res["metrics"] == ref["metrics"], point
        assert res["events"] == ref["events"], point
        recs = _records(run_dir)  # every line parses
        assert [r["task"] for r in recs if r["event"] == "eval"] == [0, 1, 2], point
        assert [r["event"] for r in recs].count("end") == 1, point
        assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], point
        assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["task_001", "task_002"], point
        assert not (run_dir / LOCK_NAME).exists(), point
    capsys.readouterr()


def test_corrupt_newest_boundary_falls_back_with_a_logged_reason(smoke_config, tmp_path):
    cfg = smoke_config(*TINY, f"out={tmp_path}")
    full = loop.run(cfg)
    run_dir = loop.run_dir_of(cfg)
    tensors = run_dir / "checkpoint" / "task_002" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the weights: only the manifest's hash can tell
    tensors.write_bytes(bytes(data))
    (run_dir / "result.json").unlink()
    resumed = loop.run(cfg, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and resumed["metrics"] == full["metrics"]
    recs = _records(run_dir)
    rejected = [r for r in recs if r["event"] == "checkpoint_rejected"]
    assert len(rejected) == 1 and rejected[0]["task_done"] == 2 and "differs from the manifest" in rejected[0]["reason"]
    resume = [r for r in recs if r["event"] == "resume"]
    assert resume[-1]["from_task"] == 2 and resume[-1]["checkpoint"] == "task_001"
    assert [r["task"] for r in recs if r["event"] == "eval"] == [0, 1, 2]  # task 2's first eval was dropped


def test_resume_with_a_changed_config_names_the_keys_and_writes_nothing(smoke_config, tmp_path, capsys):
    cfg = smoke_config(*TINY, f"out={tmp_path}")
    loop.run(cfg)
    run_dir = loop.run_dir_of(cfg)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc = main(["run", str(SMOKE), *_sets(tmp_path, "train.lr=0.5", "stream.difficulty=0.3"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("clsim: error: ") and "different config" in err[-1]
    assert "train.lr: 0.005 -> 0.5" in err[-1] and "stream.difficulty: 0.2 -> 0.3" in err[-1]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # progress bars and worker counts may change on resume
    assert main(["run", str(SMOKE), *_sets(tmp_path, "train.progress=true"), "--resume"]) == 0


def test_resume_without_checkpoint_starts_fresh_and_says_so(smoke_config, tmp_path, caplog):
    cfg = smoke_config(*TINY, f"out={tmp_path}", "train.checkpoint=false")
    with caplog.at_level("INFO", logger="cl.runfolder"):
        res = loop.run(cfg, resume=True)
    assert "no usable checkpoint" in caplog.text and "starting fresh" in caplog.text
    recs = _records(loop.run_dir_of(cfg))
    assert recs[0]["event"] == "resume" and recs[0]["from_task"] == 0
    assert len(res["accuracy_matrix"]) == 3


def test_two_runs_on_one_folder_second_refuses_then_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "runs"
    first = _spawn(out, "checkpoint.tensors@1:stop")  # stops itself (SIGSTOP) mid-run, holding the lock
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run did not reach its stop point"
        second = subprocess.run([sys.executable, "-m", "cl.cli", "run", str(SMOKE), *_sets(out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("clsim: error: ") and "locked by a running clsim run" in line
        assert f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    run_dir = next(out.glob("*/0"))
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid  # left behind by the killed holder
    assert main(["run", str(SMOKE), *_sets(out)]) == 0
    capsys.readouterr()
    taken = [r for r in _records(run_dir) if r["event"] == "lock_taken_over"]
    assert taken and taken[0]["previous"]["pid"] == first.pid
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_release_the_lock_and_resume_exactly(sig, code, word, tmp_path, capsys):
    """A run stopped by SIGTERM (kill, SLURM preemption) or Ctrl-C exits with one line, leaves no lock behind and
    resumes to the uninterrupted run's numbers (SIGTERM used to exit 143 silently, leaving a stale lock)."""
    out = tmp_path / "runs"
    proc = _spawn(out, "metrics@5:stop")  # stops itself after the first task boundary, holding the lock
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the run did not reach its stop point"
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, status = os.waitpid(proc.pid, 0)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code, (status, stderr[-2000:])
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(f"clsim: {word} ")
    run_dir = next(out.glob("*/0"))
    assert not (run_dir / LOCK_NAME).exists()
    assert main(["run", str(SMOKE), *_sets(out), "--resume"]) == 0
    assert not [r for r in _records(run_dir) if r["event"] == "lock_taken_over"]
    assert main(["run", str(SMOKE), *_sets(tmp_path / "whole")]) == 0
    capsys.readouterr()
    resumed = json.loads((run_dir / "result.json").read_text())
    whole = json.loads(next((tmp_path / "whole").glob("*/0/result.json")).read_text())
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["metrics"] == whole["metrics"]


def test_lock_in_process_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(RunFolderError, match="locked by a running clsim run"):
            RunLock(tmp_path / "r").acquire()
    with RunLock(tmp_path / "r") as lock:  # released: free again, no stale holder
        assert lock.took_over is None


def test_output_files_respect_the_umask(smoke_config, tmp_path):
    old = os.umask(0o022)
    try:
        cfg = smoke_config(*TINY, f"out={tmp_path}")
        loop.run(cfg)
    finally:
        os.umask(old)
    run_dir = loop.run_dir_of(cfg)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"result.json", "config.json", "metrics.jsonl", "manifest.json"} <= {p.name for p in files}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files), {p.name: oct(p.stat().st_mode) for p in files}


class _NanLossAtTask1(FinetuneStrategy):
    def loss(self, model, batch, phase):
        out = super().loss(model, batch, phase)
        if batch.task_id == 1:
            out.loss = out.loss * float("nan")
        return out


class _NanPredictions(SimplecilStrategy):
    def predict(self, model, x):
        logits = super().predict(model, x)
        return torch.where(torch.arange(len(x)).unsqueeze(1) == 1, torch.nan, logits)


@pytest.mark.parametrize(
    ("name", "cls", "extra", "phase", "needle"),
    [
        ("nan_loss_at_task1", _NanLossAtTask1, [], "adapters", "non-finite training loss"),
        ("nan_predictions", _NanPredictions, [], "eval", "non-finite predictions"),
        ("finetune", None, ["train.loss_limit=0.001"], "adapters", "beyond train.loss_limit"),
    ],
)
def test_numeric_faults_stop_at_the_last_good_boundary(tmp_path, capsys, name, cls, extra, phase, needle):
    out = tmp_path / "runs"
    argv = ["run", str(SMOKE), *_sets(out, f"strategy.name={name}", "experiment=nf", *extra)]
    if cls is not None:
        with STRATEGIES.temporary(name, cls):
            rc = main(argv)
    else:
        rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("clsim: error: ") and needle in err[-1]
    run_dir = out / "nf" / "0"
    fault = [r for r in _records(run_dir) if r["event"] == "numerical_fault"]
    assert len(fault) == 1 and fault[0]["phase"] == phase and {"task", "epoch", "step"} <= set(fault[0])
    expected_task = 1 if name == "nan_loss_at_task1" else 0
    assert fault[0]["task"] == expected_task and not (run_dir / "result.json").exists()
    boundaries = sorted(p.name for p in (run_dir / "checkpoint").iterdir()) if (run_dir / "checkpoint").exists() else []
    assert boundaries == [f"task_{t:03d}" for t in range(expected_task)]


def test_numeric_fault_is_a_numerical_error_in_the_library(smoke_config, tmp_path):
    with pytest.raises(NumericalError, match="beyond train.loss_limit"):
        loop.run(smoke_config(*TINY, f"out={tmp_path}", "train.loss_limit=0.001"))


def test_fault_points_fire_only_at_the_named_point_and_occurrence(monkeypatch):
    from cl import faults

    monkeypatch.setenv("CLSIM_FAULT", "metrics@3")
    monkeypatch.setattr(faults, "_counts", {})
    fired = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: fired.append(sig))
    for _ in range(5):
        faults.fault_point("checkpoint.tensors")
    assert not fired
    for _ in range(4):
        faults.fault_point("metrics")
    assert fired == [signal.SIGKILL]
    monkeypatch.setenv("CLSIM_FAULT", "result@1:stop")
    faults.fault_point("result")
    assert fired == [signal.SIGKILL, signal.SIGSTOP]


def test_pretrained_without_a_connection_fails_before_any_download(monkeypatch):
    """No hub retries: an unreachable host (cheap probe) refuses ``pretrained: true`` before timm is asked."""
    import socket

    import timm

    from cl.backbone import BackboneConfig, BackboneError, create_backbone

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("timm.create_model must not be reached")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # not cached here
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(BackboneError, match="backbone.pretrained: could not download") as err:
        create_backbone(BackboneConfig(name="test_vit", pretrained=True))
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_masked_logits_are_not_numeric_faults():
    """-inf marks a class a strategy rules out (MHR's task scope); NaN, +inf or a row without a finite score is one."""
    from cl.numerics import LogitWatch
    from cl.runlog import JsonlLog

    inf = float("inf")
    watch = LogitWatch()
    watch.observe(torch.tensor([[0.5, -inf, 1.0], [-inf, -inf, 0.0]]))
    watch.check(JsonlLog(None), task=1)
    for bad in ([[0.5, float("nan"), 1.0]], [[inf, 0.0, 0.0]], [[-inf, -inf, -inf]]):
        watch.observe(torch.tensor([[0.0, 1.0, 2.0]]))
        watch.observe(torch.tensor(bad))
        with pytest.raises(NumericalError, match="non-finite predictions.*step 1"):
            watch.check(JsonlLog(None), task=1)
