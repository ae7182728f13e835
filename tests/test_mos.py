"""MOS mechanism tests (mos.md §5-§7): merging in both modes, L_orth, statistics and sampling, prototype lookups,
self-refinement, the ensemble, and end-to-end / resume runs on the smoke config."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.backbone import DataSpec
from cl.config import TrainConfig
from cl.loop import RunContext, run, run_dir_of
from cl.model import CLModel
from cl.runlog import JsonlLog
from cl.types import Batch
from strategies._mos_parts import (
    GaussianFeatureBatches,
    PrototypeIndex,
    class_statistics,
    ensemble_scores,
    flat_params,
    merge_params_,
    orth_loss,
    self_refine,
)
from strategies.mos import MosConfig, MosStrategy

SMOKE = [f"strategy.{k}={v}" for k, v in MosStrategy.smoke.items()]


# --- helpers -------------------------------------------------------------------------------------------------------
def _model_12_blocks() -> CLModel:
    """A tiny random ViT with 12 blocks, as ViT-B has (so one official forward applies 12 merges)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, mlp_ratio=2.0,
                            num_classes=0)
    vit.requires_grad_(False).eval()
    return CLModel(vit, DataSpec(32, (0.5,) * 3, (0.5,) * 3, 32, 12))


def _strategy_after_task1(tiny_stream, merge_mode: str, **cfg):
    """Strategy + model positioned at task 1 with random adapter values: t000 = θ0 (snapshot), t001 = θ."""
    model = _model_12_blocks()
    ctx = RunContext(TrainConfig(device="cpu", progress=False, batch_size=4, eval_batch_size=8),
                     torch.device("cpu"), 0, JsonlLog(None))
    ctx.stream = tiny_stream
    cfg = {"adapter_dropout": 0.0, "index_backend": "torch", **cfg}
    strat = MosStrategy(MosConfig(merge_mode=merge_mode, **cfg), ctx)
    strat.setup(model, tiny_stream)
    gen = torch.Generator().manual_seed(1)
    ctx.task = tiny_stream.tasks[0]
    strat.before_task(model, ctx.task)
    with torch.no_grad():
        for p in strat.set_params(model, 0):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    strat.snapshots = [flat_params(strat.set_params(model, 0))]
    ctx.task = tiny_stream.tasks[1]
    strat.before_task(model, ctx.task)
    with torch.no_grad():
        for p in strat.set_params(model, 1):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return strat, model, ctx


# --- merging (mos.md §5) -------------------------------------------------------------------------------------------
def test_paper_merge_step_on_hand_made_tensors():
    theta, m = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([0.0, 2.0, 1.0])
    p = nn.Parameter(theta.clone())
    merge_params_([p], [m], beta=0.1)
    assert torch.allclose(p.data, 0.9 * theta + 0.1 * m)
    merge_params_([p], [m], beta=0.1, times=3)
    assert torch.allclose(p.data, m + 0.9**4 * (theta - m))


def test_official_training_iteration_contracts_by_0_9_pow_13(tiny_stream):
    strat, model, ctx = _strategy_after_task1(tiny_stream, "official")
    theta = flat_params(strat.set_params(model, 1))
    m = strat.snapshots[0]
    phase = next(strat.phases(model, ctx.task))
    for p in strat.set_params(model, 1):
        p.requires_grad_(True)  # what the loop does for the phase's parameters
    model.train()
    x, y = next(iter(ctx.loader(ctx.task.train, 4)))
    out = strat.loss(model, Batch(x, y, 1), phase)
    out.loss.backward()  # in-forward merging must leave autograd usable
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in strat.set_params(model, 1))
    phase.after_step()  # Δ = 0: no optimiser step, then the 13th merge
    got = flat_params(strat.set_params(model, 1))
    assert torch.allclose(got, m + 0.9**13 * (theta - m), atol=1e-6)
    assert torch.equal(flat_params(strat.set_params(model, 0)), m)


def test_paper_training_iteration_merges_once(tiny_stream):
    strat, model, ctx = _strategy_after_task1(tiny_stream, "paper")
    theta = flat_params(strat.set_params(model, 1))
    m = strat.snapshots[0]
    phase = next(strat.phases(model, ctx.task))
    model.train()
    x, y = next(iter(ctx.loader(ctx.task.train, 4)))
    strat.loss(model, Batch(x, y, 1), phase)
    assert torch.equal(flat_params(strat.set_params(model, 1)), theta)  # the forward never merges
    phase.after_step()
    assert torch.allclose(flat_params(strat.set_params(model, 1)), 0.9 * theta + 0.1 * m, atol=1e-7)


