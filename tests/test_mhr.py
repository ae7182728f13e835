"""MHR-CIL mechanism tests (``specs/mhr.md`` B.7): per-head normalisation, dimension order, scaling, zero-function
skills, masks and gradients, optimiser groups, exact preservation over 4 tasks, and the retrieval paths on hand-made
prototypes."""

from __future__ import annotations

import math

import pytest
import torch

import cl.loop as loop
from cl.adapters.skills import SkillLinearAdapter, SkillsConfig, arrow_prototypes, head_weights
from cl.mixture import Route
from cl.registries import STRATEGIES
from strategies._mhr_parts import (
    TaskRetrieval,
    blocks_firing,
    fit_descriptor,
    kmeans_pseudo_tasks,
    lowest_entropy,
    soft_task_weights,
    task_scores,
    within_task,
)
from strategies._sema_parts import RepresentationDescriptor

SMOKE = [f"strategy.{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in STRATEGIES.get("mhr").smoke.items()]


def _adapter(d_in=4, d_out=6, heads=2, skills=2, rank=1, **kw) -> SkillLinearAdapter:
    return SkillLinearAdapter(d_in, d_out, SkillsConfig(skills=skills, heads=heads, rank=rank, **kw))


def _set(adapter: SkillLinearAdapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.skill_params():
            p.copy_(torch.randn(p.shape, generator=g))


# --- the skill mixture ------------------------------------------------------------------------------------------


def test_per_head_normalisation_with_hand_made_logits():
    """h = 2, K = 2: each head normalises over its own two skills. Normalising over all four entries (the mttl bug
    fixed in 374c253c) gives different weights, so this test would catch it."""
    z = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    s = torch.sigmoid(z)
    expected = torch.stack([s[0] / s[0].sum(), s[1] / s[1].sum()])
    w = head_weights(z)
    assert torch.allclose(w, expected, atol=1e-7)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert not torch.allclose(w, s / s.sum(), atol=1e-3)  # the buggy global normalisation

    a = _adapter(d_in=4, d_out=6, heads=2, skills=2)
    _set(a)
    a.add_row(init=z)
    x = torch.randn(3, 5, 4)
    got = a.routed(x, "rows", rows=torch.zeros(3, dtype=torch.long))
    A, B = a.skills()  # (h, K, i, r), (h, K, r, o)
    a_t = torch.cat([expected[j, 0] * A[j, 0] + expected[j, 1] * A[j, 1] for j in range(2)], dim=0)  # (4, 1)
    b_t = torch.cat([expected[j, 0] * B[j, 0] + expected[j, 1] * B[j, 1] for j in range(2)], dim=1)  # (1, 6)
    assert torch.allclose(got, x @ a_t @ b_t, atol=1e-5)


def test_dimension_order_matches_the_peft_mttl_layout():
    """A (h, K, d_in/h, r) assembles along the input dimension, B (h, K, r, d_out/h) along the output dimension."""
    a = _adapter(d_in=6, d_out=4, heads=2, skills=3, rank=2)
    _set(a, 1)
    a.add_row(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.rows[0].copy_(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(2, 3, 6)
    got = a.routed(x, "rows", rows=torch.zeros(2, dtype=torch.long))
    w = head_weights(a.rows[0])[None].expand(2, -1, -1)  # (B, h, K)
    A, B = a.skills()
    mix_a = torch.einsum("bqs,qsdr->bqdr", w, A).reshape(2, 6, 2)  # PEFT poly layer's assembly
    mix_b = torch.einsum("bqs,qsrd->bqrd", w, B).transpose(1, 2).reshape(2, 2, 4)
    assert torch.allclose(got, x.bmm(mix_a).bmm(mix_b) / 2, atol=1e-5)


def test_scaling_is_alpha_over_rank():
    x = torch.randn(2, 3, 4)
    rows = torch.zeros(2, dtype=torch.long)
    outs = {}
    for rank, alpha in ((1, 1.0), (4, 1.0), (4, 2.0)):
        a = _adapter(rank=rank, alpha=alpha)
        _set(a)
        a.add_row()
        A, B = a.skills()
        w = head_weights(a.rows[0])
        a_t = torch.cat([torch.einsum("k,kir->ir", w[j], A[j]) for j in range(2)])
        b_t = torch.cat([torch.einsum("k,kro->ro", w[j], B[j]) for j in range(2)], dim=1)
        outs[(rank, alpha)] = a.routed(x, "rows", rows=rows)
        assert torch.allclose(outs[(rank, alpha)], alpha / rank * (x @ a_t @ b_t), atol=1e-5)
    a.train()
    assert torch.equal(a.routed(x, "rows", rows=rows), outs[(4, 2.0)])  # the same in training and inference
    # one row for the whole batch (0-dim, the training path) = the per-sample path
    assert torch.allclose(a.routed(x, "rows", rows=torch.tensor(0)), outs[(4, 2.0)], atol=1e-6)


def test_new_skills_are_zero_functions_and_old_rows_keep_their_output():
    a = _adapter(skills=2)
    _set(a)
    a.add_row()
    x = torch.randn(3, 5, 4)
    rows0 = torch.zeros(3, dtype=torch.long)
    before = a.routed(x, "rows", rows=rows0)
    group = a.add_skills(2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.skill_b[group], torch.zeros_like(a.skill_b[group]))
    only_new = torch.tensor([False, False, True, True])
    a.add_row(only_new)  # a row that sees only the new skills: the zero function
    assert torch.equal(a.routed(x, "rows", rows=torch.ones(3, dtype=torch.long)), torch.zeros(3, 5, 6))
    assert torch.equal(a.routed(x, "rows", rows=rows0), before)  # old row: bit-identical
    assert torch.equal(a.row_mask[0], torch.tensor([True, True, False, False]))


def test_masked_skills_get_zero_weight_and_no_gradient_from_old_rows():
    a = _adapter(skills=2)
    _set(a)
    a.add_row()
    group = a.add_skills(1)
    a.add_row()  # row 1 sees all three skills
    with torch.no_grad():
        a.skill_b[group].normal_(generator=torch.Generator().manual_seed(4))
    dense = a.dense_row_weights()
    assert torch.equal(dense[0, :, 2], torch.zeros(2)) and (dense[1, :, 2] > 0).all()
    a.requires_grad_(True)
    x = torch.randn(3, 5, 4)
    for route in (dict(mode="rows", rows=torch.zeros(3, dtype=torch.long)),
                  dict(mode="soft", weights=torch.tensor([[1.0, 0.0]] * 3))):
        a.zero_grad()
        a.routed(x, **route).pow(2).sum().backward()
        for p in a.skill_params([group]):
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad))
        assert a.skill_a[0].grad is not None and a.skill_a[0].grad.abs().sum() > 0
    a.zero_grad()
    a.routed(x, "rows", rows=torch.ones(3, dtype=torch.long)).pow(2).sum().backward()
    assert a.skill_b[group].grad is not None and a.skill_b[group].grad.abs().sum() > 0


def test_soft_routing_is_one_forward_linear_in_parameter_space():
    a = _adapter(skills=3)
    _set(a)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        a.add_row(init=torch.randn(2, 3, generator=g))
    x = torch.randn(4, 5, 4)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    got = a.routed(x, "soft", weights=p)
    A, B = a.skills()
    for b in range(4):
        w = p[b, 0] * head_weights(a.rows[0]) + p[b, 1] * head_weights(a.rows[1])
        a_t = torch.cat([torch.einsum("k,kir->ir", w[j], A[j]) for j in range(2)])
        b_t = torch.cat([torch.einsum("k,kro->ro", w[j], B[j]) for j in range(2)], dim=1)
        assert torch.allclose(got[b], x[b] @ a_t @ b_t, atol=1e-5)
    hard = a.routed(x, "rows", rows=torch.tensor([0, 1, -1, 0]))
    assert torch.allclose(hard[:2], got[:2], atol=1e-6)
    assert torch.allclose(hard[2], a.routed(x[2:3], "mu")[0], atol=1e-6)  # -1 = uniform μ


def test_relaxed_bernoulli_is_seeded_and_training_only():
    a = _adapter(skills=3, relaxed_bernoulli=True)
    _set(a)
    a.add_row()
    x, rows = torch.randn(4, 5, 4), torch.zeros(4, dtype=torch.long)
    plain = a.eval().routed(x, "rows", rows=rows)  # eval mode: sigmoid
    a.train()
    with pytest.raises(ValueError, match="generator"):
        a.routed(x, "rows", rows=rows)
    outs = []
    for _ in range(2):
        a.generator = torch.Generator().manual_seed(7)
        outs.append(a.routed(x, "rows", rows=rows))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], plain)
    assert not torch.allclose(outs[0][0], outs[0][1] * x[0].norm() / x[1].norm())  # per-sample noise


