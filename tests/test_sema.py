"""SEMA mechanism tests (specs/sema.md section 13 item 10) on timm's random ``test_vit`` and the synthetic stream.

The random backbone does not separate the synthetic stream's style domains (their RD z-scores stay below those of
new classes from the base domain), so the shifted-domain test darkens one task's images (a global photometric
shift, z of about 13 against about 1 for new base-domain classes); the threshold 3 sits far from both.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cl.config import ConfigError, build_dataclass, load_config
from cl.loop import Session, run
from cl.types import Task, ViewableDataset
from strategies._sema_parts import RepresentationDescriptor, descriptor_errors, layer_fires, z_scores
from strategies.sema import SemaConfig, SemaStrategy
from streams.synthetic import SyntheticConfig, build_synthetic

BLOCKS = (3, 4, 5)
FAST = [
    "strategy.name=sema", f"strategy.expandable_blocks={BLOCKS}", "strategy.func_epoch=1", "strategy.rd_epoch=6",
    "strategy.rd_dim=8", "strategy.buffer_size=48", "strategy.exp_threshold=3.0", "strategy.batch_size=16",
    "strategy.detect_batch_size=32", "strategy.init_lr=0.01", "strategy.rd_lr=0.05", "train.progress=false",
    "train.checkpoint=false",
]


class Darkened(ViewableDataset):
    """A task's images scaled by 0.3: a domain shift the random test_vit sees clearly."""

    def __init__(self, base: ViewableDataset) -> None:
        self.base = base
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (x.float() * 0.3).to(torch.uint8), y

    def view(self, kind):
        return Darkened(self.base.view(kind))


def shifted_stream():
    """3 tasks x 2 classes: task 2 darkened (shifted domain), task 3 from the base domain like task 1."""
    stream = build_synthetic(SyntheticConfig(num_classes=6, increment=2, train_images_per_class=24,
                                             test_images_per_class=6, difficulty=0.2), 32)
    t = stream.tasks[1]
    stream.tasks[1] = Task(t.task_id, t.class_ids, t.labels, Darkened(t.train), Darkened(t.test))
    return stream


def session(smoke_config, *overrides: str, stream=None) -> Session:
    torch.manual_seed(0)
    return Session.create(smoke_config(*FAST, *overrides), stream=stream)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def router(model, block: int):
    return model.sites[f"blocks_{block}"].router


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """Train the shifted stream task by task, keeping a snapshot after each task (shared by several tests)."""
    cfg = load_config("configs/smoke.yaml", [f"out={tmp_path_factory.mktemp('runs')}", *FAST])
    torch.manual_seed(0)
    sess = Session.create(cfg, stream=shifted_stream())
    snaps, routers = [], []
    for task in sess.stream.tasks:
        sess.train_task(task)
        snaps.append(snapshot(sess.model))
        routers.append({b: router(sess.model, b).weight.shape[0] for b in BLOCKS})
    return sess, snaps, routers


# --- pure pieces ----------------------------------------------------------------------------------------------------
def test_config_validation(smoke_config) -> None:
    with pytest.raises(ConfigError, match="expandable_blocks"):
        build_dataclass(SemaConfig, {"name": "sema", "expandable_blocks": [3, 3]}, "strategy")
    with pytest.raises(ConfigError, match="z_score"):
        build_dataclass(SemaConfig, {"name": "sema", "z_score": "two_sided"}, "strategy")
    with pytest.raises(ConfigError, match=r"out of range: the backbone has blocks 0\.\.5"):
        Session.create(smoke_config("strategy.name=sema", "strategy.expandable_blocks=[9, 10, 11]"))
    sess = Session.create(smoke_config("strategy.name=sema"))  # the default: the backbone's last three blocks
    assert sess.strategy.cfg.expandable_blocks == (3, 4, 5)