def _finish_task1(strat, model, ctx):
    strat.snapshots.append(flat_params(strat.set_params(model, 1)))
    strat.proto.add(torch.arange(4), torch.randn(4, 32, generator=torch.Generator().manual_seed(2)))
    model.eval()
    return next(iter(ctx.loader(ctx.task.test, 8)))[0]


def test_official_eval_batch_merges_stored_snapshot_12_times(tiny_stream):
    strat, model, ctx = _strategy_after_task1(tiny_stream, "official")
    x = _finish_task1(strat, model, ctx)
    theta0, theta1 = strat.snapshots
    strat.predict(model, x)
    assert torch.allclose(flat_params(strat.set_params(model, 1)), theta0 + 0.9**12 * (theta1 - theta0), atol=1e-6)
    assert torch.equal(flat_params(strat.set_params(model, 0)), theta0)  # adapter 0 is never merged


def test_official_eval_uses_the_code_test_batch_and_order():
    """Issue 11: after task 1 and 240 test images at the official batch 48 (5 test batches, 12 merges each),
    ||θ1 - m1|| / ||θ1^snap - m1|| = 0.9^60, whatever ``train.eval_batch_size`` says (8 here: 0.9^360)."""
    from cl.loop import _evaluate
    from cl.types import labels_of
    from streams.synthetic import SyntheticConfig, build_synthetic

    stream = build_synthetic(SyntheticConfig(num_classes=4, increment=2, train_images_per_class=4,
                                             test_images_per_class=60), 32)
    strat, model, ctx = _strategy_after_task1(stream, "official", batch_size=48)
    _finish_task1(strat, model, ctx)
    theta0, theta1 = strat.snapshots  # m1 = θ0^snap
    seen_batches = []
    predict = strat.predict

    def recording_predict(model, x):
        seen_batches.append(len(x))
        return predict(model, x)

    strat.predict = recording_predict
    ev = _evaluate(model, strat, stream, 1, ctx, future=False)
    assert seen_batches == [48] * 5 and len(ev["row"]) == 2
    ratio = float((flat_params(strat.set_params(model, 1)) - theta0).norm() / (theta1 - theta0).norm())
    assert ratio == pytest.approx(0.9**60, rel=1e-3)
    # the code's order: the seen classes' test images sorted by class, each class in dataset order
    ds = torch.utils.data.ConcatDataset([t.test for t in stream.tasks[:2]])
    batch, order = strat.eval_batching(ds)
    labels = labels_of(stream.tasks[0].test).tolist() + labels_of(stream.tasks[1].test).tolist()
    assert batch == 48 and [labels[i] for i in order] == sorted(labels)
    assert all(a < b for a, b in zip(order, order[1:], strict=False) if labels[a] == labels[b])
    paper, _, _ = _strategy_after_task1(stream, "paper")
    assert paper.eval_batching(ds) == (None, None)  # paper mode: train.eval_batch_size, stream order


@pytest.mark.parametrize("train_mode", [False, True])
def test_official_prototypes_of_later_tasks_with_adapter_dropout(tiny_stream, train_mode):
    """``official_proto_train_mode``: the code computes the prototypes of tasks >= 1 in train mode (dropout on)."""
    from cl.mixture import Route

    strat, model, ctx = _strategy_after_task1(tiny_stream, "official", adapter_dropout=0.5, batch_size=4,
                                              official_proto_train_mode=train_mode)
    with torch.no_grad():
        for p in strat.set_params(model, 0):  # non-zero up-projections, so that dropout changes the features
            p.add_(0.5)
    strat.snapshots.append(flat_params(strat.set_params(model, 1)))
    task = ctx.task
    with model.routing(Route.select("t000")):
        feats, labels = ctx.extract(model, task.train.view("eval"))
    eval_means = torch.stack([feats[labels == c].mean(0) for c in task.labels])
    torch.manual_seed(0)
    model.eval()  # as the loop leaves it after the last phase
    strat.after_task(model, task)
    got = strat.proto.means[task.labels]
    assert torch.allclose(got, eval_means, atol=1e-5) is not train_mode
    assert not model.training  # the mode is restored
    with pytest.raises(ValueError, match="merge_mode: official"):
        MosConfig(merge_mode="paper", official_proto_train_mode=True)