def test_arrow_routes_tokens_to_the_skill_along_their_direction():
    a = _adapter(d_in=4, d_out=4, heads=1, skills=4, arrow_top_k=1)
    with torch.no_grad():
        a.skill_a[0].copy_(torch.eye(4).reshape(1, 4, 4, 1))  # skill k reads input dim k
        a.skill_b[0].copy_(torch.arange(1.0, 5.0).reshape(1, 4, 1, 1).expand(1, 4, 1, 4))  # and writes k + 1
    protos = arrow_prototypes(*a.skills())
    assert torch.allclose(protos.abs(), torch.eye(4), atol=1e-6)
    x = torch.tensor([[[0.0, 0.0, 3.0, 0.1]]])
    assert torch.allclose(a.routed(x, "arrow"), torch.full((1, 1, 4), 3.0 * 3), atol=1e-5)


# --- strategy pieces ------------------------------------------------------------------------------------------------


def test_retrieval_helpers_on_hand_made_scores():
    class_task = torch.tensor([0, 0, 1, 1, 2])
    cs = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.0], [0.1, 0.2, 0.3, 0.95, 0.4]])
    ts = task_scores(cs, class_task, 3)
    assert torch.equal(ts, torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.95, 0.4]]))
    p = soft_task_weights(ts, 0.1)
    assert torch.allclose(p, torch.softmax(ts / 0.1, -1)) and torch.equal(p.argmax(1), torch.tensor([0, 1]))
    masked = within_task(torch.zeros(2, 5), class_task, torch.tensor([1, -1]))
    assert torch.isinf(masked[0, [0, 1, 4]]).all() and torch.equal(masked[0, 2:4], torch.zeros(2))
    assert torch.equal(masked[1], torch.zeros(5))
    cands = torch.tensor([[[5.0, 0.0, float("-inf")]], [[1.0, 1.1, float("-inf")]]])  # (k=2, B=1, C=3)
    assert lowest_entropy(cands).tolist() == [0]