def test_buffer_is_a_fifo_and_stops_when_frozen() -> None:
    rd = RepresentationDescriptor(4, 2, capacity=5)
    assert rd.stats()[2] == 0
    rd.record(torch.tensor([1.0, 2.0, 3.0]))
    assert rd.values().tolist() == [1.0, 2.0, 3.0]
    rd.record(torch.tensor([4.0, 5.0, 6.0]))
    assert rd.values().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    rd.record(torch.arange(10.0, 17.0))  # more than the capacity at once
    assert rd.values().tolist() == [12.0, 13.0, 14.0, 15.0, 16.0]
    mean, std, n = rd.stats()
    assert (mean, n) == (14.0, 5) and std == pytest.approx(torch.arange(12.0, 17.0).std(unbiased=True).item())
    rd.freeze()
    rd.record(torch.tensor([100.0]))
    assert rd.values().tolist() == [12.0, 13.0, 14.0, 15.0, 16.0] and not any(p.requires_grad for p in rd.parameters())


def test_descriptor_errors_match_per_module_loop() -> None:
    torch.manual_seed(0)
    rds = [RepresentationDescriptor(8, 3, 10) for _ in range(3)]
    u = torch.randn(5, 8)
    ref = torch.stack([((r.decoder(r.encoder(u)) - u) ** 2).mean(-1) for r in rds])
    torch.testing.assert_close(descriptor_errors(rds, u), ref)


def test_z_scores_abs_upper_and_small_buffers() -> None:
    errors = torch.tensor([[1.0, 5.0], [1.0, 5.0]])
    stats = [(3.0, 2.0, 10), (3.0, 2.0, 2)]  # the second descriptor has only 2 records -> z = 0
    assert z_scores(errors, stats, "abs").tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert z_scores(errors, stats, "upper").tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert layer_fires(torch.tensor([2.5, 2.01]), 2.0) and not layer_fires(torch.tensor([2.5, 2.0]), 2.0)


# --- detection ------------------------------------------------------------------------------------------------------
def _set_buffer(rd: RepresentationDescriptor, mean: float, std: float) -> None:
    """Buffer (mean - std, mean, mean + std): mean ``mean``, unbiased std ``std``, 3 records."""
    rd.errors.zero_()
    rd.num_recorded.zero_()
    rd.record(torch.tensor([mean - std, mean, mean + std]))


def _batch_errors(sess: Session, x: torch.Tensor, block: int) -> torch.Tensor:
    cap = {}
    handle = sess.model.backbone.blocks[block].norm2.register_forward_pre_hook(
        lambda _m, a: cap.__setitem__("u", a[0].float().mean(1)))
    with torch.no_grad():
        sess.model.eval()
        sess.model.features(x)
    handle.remove()
    return descriptor_errors(sess.strategy.rds(sess.model, block), cap["u"])


@pytest.mark.parametrize("margin", [-0.01, 0.01])
def test_threshold_respected(smoke_config, margin: float) -> None:
    sess = session(smoke_config)
    strat: SemaStrategy = sess.strategy
    x = next(iter(sess.ctx.loader(sess.stream.tasks[0].train, 32)))[0]
    block = 4  # blocks 3 and 5 keep empty buffers (z = 0), so only block 4 can fire
    err = _batch_errors(sess, x, block)[0]
    tau = strat.cfg.exp_threshold
    _set_buffer(strat.rds(sess.model, block)[0], 0.0, float(err.mean()) / (tau + margin))  # mean z = tau + margin
    sig = strat.detect_batch(sess.model, x)
    assert (sig is not None) == (margin > 0)
    if sig is not None:
        assert sig.layer == block and sig.z_mean[0] == pytest.approx(tau + margin, rel=1e-4)