def test_paper_eval_leaves_snapshots_bit_identical(tiny_stream):
    strat, model, ctx = _strategy_after_task1(tiny_stream, "paper")
    x = _finish_task1(strat, model, ctx)
    before = [p.detach().clone() for p in model.adapter_parameters()]
    out1 = strat.predict(model, x)
    out2 = strat.predict(model, x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.adapter_parameters(), strict=True))
    assert torch.equal(out1.logits, out2.logits)


# --- loss and statistics ---------------------------------------------------------------------------------------------
def test_orth_loss_hand_checked():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    mu = torch.tensor([[1.0, 1.0]], requires_grad=True)
    # X = [[1,1],[1,0],[0,1]], S = X X^T = [[2,1,1],[1,1,0],[1,0,1]] (temperature 1)
    e = math.e
    want = (-math.log(e**2 / (e**2 + 2 * e)) - 2 * math.log(e / (2 * e + 1))) / 3
    loss = orth_loss(feats, mu, temperature=1.0)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert mu.grad is None and feats.grad is not None  # stored means carry no gradient
    assert orth_loss(feats.detach(), None, 0.5).item() == pytest.approx(-math.log(e**2 / (e**2 + 1)), rel=1e-6)


def test_class_statistics_and_gaussian_sampling_reproduce_them():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen)
    feats = torch.cat([torch.randn(50, 4, generator=gen) @ a + 3, torch.randn(50, 4, generator=gen) * 0.5 - 1])
    labels = torch.arange(2).repeat_interleave(50)
    classes, means, covs = class_statistics(feats, labels, "covariance", 1e-4)
    assert classes.tolist() == [0, 1]
    assert torch.allclose(covs[0], torch.cov(feats[:50].t()) + 1e-4 * torch.eye(4), atol=1e-5)
    data = GaussianFeatureBatches(means, covs, samples_per_class=20_000, epochs=2, generator=gen)
    assert len(data) == 2 and data[0][0].shape == (20_000, 4)
    x, y = torch.cat([data[i][0] for i in range(2)]), torch.cat([data[i][1] for i in range(2)])
    for c in range(2):
        assert torch.allclose(x[y == c].mean(0), means[c], atol=0.06)
        assert torch.allclose(torch.cov(x[y == c].t()), covs[c], atol=0.12, rtol=0.05)
    first = data[0][0].clone()
    data.after_step()
    data.after_step()  # one epoch = C steps: a fresh draw
    assert not torch.equal(first, data[0][0])
    _, _, var = class_statistics(feats, labels, "variance", 1e-4)
    vdata = GaussianFeatureBatches(means, var, samples_per_class=20_000, epochs=1, generator=gen)
    xv, yv = torch.cat([vdata[i][0] for i in range(2)]), torch.cat([vdata[i][1] for i in range(2)])
    assert torch.allclose(xv[yv == 1].var(0), var[1], rtol=0.1)


# --- inference -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "flat", "hnsw", "ivf"])
def test_prototype_lookups_equal_direct_cosine(backend):
    gen = torch.Generator().manual_seed(0)
    index = PrototypeIndex(backend, 16)
    means = torch.randn(7, 16, generator=gen)
    index.add(torch.arange(4), means[:4])
    index.add(torch.arange(4, 7), means[4:])
    q = torch.randn(5, 16, generator=gen)
    want = F.normalize(q, dim=-1) @ F.normalize(means, dim=-1).t()
    scores = index.scores(q, 7)
    assert torch.allclose(scores, want, atol=1e-5)
    assert torch.allclose(index.scores(q, 4), want[:, :4], atol=1e-5)  # only the seen classes
    assert torch.equal(index.nearest(q), want.argmax(1)) and torch.equal(index.nearest(q, scores), want.argmax(1))


def test_prototype_scores_every_class_with_a_trained_ivf_index(monkeypatch):
    """Issue 11: IVF trained on 100 keys (nlist 20, nprobe 2), 200 classes. Searching the index with k = 200 scored
    ~21 classes and left the rest at -inf in the ensemble; the scores now come from the stored means."""
    from cl.retrieval import IndexConfig

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 768, generator=gen)
    means = centres.repeat_interleave(10, 0) + 0.5 * torch.randn(200, 768, generator=gen)  # clustered prototypes
    cfg = IndexConfig(backend="ivf", metric="cosine", ivf_nlist=20, ivf_nprobe=2, ivf_min_train_keys=100)
    proto = PrototypeIndex("ivf", 768, cfg)
    proto.add(torch.arange(100), means[:100])  # 100 keys: the IVF index trains here
    proto.add(torch.arange(100, 200), means[100:])
    assert proto.index.is_trained and proto.index._index.nlist == 20 and proto.index._index.nprobe == 2
    q = means[::7] + 0.3 * torch.randn(29, 768, generator=gen)
    want = F.normalize(q, dim=-1) @ F.normalize(means, dim=-1).t()

    def no_search(*_args, **_kwargs):
        raise AssertionError("class scores must not go through the approximate index")

    monkeypatch.setattr(proto.index, "search", no_search)
    scores = proto.scores(q, 200)
    assert scores.shape == (29, 200) and bool(torch.isfinite(scores).all())  # every class has a score
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    top1 = proto.nearest(q)  # the top-1 lookup is the index's (approximate, but a real class)
    assert bool(((top1 >= 0) & (top1 < 200)).all())
    assert float((top1 == want.argmax(1)).float().mean()) >= 0.7  # nprobe 2 of 20: approximate