def test_task_retrieval_index_round_trip():
    r = TaskRetrieval(3, "torch")
    r.add(torch.tensor([0, 1]), torch.eye(3)[:2], 0)
    r.add(torch.tensor([2]), torch.eye(3)[2:], 1)
    q = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    scores = r.class_scores(q, 3)
    assert torch.allclose(scores[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(scores[1], torch.tensor([math.sqrt(0.5)] * 2 + [0.0]), atol=1e-6)
    r2 = TaskRetrieval(3, "flat")
    r2.load_state_dict(r.state_dict())
    assert torch.allclose(r2.class_scores(q, 3), scores, atol=1e-6)
    means, tasks = r2.task_means()
    assert tasks.tolist() == [0, 1] and torch.allclose(means[1], torch.tensor([0.0, 0.0, 1.0]))


def test_kmeans_pseudo_tasks_are_seeded_and_recover_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 10
    x = torch.cat([c + torch.randn(20, 8, generator=g) * 0.1 for c in centres])
    a, b = kmeans_pseudo_tasks(x, 3, 1), kmeans_pseudo_tasks(x, 3, 1)
    assert torch.equal(a, b) and a[0] == 0
    assert all(len(set(a[i * 20:(i + 1) * 20].tolist())) == 1 for i in range(3))
    assert kmeans_pseudo_tasks(x[:2], 8, 0).max() <= 1  # clipped to the number of samples


def test_zscore_test_fires_on_shifted_inputs_only():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 16, generator=g) * 0.1
    base = torch.randn(300, 16, generator=g) @ mixing
    rd = RepresentationDescriptor(16, 4, 500)
    fit_descriptor(rd, base)
    assert rd.is_frozen and rd.stats()[2] == 300
    same = torch.randn(200, 16, generator=g) @ mixing
    shifted = torch.randn(200, 16, generator=g) * 3.0
    fired, z = blocks_firing({0: [rd], 1: [rd]}, {0: same, 1: shifted}, 2.0, 64, torch.Generator().manual_seed(1))
    assert fired == [1] and z[1] > 2.0 > z[0]


# --- the strategy ---------------------------------------------------------------------------------------------------


def _session(smoke_config, *sets):
    cfg = smoke_config("strategy.name=mhr", *SMOKE, *sets)
    return cfg, loop.Session.create(cfg)


def test_routing_logits_have_their_own_group_and_lr_applies(smoke_config):
    cfg, sess = _session(smoke_config, "stream.train_images_per_class=4", "strategy.routing_lr_mult=100.0")
    with loop.rng_scope(0, torch.device("cpu")):
        task = sess.stream.tasks[0]
        sess.ctx.task = task
        sess.strategy.before_task(sess.model, task)
        phase = next(iter(sess.strategy.phases(sess.model, task)))
    groups = loop._param_groups(phase)
    route, main = groups[1], groups[0]
    rows = {id(p) for a in sess.strategy.skill_adapters(sess.model).values() for p in a.rows}
    assert {id(p) for p in route["params"]} == rows and not rows & {id(p) for p in main["params"]}
    lr = cfg.strategy.lr
    assert route["weight_decay"] == 0.0 and route["lr"] == pytest.approx(100 * lr)
    assert main["weight_decay"] == cfg.strategy.weight_decay and main["lr"] == pytest.approx(lr)
    opt = loop._build_optimizer(groups, phase, cfg.train)
    z, skill = route["params"][0], main["params"][0]
    before_z, before_s = z.detach().clone(), skill.detach().clone()
    for p in (z, skill):
        p.grad = torch.ones_like(p)
    opt.step()  # SGD, first step: delta = -lr * (grad + wd * p)
    assert torch.allclose(z.detach() - before_z, torch.full_like(z, -100 * lr), atol=1e-7)
    expected = -lr * (1 + cfg.strategy.weight_decay * before_s)
    assert torch.allclose(skill.detach() - before_s, expected, atol=1e-7)


@pytest.mark.parametrize("variant", [["strategy.expand_policy=always"], ["strategy.new_task_init=mu"]])
def test_exact_preservation_over_four_tasks(smoke_config, variant):
    """Routed to task s, the logits of task s's classes are bit-identical after every later task (B.4)."""
    cfg, sess = _session(smoke_config, "stream.num_classes=8", "stream.train_images_per_class=6", "train.epochs=1",
                         "strategy.epochs=1", *variant)
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    model, strategy = sess.model, sess.strategy
    recorded: dict[int, torch.Tensor] = {}
    with loop.rng_scope(cfg.seed, torch.device("cpu")):
        for task in sess.stream.tasks:
            sess.train_task(task)
            model.eval()
            with torch.no_grad():
                for s in range(task.task_id + 1):
                    with model.routing(Route.skills("mhr", rows=torch.full((5,), s))):
                        head = model.heads["main"]
                        logits = head(model.features(x))[:, head.task_slice(s)]
                    if s in recorded:
                        assert torch.equal(logits, recorded[s]), f"task {s} changed after task {task.task_id}"
                    else:
                        recorded[s] = logits
    assert len(recorded) == 4
    skills = [a.num_skills for a in strategy.skill_adapters(model).values()]
    assert set(skills) == {4 + 3}  # 3 later tasks, one skill each (expansion or private μ skill)


def test_zscore_policy_topk_inference_and_result_json(smoke_config, tmp_path):
    cfg = smoke_config("strategy.name=mhr", *SMOKE, f"out={tmp_path}", "strategy.expand_policy=zscore",
                       "strategy.zscore_threshold=0.5", "strategy.task_inference=topk", "strategy.row_init=nearest",
                       "stream.train_images_per_class=8", "stream.test_images_per_class=4", "train.checkpoint=false")
    res = loop.run(cfg, figures=lambda r, d: [])
    tra = res["task_retrieval"]
    assert len(tra["accuracy_matrix"]) == 3 and tra["initial_accuracy_matrix"] is not None
    assert len(tra["acc_given_correct_task"]) == 3 and all(v is not None for v in tra["acc_given_correct_task"])
    tasks = [e for e in res["events"] if e["event"] == "mhr_task"]
    assert [e["decision"] for e in tasks][0] == "base" and all(e["fired_blocks"] is not None for e in tasks[1:])
    assert any(e["event"] == "mhr_row_init" for e in res["events"])
    exp = res["expansion"]
    assert exp["adapters_per_layer"][0] == [4] * 6 and exp["reference_params"][-1] == 3 * exp["reference_params"][0]


def _predict_setup(smoke_config, *sets):
    """A model with 3 tasks' rows and heads and hand-made prototypes: test image i's frozen feature is class 2i's."""
    cfg, sess = _session(smoke_config, *sets)
    model, strategy = sess.model, sess.strategy
    g = torch.Generator().manual_seed(0)
    heads = model.heads["main"]
    for a in strategy.skill_adapters(model).values():
        with torch.no_grad():
            for p in a.skill_params():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for _ in range(3):
            a.add_row(init=torch.randn(a.heads, a.num_skills, generator=g))
    for _ in range(3):
        heads.add_task(2)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    model.eval()
    with torch.no_grad(), model.routing(Route.off()):
        f = torch.nn.functional.normalize(model.features(x), dim=-1)
    far = torch.nn.functional.normalize(torch.randn(3, f.shape[1], generator=g), dim=-1)
    for t in range(3):
        strategy.retrieval.add(torch.tensor([2 * t, 2 * t + 1]), torch.stack([f[t], far[t]]), t)
    strategy.tasks_done = 3
    sess.ctx.task = sess.stream.tasks[-1]
    return model, strategy, x


def _routed(model, x, route):
    with torch.no_grad(), model.routing(route):
        return model.heads["main"](model.features(x))


def test_predict_top1_soft_topk_and_fallback_on_hand_made_prototypes(smoke_config):
    model, strategy, x = _predict_setup(smoke_config)
    class_task = torch.tensor([0, 0, 1, 1, 2, 2])
    out = strategy.predict(model, x)  # top1, predict_scope task
    assert out.task_pred.tolist() == [0, 1, 2]
    ref = within_task(_routed(model, x, Route.skills("mhr", rows=torch.arange(3))), class_task, torch.arange(3))
    assert torch.equal(out.logits, ref)
    assert torch.isinf(out.logits[0, 2:]).all() and torch.isfinite(out.logits[0, :2]).all()

    strategy.cfg = type(strategy.cfg)(**{**strategy.cfg.__dict__, "task_inference": "soft"})
    out = strategy.predict(model, x)
    with torch.no_grad(), model.routing(Route.off()):
        q = model.features(x)
    p = soft_task_weights(task_scores(strategy.retrieval.class_scores(q, 6), class_task, 3), 0.1)
    assert torch.allclose(out.logits, _routed(model, x, Route.skills("mhr", weights=p)), atol=1e-6)
    assert out.task_pred.tolist() == [0, 1, 2]

    strategy.cfg = type(strategy.cfg)(**{**strategy.cfg.__dict__, "task_inference": "topk", "topk": 2})
    out = strategy.predict(model, x)
    per_task = task_scores(strategy.retrieval.class_scores(q, 6), class_task, 3)
    cand = per_task.topk(2, dim=1).indices
    outs = torch.stack([within_task(_routed(model, x, Route.skills("mhr", rows=cand[:, j])), class_task, cand[:, j])
                        for j in range(2)])
    pick = lowest_entropy(outs)
    assert out.task_pred.tolist() == cand.gather(1, pick[:, None])[:, 0].tolist()
    assert out.extras["task_pred_initial"].tolist() == [0, 1, 2]
    assert torch.equal(out.logits, outs[pick, torch.arange(3)])

    # fallback: image 2's prototype replaced by an unrelated vector -> best cosine below min_similarity -> μ
    strategy.cfg = type(strategy.cfg)(**{**strategy.cfg.__dict__, "task_inference": "top1", "min_similarity": 0.99})
    state = strategy.retrieval.state_dict()
    keys = state["index.keys"].clone()
    keys[4] = torch.nn.functional.normalize(torch.ones_like(keys[4]), dim=0)
    strategy.retrieval.load_state_dict({**state, "index.keys": keys})
    out = strategy.predict(model, x)
    assert out.task_pred.tolist() == [0, 1, -1]
    mu = _routed(model, x, Route.skills("mhr", rows=torch.tensor([0, 1, -1])))
    assert torch.equal(out.logits[2], mu[2]) and torch.isfinite(out.logits[2]).all()


def test_heads_must_divide_every_site_before_any_mutation(tiny_model, smoke_config):
    from cl.errors import ConfigError

    with pytest.raises(ValueError, match="must divide"):
        tiny_model.attach("skills", SkillsConfig(heads=3), "mhr")
    assert not len(tiny_model.sites)
    with pytest.raises(ConfigError, match="valid choices"):
        smoke_config("strategy.name=mhr", "strategy.expand_policy=sometimes")


def test_interrupted_run_resumes_with_grown_inventory(smoke_config, tmp_path, interrupt_run):
    """Checkpoints carry the inventory's growth (skill groups, rows) and the z-score descriptors."""
    sets = ["strategy.name=mhr", *SMOKE, "strategy.expand_policy=zscore", "strategy.zscore_threshold=0.0",
            "stream.train_images_per_class=8", "stream.test_images_per_class=4"]
    full = loop.run(smoke_config(*sets, f"out={tmp_path}/full"), figures=lambda r, d: [])
    cfg = smoke_config(*sets, f"out={tmp_path}/cut")
    interrupt_run(cfg, 2, figures=lambda r, d: [])
    resumed = loop.run(cfg, resume=True, figures=lambda r, d: [])
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["task_retrieval"] == full["task_retrieval"]
    assert resumed["expansion"]["adapters_per_layer"] == full["expansion"]["adapters_per_layer"]
    assert full["expansion"]["adapters_per_layer"][-1] == [4 + 2] * 6  # grew at every block in tasks 2 and 3