def test_every_descriptor_must_find_the_batch_novel_and_upper_ignores_low_errors(smoke_config) -> None:
    sess = session(smoke_config)
    strat: SemaStrategy = sess.strategy
    model, block = sess.model, 3
    model.extras["sema_rd"][str(block)].append(RepresentationDescriptor(64, 8, 48))
    x = next(iter(sess.ctx.loader(sess.stream.tasks[0].train, 32)))[0]
    err = _batch_errors(sess, x, block).detach()
    first, second = strat.rds(model, block)
    _set_buffer(first, 0.0, float(err[0].mean()) / 10)  # z = 10
    _set_buffer(second, 0.0, float(err[1].mean()) / 2)  # z = 2 < tau = 3
    assert strat.detect_batch(model, x) is None
    _set_buffer(second, 0.0, float(err[1].mean()) / 4)  # z = 4
    assert strat.detect_batch(model, x).z_mean == pytest.approx([10.0, 4.0], rel=1e-4)
    # errors far *below* the buffer mean: |z| fires, the one-sided score does not
    _set_buffer(first, float(err[0].mean()) * 50, float(err[0].mean()))
    _set_buffer(second, float(err[1].mean()) * 50, float(err[1].mean()))
    assert strat.detect_batch(model, x) is not None
    strat.cfg = dataclasses.replace(strat.cfg, z_score="upper")
    assert strat.detect_batch(model, x) is None


def test_detection_runs_without_gradient_and_stops_early(smoke_config) -> None:
    sess = session(smoke_config)
    model, grad_modes, reached = sess.model, [], []
    h1 = model.backbone.blocks[3].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    h2 = model.backbone.norm.register_forward_hook(lambda *_: reached.append(True))
    for p in model.adapter_parameters():
        p.requires_grad_(True)
    x = next(iter(sess.ctx.loader(sess.stream.tasks[0].train, 32)))[0]
    assert sess.strategy.detect_batch(model, x) is None
    h1.remove()
    h2.remove()
    assert grad_modes == [False] and not reached  # no gradient; nothing after the last expandable block ran
    assert all(p.grad is None for p in model.parameters())
    assert all(int(rd.num_recorded) == 0 for b in BLOCKS for rd in sess.strategy.rds(model, b))  # eval: no records


# --- training rounds ------------------------------------------------------------------------------------------------
def test_rd_phase_trains_only_new_descriptors(smoke_config) -> None:
    from cl.loop import _run_phase

    sess = session(smoke_config)
    model, strat, task = sess.model, sess.strategy, sess.stream.tasks[0]
    sess.ctx.task = task
    phases = strat.phases(model, task)
    cls_phase = next(phases)
    rd_ids = {id(p) for b in BLOCKS for rd in strat.rds(model, b) for p in rd.parameters()}
    assert cls_phase.name == "sema_cls" and not rd_ids & {id(p) for p in cls_phase.params}
    assert len(cls_phase.params) == 4 * 6 + 2 * 3 + 2  # 6 adapters, 3 placeholder router columns, the head
    _run_phase(model, strat, cls_phase, sess.ctx, {})
    assert all(int(rd.num_recorded) > 0 for b in BLOCKS for rd in strat.rds(model, b))  # recorded in training mode
    rd_phase = next(phases)
    assert rd_phase.name == "sema_rd" and {id(p) for p in rd_phase.params} == rd_ids
    before = snapshot(model)
    _run_phase(model, strat, rd_phase, sess.ctx, {})
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("extras.sema_rd.") for k in changed)
    assert {k.rsplit(".", 2)[-2] for k in changed} >= {"encoder", "decoder"}
    with pytest.raises(StopIteration):
        next(phases)
    assert all(rd.is_frozen for b in BLOCKS for rd in strat.rds(model, b))
    assert all(not len(router(model, b).pending) and router(model, b).weight.shape[0] == 1 for b in BLOCKS)


