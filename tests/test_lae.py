"""LAE strategy mechanisms (lae.md §4–§6, §11): EMA math, no EMA in task 0, the freeze schedule (no gradient, no
optimiser movement), the offline copy created once at task 1, the max-softmax ensemble, resume."""

from __future__ import annotations

import pytest
import torch

import cl.loop as loop
import strategies.lae as lae_mod
from cl.mixture import Route
from cl.types import Phase
from strategies._lae_parts import ema_update_, max_softmax
from strategies.lae import OFFLINE, ONLINE, LaeStrategy

SMOKE = [f"strategy.{k}={v!r}" for k, v in LaeStrategy.smoke.items()]
TINY = ["stream.train_images_per_class=12", "stream.test_images_per_class=4"]


def _cfg(smoke_config, *extra: str):
    return smoke_config("strategy.name=lae", *SMOKE, *TINY, *extra)


def test_ema_update_on_hand_made_tensors():
    off = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    on = [torch.tensor([3.0, 6.0]), torch.tensor([[10.0]])]
    ema_update_(off, on, 0.9)
    assert torch.allclose(off[0], torch.tensor([1.2, 2.4])) and torch.allclose(off[1], torch.tensor([[1.0]]))
    for _ in range(9):  # constant θ_on: θ_off = θ_on + d^n (θ_off,0 − θ_on)
        ema_update_(off, on, 0.9)
    assert torch.allclose(off[0], torch.tensor([3.0, 6.0]) + 0.9 ** 10 * torch.tensor([-2.0, -4.0]), atol=1e-6)
    assert torch.equal(on[0], torch.tensor([3.0, 6.0]))  # the online set is never written
    ema_update_(off, on, 1.0)  # d = 1 freezes the offline set
    assert torch.allclose(off[1], torch.tensor([[10.0 - 10.0 * 0.9 ** 10]]), atol=1e-5)


def test_max_softmax_is_the_elementwise_max():
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    p = max_softmax(z1, z2)
    assert torch.equal(p, torch.maximum(z1.softmax(-1), z2.softmax(-1)))
    assert torch.equal(max_softmax(z1), z1.softmax(-1))


def test_freeze_epochs_no_gradient_and_no_optimizer_movement(smoke_config):
    """Phase.freeze: frozen parameters get no gradient and SGD with momentum and weight decay does not move them;
    the other parameters train with one optimiser across the boundary."""
    cfg = smoke_config("strategy.name=finetune", "strategy.adapter_blocks=[0]", *TINY)
    with loop.rng_scope(0, torch.device("cpu")):
        sess = loop.Session.create(cfg)
        task = sess.stream.tasks[0]
        sess.ctx.task = task
        sess.strategy.before_task(sess.model, task)
        pets = sess.model.adapter_parameters()
        head = list(sess.model.heads["main"].parameters())
        log: list[tuple[list[torch.Tensor], list[bool], torch.Tensor]] = []

        def spy() -> None:
            log.append(([p.detach().clone() for p in pets], [p.grad is None for p in pets], head[0].detach().clone()))

        phase = Phase("freeze_test", head + pets, 3, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.1,
                      batch_size=8, scheduler="constant", after_step=spy, freeze=pets, freeze_epochs=2,
                      drop_last=True)
        start = [p.detach().clone() for p in pets]
        loop._run_phase(sess.model, sess.strategy, phase, sess.ctx, {})
    per_epoch = len(task.train) // 8
    assert len(log) == 3 * per_epoch
    for values, no_grad, _ in log[: 2 * per_epoch]:
        assert all(no_grad) and all(torch.equal(v, s) for v, s in zip(values, start, strict=True))
    assert not any(log[-1][1]) and any(not torch.equal(v, s) for v, s in zip(log[-1][0], start, strict=True))
    assert not torch.equal(log[0][2], log[-1][2])  # the head trained throughout
    assert all(not p.requires_grad for p in pets + head)