def test_self_refinement_stops_on_repeat_and_at_cap():
    task_of = torch.tensor([0, 1, 2])  # one class per task
    # predicted class of sample s under adapter t
    table = torch.tensor([[0, 1, 2],  # sample 0: adapter 0 -> task 0: repeat after 1 evaluation
                          [1, 1, 0],  # sample 1: 0 -> 1 -> 1: repeat after 2 evaluations
                          [1, 2, 0]])  # sample 2: 0 -> 1 -> 2 -> 0 -> capped at 4 evaluations (adapter 0)
    calls = []

    def features_for(rows, tasks):
        calls.append((rows.tolist(), tasks.tolist()))
        cls = table[rows, tasks]
        return F.one_hot(cls, 3).float() * (1 + tasks[:, None].float())  # logit scale marks the adapter

    logits, g, evals = self_refine(torch.zeros(3, dtype=torch.long), features_for, lambda f: f, task_of, 4)
    assert evals.tolist() == [1, 2, 4]
    assert g.tolist() == [0, 1, 0]
    assert logits[2].tolist() == [0.0, 1.0, 0.0]  # the last evaluated adapter (0), not the next guess
    assert logits[1].tolist() == [0.0, 2.0, 0.0]
    assert calls[-1] == ([2], [0])
    _, g3, evals3 = self_refine(torch.zeros(3, dtype=torch.long), features_for, lambda f: f, task_of, 3)
    assert evals3.tolist() == [1, 2, 3] and g3.tolist() == [0, 1, 2]


def test_ensemble_combines_as_specified():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    zp = torch.tensor([[0.1, 0.5, -0.2]])
    ez, ep = torch.exp(z), torch.exp(3 * zp)
    assert torch.allclose(ensemble_scores(z, zp, num_tasks=3), ez / ez.sum() + ep / ep.sum())


# --- end to end ------------------------------------------------------------------------------------------------------
def test_smoke_run_logs_task_retrieval(smoke_config):
    cfg = smoke_config("strategy.name=mos", *SMOKE)
    result = run(cfg)
    saved = json.loads((run_dir_of(cfg) / "result.json").read_text())
    tra = saved["task_retrieval"]
    assert len(tra["accuracy_matrix"]) == 3 and tra["initial_accuracy_matrix"] is not None
    assert all(v is not None for v in tra["accuracy_matrix"][-1])
    assert result["expansion"]["expansion_rate"] == pytest.approx(1.0)
    drift = [json.loads(r) for r in (run_dir_of(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "mos_adapter_drift" for r in drift)
    after = [r for r in drift if r["event"] == "mos_adapter_drift" and r["when"] == "after_eval"]
    assert [r["task"] for r in after] == [0, 1, 2]  # right after every evaluation, the last one included
    assert set(saved["extra_accuracy_matrices"]) >= {"proto_pred", "head_pred"}


def test_checkpoint_resume_equals_uninterrupted_run(smoke_config, monkeypatch):
    overrides = ("strategy.name=mos", *SMOKE, "strategy.merge_mode=official", "train.checkpoint=true",
                 "stream.train_images_per_class=12", "stream.test_images_per_class=6")
    ref = run(smoke_config(*overrides, "experiment=ref"))
    cfg = smoke_config(*overrides, "experiment=resumed")
    original = MosStrategy.before_task

    def crash(self, model, task):
        if task.task_id == 2:
            raise KeyboardInterrupt
        original(self, model, task)

    monkeypatch.setattr(MosStrategy, "before_task", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(MosStrategy, "before_task", original)
    res = run(cfg, resume=True)
    assert res["accuracy_matrix"] == ref["accuracy_matrix"]
    assert res["task_retrieval"] == ref["task_retrieval"]
    assert ref["task_retrieval"]["accuracy_matrix"][-1][-1] is not None