def test_head_only_when_nothing_fires(smoke_config) -> None:
    sess = session(smoke_config, "strategy.exp_threshold=1e9")
    model = sess.model
    sess.train_task(sess.stream.tasks[0])
    before = snapshot(model)
    sess.ctx.task = sess.stream.tasks[1]
    phases = list(sess.strategy.phases(model, sess.stream.tasks[1]))
    assert [p.name for p in phases] == ["sema_head"]
    assert {id(p) for p in phases[0].params} == {id(p) for p in model.heads["main"].parameters()}
    sess.strategy.after_task(model, sess.stream.tasks[1])
    event = sess.ctx.events[-1]
    assert event["event"] == "sema_task" and event["head_only"] and event["detection_passes"] == 1
    assert model.adapters_per_block() == [1] * 6
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_expansion_fires_on_shift_and_not_on_repeat(shifted_run) -> None:
    sess, _, _ = shifted_run
    events = sess.ctx.events
    expansions = [e for e in events if e["event"] == "expansion"]
    tasks = [e for e in events if e["event"] == "sema_task"]
    assert expansions and {e["task"] for e in expansions} == {1}  # only the darkened task expands
    assert [t["head_only"] for t in tasks] == [False, False, True]
    assert tasks[1]["training_rounds"] == len(expansions) and len({e["layer"] for e in expansions}) == len(expansions)
    first = expansions[0]
    assert first["z_min"] > first["threshold"] == 3.0 and first["detection_pass"] == 1
    assert first["samples_seen"] > 0 and len(first["buffer_stats"]) == len(first["z_mean_per_adapter"]) == 1
    json.dumps(events, allow_nan=False)


def test_router_grows_one_column_per_adapter_and_old_parts_stay_bit_identical(shifted_run) -> None:
    sess, snaps, routers = shifted_run
    model, strat = sess.model, sess.strategy
    for b in BLOCKS:
        k = model.adapters_per_block()[b]
        assert router(model, b).weight.shape[0] == k == len(strat.rds(model, b))
        assert [r[b] for r in routers] == [1, k, k]
    grown = [b for b in BLOCKS if model.adapters_per_block()[b] == 2]
    assert grown
    t1, t2, t3 = snaps
    for key, value in t1.items():
        if key.startswith("sites.") and ".router." not in key:
            assert torch.equal(t2[key], value), key  # every task-1 adapter
        if key.startswith("extras.sema_rd.") and ".0." in key:
            assert torch.equal(t2[key], value), key  # task-1 descriptors, including their buffers
    for b in grown:
        for part in ("weight", "bias"):
            old = t1[f"sites.blocks_{b}.router.{part}"]
            assert torch.equal(t2[f"sites.blocks_{b}.router.{part}"][:1], old)
        assert not torch.equal(t2[f"sites.blocks_{b}.adapters.t001.up.weight"], torch.zeros(64, 16))
    assert all(torch.equal(t3[k], v) for k, v in t2.items() if not k.startswith("heads."))  # head-only task 3


def test_expansion_info_counts_adapters_and_router_columns(shifted_run) -> None:
    sess, _, _ = shifted_run
    info = sess.strategy.expansion_info(sess.model)
    adapter, column = 64 * 16 + 16 + 16 * 64 + 64, 65
    added = sum(sess.model.adapters_per_block()[b] - 1 for b in BLOCKS)
    assert info["expandable_blocks"] == list(BLOCKS)
    assert info["deployed_params"] == 3 * adapter + (3 + added) * (adapter + column)
    assert info["reference_params"] == 3 * adapter + 3 * 3 * (adapter + column)


def test_joint_training_is_one_phase_with_two_learning_rates(smoke_config) -> None:
    sess = session(smoke_config, "strategy.rd_training=joint")
    sess.ctx.task = sess.stream.tasks[0]
    phases = sess.strategy.phases(sess.model, sess.stream.tasks[0])
    phase = next(phases)
    assert phase.name == "sema_joint" and [g["lr"] for g in phase.params] == [0.01, 0.05]
    sess.train_task(sess.stream.tasks[0])  # runs end to end
    assert all(rd.is_frozen for b in BLOCKS for rd in sess.strategy.rds(sess.model, b))


# --- checkpoints and the prefix cache -------------------------------------------------------------------------------
def _tensors(result_dir) -> dict[str, torch.Tensor]:
    newest = max((result_dir / "checkpoint").glob("task_*"))  # the last task boundary
    return load_file(str(newest / "tensors.safetensors"))