def test_task0_no_ema_freeze_and_ema_in_task1(smoke_config, monkeypatch):
    """Task 0: no offline set, no EMA, PETs train from epoch 1. Task 1: the offline copy equals the online set
    at the start; an EMA update after every optimiser step, also while the online PETs are frozen."""
    calls: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
    real = lae_mod.ema_update_

    def spy(off, on, decay):
        real(off, on, decay)
        calls.append((len(calls), [p.detach().clone() for p in on], [p.detach().clone() for p in off]))

    monkeypatch.setattr(lae_mod, "ema_update_", spy)
    cfg = _cfg(smoke_config, "strategy.epochs=3", "strategy.num_freeze_epochs=2", "strategy.ema_decay=0.5")
    with loop.rng_scope(0, torch.device("cpu")):
        sess = loop.Session.create(cfg)
        model, strat = sess.model, sess.strategy
        t0, t1 = sess.stream.tasks[:2]
        online0 = [p.detach().clone() for p in model.adapter_parameters(ONLINE)]
        sess.train_task(t0)
        assert calls == [] and OFFLINE not in model.adapter_names()
        trained0 = model.adapter_parameters(ONLINE)
        assert any(not torch.equal(a, b) for a, b in zip(online0, trained0, strict=True))  # PETs trained in task 0
        after0 = [p.detach().clone() for p in trained0]
        sess.ctx.task = t1
        strat.before_task(model, t1)
        off = model.adapter_parameters(OFFLINE)
        assert all(torch.equal(a, b) for a, b in zip(off, after0, strict=True))
        assert all(not p.requires_grad for p in off)
        phases = list(strat.phases(model, t1))
        assert len(phases) == 1 and phases[0].freeze_epochs == 2 and phases[0].after_step is not None
        loop._run_phase(model, strat, phases[0], sess.ctx, {})
    per_epoch = len(t1.train) // strat.cfg.batch_size
    assert len(calls) == 3 * per_epoch
    frozen = calls[: 2 * per_epoch]
    assert all(torch.equal(a, b) for _, on, _ in frozen for a, b in zip(on, after0, strict=True))
    # EMA toward a constant online set during the freeze: offline = online + d^n (offline_0 - online) = online
    assert all(torch.equal(o, a) for _, _, off_n in frozen for o, a in zip(off_n, after0, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(calls[-1][1], after0, strict=True))  # unfrozen: PETs moved


def test_head_slice_loss_and_old_heads_unchanged(smoke_config):
    cfg = _cfg(smoke_config)
    with loop.rng_scope(0, torch.device("cpu")):
        sess = loop.Session.create(cfg)
        sess.train_task(sess.stream.tasks[0])
        heads = sess.model.heads["main"]
        old = [p.detach().clone() for p in heads.task_parameters(0)]
        sess.train_task(sess.stream.tasks[1])
    assert heads.num_tasks == 2 and heads.sizes == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(old, heads.task_parameters(0), strict=True))
    new_w = heads.task_parameters(1)[0]
    assert new_w.std() < 0.5  # N(0, 0.001²) init, a few Adam steps away


@pytest.mark.parametrize("pet", ["adapter", "lora", "prefix"])
def test_run_offline_set_once_and_three_accuracy_matrices(pet, smoke_config, tmp_path):
    res = loop.run(_cfg(smoke_config, f"strategy.pet={pet}", f"out={tmp_path}"), figures=lambda r, d: [])
    k = res["expansion"]["adapters_per_layer"]
    assert k[0] == [1, 1, 1, 1, 1, 0] and k[1] == k[2] == [2, 2, 2, 2, 2, 0]
    events = [e for e in res["events"] if e["event"] == "lae_offline_set"]
    assert len(events) == 1 and events[0]["task"] == 1
    dep = res["expansion"]["deployed_params"]
    assert dep[1] == dep[2] == 2 * dep[0]
    extra = res["extra_accuracy_matrices"]
    assert set(extra) == {"online_pred", "offline_pred", "ensemble_pred"}
    assert extra["offline_pred"][0] == extra["online_pred"][0]  # no offline set after task 0
    assert extra["ensemble_pred"] == res["accuracy_matrix"]  # max_softmax is the default prediction


def test_predict_is_max_of_the_two_experts_and_switches(smoke_config):
    cfg = _cfg(smoke_config)
    with loop.rng_scope(0, torch.device("cpu")):
        sess = loop.Session.create(cfg)
        for t in sess.stream.tasks[:2]:
            sess.train_task(t)
    model, strat = sess.model, sess.strategy
    x = torch.stack([sess.stream.tasks[0].test[i][0] for i in range(6)])
    model.eval()
    with torch.no_grad():
        z = {}
        for name in (ONLINE, OFFLINE):
            with model.routing(Route.select(name)):
                z[name] = model(x)[:, :4]
        pred = strat.predict(model, x)
    assert torch.allclose(pred.logits, torch.maximum(z[ONLINE].softmax(-1), z[OFFLINE].softmax(-1)), atol=1e-6)
    assert torch.equal(pred.extras["online_pred"], z[ONLINE].argmax(1))
    assert torch.equal(pred.extras["offline_pred"], z[OFFLINE].argmax(1))
    for mode, name in (("online", ONLINE), ("offline", OFFLINE)):
        strat.cfg = type(strat.cfg)(**{**strat.cfg.__dict__, "ensemble": mode})
        with torch.no_grad():
            assert torch.allclose(strat.predict(model, x).logits, z[name].softmax(-1), atol=1e-6)


def test_interrupted_lae_run_resumes_to_the_same_result(smoke_config, tmp_path, interrupt_run):
    fast = ["strategy.pet=prefix", "strategy.epochs=1", "strategy.num_freeze_epochs=0"]
    full = loop.run(_cfg(smoke_config, f"out={tmp_path}/full", *fast), figures=lambda r, d: [])
    cfg = _cfg(smoke_config, f"out={tmp_path}/cut", *fast)
    interrupt_run(cfg, 2, figures=lambda r, d: [])
    resumed = loop.run(cfg, resume=True, figures=lambda r, d: [])
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["extra_accuracy_matrices"] == full["extra_accuracy_matrices"]
    assert [e["event"] for e in resumed["events"]].count("lae_offline_set") == 1