def test_checkpoint_resume_reproduces_the_full_run(smoke_config, tmp_path, monkeypatch) -> None:
    over = [*FAST, "strategy.exp_threshold=0.5", "train.checkpoint=true"]  # low tau: base-domain tasks expand too
    full_cfg = load_config("configs/smoke.yaml", [f"out={tmp_path / 'full'}", *over])
    cut_cfg = load_config("configs/smoke.yaml", [f"out={tmp_path / 'cut'}", *over])
    full = run(full_cfg, figures=lambda *a: None)
    assert sum(e["event"] == "expansion" for e in full["events"]) > 0

    class Interrupt(Exception):
        pass

    original = Session.train_task

    def stop_at_third(self, task):
        if task.task_id == 2:
            raise Interrupt
        return original(self, task)

    monkeypatch.setattr(Session, "train_task", stop_at_third)
    with pytest.raises(Interrupt):
        run(cut_cfg, figures=lambda *a: None)
    monkeypatch.setattr(Session, "train_task", original)
    resumed = run(cut_cfg, resume=True, figures=lambda *a: None)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["events"] == full["events"]
    assert resumed["expansion"] == full["expansion"]
    a, b = _tensors(tmp_path / "full" / "smoke_sema" / "0"), _tensors(tmp_path / "cut" / "smoke_sema" / "0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deprecated_prefix_cache_key_still_loads(smoke_config, caplog) -> None:
    """``strategy.prefix_cache`` moved into the loop (``train.cache``, tested in tests/test_cache.py): old configs
    load, with a warning, and the key changes nothing."""
    with caplog.at_level("WARNING", logger="strategies.sema"):
        sess = session(smoke_config, "strategy.prefix_cache=true", "stream.augment=flip")
    assert "prefix_cache is deprecated" in caplog.text and sess.ctx.train.cache == "off"


# --- switches and diagnostics of issue 11: router_init cosine, eval_every_epoch, router_usage -------------------------
def test_cosine_router_logits_are_scaled_cosines() -> None:
    from strategies._sema_parts import CosineRouter

    torch.manual_seed(0)
    r = CosineRouter(16, columns=2, pending=1, scale=5.0)
    x = torch.randn(3, 7, 16) * 40  # (B, N, d): large inputs, logits stay bounded
    w = torch.cat([r.weight, r.pending_columns()[0].weight])
    want = 5.0 * torch.nn.functional.normalize(x.mean(1), dim=-1) @ torch.nn.functional.normalize(w, dim=-1).t()
    logits = r(x)
    torch.testing.assert_close(logits, want)
    assert logits.shape == (3, 3) and bool((logits.abs() <= 5.0 + 1e-5).all())
    with torch.no_grad():
        r.bias.fill_(100.0)  # biases play no part
        r.pending_columns()[0].weight.mul_(1000.0)  # nor do column norms
    torch.testing.assert_close(r(x), want)
    logits = r(x)
    logits[:, 2].sum().backward()  # only the pending column trains
    assert r.pending_columns()[0].weight.grad is not None and r.weight.grad is None
    r.merge()
    assert r.weight.shape == (3, 16) and isinstance(r, CosineRouter)


def test_router_init_cosine_trains_expands_and_survives_rebuild(smoke_config) -> None:
    from strategies._sema_parts import CosineRouter

    sess = session(smoke_config, "strategy.router_init=cosine", "strategy.router_cosine_scale=4.0",
                   stream=shifted_stream())
    for task in sess.stream.tasks[:2]:  # base domain, then the darkened task
        sess.train_task(task)
    model = sess.model
    assert all(isinstance(router(model, b), CosineRouter) for b in BLOCKS)
    assert any(router(model, b).weight.shape[0] > 1 for b in BLOCKS)  # the darkened task expanded somewhere
    probe = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    before = {b: router(model, b)(probe).detach() for b in BLOCKS}
    assert all(bool((v.abs() <= 4.0 + 1e-5).all()) for v in before.values())
    state = snapshot(model)
    model.load_structure(model.structure())  # what resume does: fresh plain ExpandableRouters of the same shapes
    sess.strategy.rebuild(model, sess.strategy.state()[0])
    assert all(isinstance(router(model, b), CosineRouter) for b in BLOCKS)
    model.load_state_dict(state, strict=False)
    for b in BLOCKS:
        torch.testing.assert_close(router(model, b)(probe), before[b])
    with pytest.raises(ConfigError, match="router_init"):
        build_dataclass(SemaConfig, {"name": "sema", "router_init": "uniform"}, "strategy")


def _records(run_dir, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_eval_every_epoch_and_router_usage_are_diagnostics_only(tmp_path) -> None:
    over = [*FAST, "strategy.exp_threshold=0.5", "stream.num_classes=4"]  # 2 tasks; low tau: task 2 expands
    ref = run(load_config("configs/smoke.yaml", [f"out={tmp_path / 'ref'}", *over]), figures=lambda *a: None)
    diag_cfg = load_config("configs/smoke.yaml", [f"out={tmp_path / 'diag'}", *over, "strategy.eval_every_epoch=true"])
    diag = run(diag_cfg, figures=lambda *a: None)
    assert diag["accuracy_matrix"] == ref["accuracy_matrix"]  # the extra evaluations change nothing
    assert diag["events"] == ref["events"]
    run_dir = tmp_path / "diag" / "smoke_sema" / "0"
    epochs = _records(run_dir, "epoch_eval")
    cls_epochs = [r for r in _records(run_dir, "train_epoch") if r["phase"] != "sema_rd"]
    assert len(epochs) == len(cls_epochs) > 0  # one per classification-phase epoch, none for the RD phase
    assert all(r["phase"] != "sema_rd" and len(r["test/accuracy_row"]) == r["task"] + 1 for r in epochs)
    last = [r for r in epochs if r["task"] == 1][-1]  # the last epoch's diagnostic = the task's evaluation row
    assert last["test/accuracy_row"] == ref["accuracy_matrix"][1]
    assert _records(tmp_path / "ref" / "smoke_sema" / "0", "epoch_eval") == []  # off by default
    # router usage (specs/sema.md section 10): one record per task, per expandable block, weights averaging to 1
    usage = [e for e in diag["events"] if e["event"] == "sema_router_usage"]
    assert [e["task"] for e in usage] == [0, 1]
    k_after = {e["task"]: e["adapters_per_layer"] for e in diag["events"] if e["event"] == "sema_task"}
    for e in usage:
        assert e["samples"] == sum(ref["tasks"][t]["n_test"] for t in range(e["task"] + 1))
        assert set(e["router_usage"]) == {str(b) for b in BLOCKS}
        for b, w in e["router_usage"].items():
            assert len(w) == k_after[e["task"]][int(b)] and sum(w) == pytest.approx(1.0, abs=1e-5)
    assert any(len(w) > 1 for w in usage[1]["router_usage"].values())


def test_router_usage_equals_the_mean_router_softmax_on_the_test_set(shifted_run) -> None:
    sess = shifted_run[0]
    model, strat = sess.model, sess.strategy
    upto = len(sess.stream.tasks) - 1
    strat._usage = {}  # as after_task leaves it
    sess.evaluate(upto)
    got = [e for e in sess.ctx.events if e["event"] == "sema_router_usage"][-1]["router_usage"]
    # independent: the block inputs of every test image, through each router, softmax, mean
    captured: dict[int, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    hooks = [model.backbone.blocks[b].norm2.register_forward_pre_hook(
        lambda _m, args, b=b: captured[b].append(args[0].detach())) for b in BLOCKS]
    try:
        for t in sess.stream.tasks:
            with torch.no_grad():
                model(torch.stack([t.test[i][0] for i in range(len(t.test))]))
    finally:
        for h in hooks:
            h.remove()
    for b in BLOCKS:
        h = torch.cat(captured[b])
        want = torch.softmax(router(model, b)(h).float(), dim=-1).mean(0)
        torch.testing.assert_close(torch.tensor(got[str(b)]), want, atol=1e-5, rtol=1e-5)
