"""Avalanche bridge: every registered strategy through Avalanche equals ``clsim run``; metric oracles; checkpoint
resume; converters. Tiny configs (random ``test_vit``, 3 tasks of 8 train / 4 test images per class)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from cl.registries import STRATEGIES

pytest.importorskip("avalanche")
warnings.filterwarnings("ignore", message=".*QP solver.*")
# the tiny configs use a random test_vit on purpose (the bare-config test checks the warning itself)
pytestmark = pytest.mark.filterwarnings("ignore:ClsimStrategy. backbone .* is randomly initialised")

TINY = ["train.epochs=1", "train.checkpoint=false", "stream.train_images_per_class=8", "stream.test_images_per_class=4"]


def _cfg(smoke_config, name, *extra):
    smoke = [f"strategy.{k}={v!r}" for k, v in STRATEGIES.get(name).smoke.items()]
    return smoke_config(f"strategy.name={name}", *TINY, *smoke, *extra)


def _stream(cfg):
    from cl.registries import STREAMS

    return STREAMS.get(cfg.stream.name).build(cfg.stream, cfg.backbone.img_size)


def _strategy(cfg, bm, log_dir=None, **kw):
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.logging import CSVLogger
    from avalanche.training.plugins import EvaluationPlugin

    from cl.integrations.avalanche import ClsimStrategy, ExpansionMetric, TaskRetrievalMetric

    loggers = [CSVLogger(str(log_dir))] if log_dir else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        ev = EvaluationPlugin(accuracy_metrics(experience=True, stream=True, trained_experience=True),
                              forgetting_metrics(experience=True, stream=True),
                              bwt_metrics(experience=True, stream=True), ExpansionMetric(), TaskRetrievalMetric(),
                              loggers=loggers)
    return ClsimStrategy(config=cfg, benchmark=bm, evaluator=ev, **kw)


def _close(strat):
    for lg in strat.evaluator.loggers:
        if hasattr(lg, "close"):
            lg.close()


def _matrix(strat, n):
    """R (percent) from the per-experience accuracies of every ``eval`` call (rows = evals after each task)."""
    allm = strat.evaluator.get_all_metrics()
    return np.array([[100 * allm[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"][1][i] for j in range(n)]
                     for i in range(n)])


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_avalanche_matches_clsim_run(name, smoke_config, tmp_path):
    from cl.integrations.avalanche import load_clsim_checkpoint, save_clsim_checkpoint, stream_to_avalanche
    from cl.loop import run
    from evaluation.metrics import avalanche_stream_forgetting, bwt, stage_accuracy

    cfg = _cfg(smoke_config, name)
    ref = run(cfg, figures=lambda r, d: [])
    R_ref = np.array([[np.nan if v is None else v for v in row] for row in ref["accuracy_matrix"]])

    stream = _stream(cfg)
    n = len(stream)
    bm = stream_to_avalanche(stream)
    strat = _strategy(cfg, bm, tmp_path / "log1")
    ckpt = tmp_path / "strategy.ckpt"
    for i, exp in enumerate(bm.train_stream):
        strat.train(exp)
        last = strat.eval(bm.test_stream)
        if i == n - 2:
            save_clsim_checkpoint(strat, ckpt)
    _close(strat)

    # same per-experience accuracies as clsim run (every trained stage; clsim leaves future tasks unevaluated)
    R = _matrix(strat, n)
    low = np.tril(np.ones((n, n), bool))
    np.testing.assert_allclose(R[low], R_ref[low], atol=1e-3)

    # Avalanche's metrics vs clsim's functions on the same matrix (metrics.md §10: fractions, not percent)
    Rt = np.where(low, R, 0.0)
    n_test = [len(t.test) for t in stream.tasks]
    assert last["StreamForgetting/eval_phase/test_stream"] == pytest.approx(avalanche_stream_forgetting(Rt) / 100)
    assert last["StreamForgetting/eval_phase/test_stream"] == pytest.approx(-bwt(Rt) / 100)
    assert last["StreamBWT/eval_phase/test_stream"] == pytest.approx(bwt(Rt) / 100)
    for j in range(n - 1):
        assert last[f"ExperienceForgetting/eval_phase/test_stream/Exp{j:03d}"] == pytest.approx(
            (Rt[j, j] - Rt[-1, j]) / 100)
    trained = strat.evaluator.get_all_metrics()["Accuracy_On_Trained_Experiences/eval_phase/test_stream"][1]
    np.testing.assert_allclose(trained, np.array(stage_accuracy(Rt, n_test)) / 100, atol=1e-6)
    assert last["Top1_Acc_Stream/eval_phase/test_stream"] == pytest.approx(stage_accuracy(Rt, n_test)[-1] / 100)

    # clsim metrics as Avalanche metrics
    exp_ref, allm = ref["expansion"], strat.evaluator.get_all_metrics()
    assert allm["clsim/adapters_total"][1] == [sum(k) for k in exp_ref["adapters_per_layer"]]
    assert allm["clsim/deployed_params"][1] == exp_ref["deployed_params"]
    assert allm["clsim/trained_params"][1] == exp_ref["trainable_params_per_task"]
    tra = ref["task_retrieval"]
    key = "clsim/task_retrieval_acc/eval_phase/test_stream"
    if tra is None:
        assert key not in last
    else:
        row = tra["accuracy_matrix"][-1]
        assert last[key] == pytest.approx(float(np.dot(row, n_test)) / sum(n_test) / 100, abs=1e-6)

    # "kill" after task n-2, resume with new objects from the checkpoint: same final metrics
    del strat
    bm2 = stream_to_avalanche(_stream(cfg))
    strat2 = _strategy(cfg, bm2, tmp_path / "log2")
    _close(strat2)
    strat2, start = load_clsim_checkpoint(strat2, ckpt)
    assert start == n - 1
    for exp in bm2.train_stream[start:]:
        strat2.train(exp)
        resumed = strat2.eval(bm2.test_stream)
    _close(strat2)
    assert resumed.keys() == last.keys()
    for k, v in last.items():
        assert resumed[k] == pytest.approx(v, abs=1e-6), k


def test_checkpoint_excludes_backbone(smoke_config, tmp_path):
    from cl.integrations.avalanche import save_clsim_checkpoint, stream_to_avalanche

    cfg = _cfg(smoke_config, "finetune")
    bm = stream_to_avalanche(_stream(cfg))
    strat = _strategy(cfg, bm)
    strat.train(bm.train_stream[0])
    strat.model.train()  # what Avalanche's train() does: the frozen backbone must stay in eval mode
    assert strat.model.training and not strat.model.backbone.training
    before = strat.model.structure()
    strat.eval(bm.test_stream)  # model adaptation before eval experiences must not expand (unseen classes)
    assert strat.model.structure() == before
    path = tmp_path / "c.ckpt"
    save_clsim_checkpoint(strat, path)
    backbone_bytes = sum(p.numel() * p.element_size() for p in strat.model.backbone.state_dict().values())
    assert "model" not in strat.__dict__
    assert path.stat().st_size < backbone_bytes  # the frozen backbone is rebuilt from the config, not pickled


@pytest.mark.parametrize("name,labels,origin", [("simplecil", "original", True), ("simplecil", "original", False),
                                                 ("mos", "incremental", True)])
def test_without_benchmark_argument(name, labels, origin, smoke_config):
    """No ``benchmark=``: the timeline comes from the experiences' ``origin_stream`` (MOS needs it in ``setup``), or,
    for a lazy (generator) stream, the clsim stream grows per experience. Avalanche's original class ids map to clsim
    labels and back; SimpleCIL does not depend on the label order, so all three equal ``clsim run``."""
    from copy import copy

    from avalanche.benchmarks.scenarios import CLStream

    from cl.integrations.avalanche import ClsimStrategy, stream_to_avalanche
    from cl.loop import run

    cfg = _cfg(smoke_config, name)
    ref = run(cfg, figures=lambda r, d: [])
    stream = _stream(cfg)
    bm = stream_to_avalanche(stream, label_space=labels)
    strat = ClsimStrategy(config=cfg, evaluator=_quiet_evaluator())
    train = bm.train_stream if origin else CLStream("train", (copy(e) for e in bm.train_stream))  # lazy stream
    for exp in train:
        strat.train(exp)
    res = strat.eval(bm.test_stream)
    got = [100 * res[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(len(stream))]
    np.testing.assert_allclose(got, ref["accuracy_matrix"][-1], atol=1e-3)
    ids = stream.tasks[0].class_ids if labels == "original" else stream.tasks[0].labels
    assert sorted(strat.session.stream.tasks[0].class_ids) == sorted(ids)
    assert len(strat.session.stream.tasks) == len(stream)
    assert strat._prebuilt is origin  # lazy streams took the growing path


def _quiet_evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def test_converters_round_trip(smoke_config):
    from avalanche.benchmarks.scenarios import class_incremental_benchmark

    from cl.integrations.avalanche import avalanche_to_stream, stream_to_avalanche

    cfg = _cfg(smoke_config, "finetune", "stream.num_classes=7")  # 7 classes by 2: tasks of 2, 2, 2, 1 (PILOT)
    stream = _stream(cfg)
    assert [len(t.class_ids) for t in stream.tasks] == [2, 2, 2, 1]

    bm = stream_to_avalanche(stream)
    assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == [t.labels for t in stream.tasks]
    back = avalanche_to_stream(bm, cfg.backbone.img_size)
    assert [t.labels for t in back.tasks] == [t.labels for t in stream.tasks]
    for a, b in zip(back.tasks, stream.tasks, strict=True):
        assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.labels, b.test.labels)
        for ds_a, ds_b in ((a.train, b.train), (a.test.view("eval"), b.test.view("eval"))):
            xa, ya = ds_a[len(ds_a) - 1]
            xb, yb = ds_b[len(ds_b) - 1]
            assert torch.equal(xa, xb) and ya == yb

    orig = stream_to_avalanche(stream, label_space="original")
    assert [set(e.classes_in_this_experience) for e in orig.train_stream] == [set(t.class_ids) for t in stream.tasks]
    again = avalanche_to_stream(orig, None, class_order=stream.class_order)
    assert [t.class_ids for t in again.tasks] == [t.class_ids for t in stream.tasks]

    # Avalanche's own builder reproduces clsim's split given the order and the per-experience sizes
    tr = next(iter(orig.train_stream)).dataset
    for e in list(orig.train_stream)[1:]:
        tr = tr.concat(e.dataset)
    te = next(iter(orig.test_stream)).dataset
    for e in list(orig.test_stream)[1:]:
        te = te.concat(e.dataset)
    ci = class_incremental_benchmark({"train": tr, "test": te}, class_order=list(stream.class_order),
                                     num_classes_per_exp=[len(t.class_ids) for t in stream.tasks])
    assert [set(e.classes_in_this_experience) for e in ci.train_stream] == [set(t.class_ids) for t in stream.tasks]
    via = avalanche_to_stream(ci, None, class_order=stream.class_order)
    assert [len(t.test) for t in via.tasks] == [len(t.test) for t in stream.tasks]


def test_avalanche_to_stream_triplets_floats_and_resize():
    """(x, y, t) items, float grayscale images of another size, arbitrary class ids -> clsim's (3, S, S) + labels."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_classes_timeline
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset
    from torch.utils.data import TensorDataset

    from cl.integrations.avalanche import avalanche_to_stream

    def ds(classes, n=3):
        y = torch.tensor([c for c in classes for _ in range(n)])
        x = torch.rand(len(y), 1, 16, 16)
        return make_avalanche_dataset(TensorDataset(x, y, torch.zeros_like(y)),
                                      data_attributes=[DataAttribute(y.tolist(), "targets")])

    bm = with_classes_timeline(benchmark_from_datasets(train=[ds([7, 3]), ds([5, 9, 1])],
                                                       test=[ds([7, 3], 2), ds([5, 9, 1], 2)]))
    s = avalanche_to_stream(bm, 32)
    assert [t.class_ids for t in s.tasks] == [[3, 7], [1, 5, 9]] and s.num_classes == 5
    assert [t.labels for t in s.tasks] == [[0, 1], [2, 3, 4]]
    x, y = s.tasks[1].test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y == 3 and s.tasks[1].train.labels.tolist() == [3, 3, 3, 4, 4, 4, 2, 2, 2]


def test_import_cl_does_not_import_avalanche():
    import subprocess

    code = "import cl, cl.loop, cl.model, cl.integrations, sys; assert 'avalanche' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("native", [28, 48])  # smaller and larger than the backbone's 32 px
def test_bridge_preprocesses_every_input_path(native, smoke_config):
    """Images of another size than ``backbone.img_size`` go through clsim's train view in training and its eval view
    in Avalanche's evaluation (28-px images used to crash evaluation: raw minibatches reached ``predict``)."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_classes_timeline
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset
    from torch.utils.data import TensorDataset

    from cl.integrations.avalanche import ClsimStrategy
    from cl.transforms import mix_seed

    gen = torch.Generator().manual_seed(0)

    def ds(classes, n=3, floats=False):
        y = torch.tensor([c for c in classes for _ in range(n)])
        x = torch.randint(0, 256, (len(y), 3, native, native), dtype=torch.uint8, generator=gen)
        x = x.float() / 255 if floats else x
        return make_avalanche_dataset(TensorDataset(x, y), data_attributes=[DataAttribute(y.tolist(), "targets")])

    bm = with_classes_timeline(benchmark_from_datasets(train=[ds([0, 1]), ds([2, 3], floats=True)],
                                                       test=[ds([0, 1], 2), ds([2, 3], 2, floats=True)]))
    cfg = _cfg(smoke_config, "finetune", "stream.augment=crop")
    strat = ClsimStrategy(config=cfg, benchmark=bm, evaluator=_quiet_evaluator())
    prep = strat.preprocessing
    assert (prep.img_size, prep.transform, prep.augment) == (32, "pilot", "crop")
    for exp in bm.train_stream:
        strat.train(exp)
        res = strat.eval(bm.test_stream)
    assert 0.0 <= res["Top1_Acc_Stream/eval_phase/test_stream"] <= 1.0

    task = strat.session.stream.tasks[1]
    raw = bm.train_stream[1].dataset[0][0]
    task.train.set_augmentation_seed(4)
    x, _ = task.train[0]
    assert x.shape == (3, 32, 32) and torch.equal(x, prep.train_view(raw, torch.Generator().manual_seed(
        mix_seed(1, 4, 0))))
    assert torch.equal(task.test[0][0], prep.eval_view(bm.test_stream[1].dataset[0][0]))
    strat.experience = bm.test_stream[0]
    strat.eval_dataset_adaptation()
    assert torch.equal(strat.adapted_dataset[0][0], prep.eval_view(bm.test_stream[0].dataset[0][0]))


# --- issue 11: session.evaluate without benchmark=, unhonoured plugins, model= / backbone= ----------------------------
@pytest.mark.parametrize("origin", [True, False])
def test_session_evaluate_without_benchmark_fails_in_one_line(origin, smoke_config):
    """Before: ``torch.cat(): expected a non-empty list`` (eager stream) or an evaluation on the *training* images
    (lazy stream). Now one line naming the fix; with ``benchmark=`` the session evaluates."""
    from copy import copy

    from avalanche.benchmarks.scenarios import CLStream

    from cl.errors import DataError
    from cl.integrations.avalanche import ClsimStrategy, stream_to_avalanche

    cfg = _cfg(smoke_config, "finetune")
    bm = stream_to_avalanche(_stream(cfg))
    strat = ClsimStrategy(config=cfg, evaluator=_quiet_evaluator())
    train = bm.train_stream if origin else CLStream("train", (copy(e) for e in bm.train_stream))
    strat.train(next(iter(train)))
    with pytest.raises(DataError, match=r"no test data for task\(s\) \[0\].*pass ClsimStrategy\(benchmark=") as err:
        strat.session.evaluate(0)
    assert "\n" not in str(err.value)
    with_bm = ClsimStrategy(config=cfg, benchmark=bm, evaluator=_quiet_evaluator())
    with_bm.train(bm.train_stream[0])
    row = with_bm.session.evaluate(0)["row"]
    assert len(row) == 1 and row[0] is not None


def test_unhonoured_plugins_warn_once_each_by_name(smoke_config):
    from avalanche.core import SupervisedPlugin
    from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin

    from cl.integrations.avalanche import ClsimStrategy, IgnoredPluginWarning, stream_to_avalanche

    class EvalOnly(SupervisedPlugin):  # honoured: evaluation callbacks fire as in Avalanche
        def after_eval_exp(self, strategy, **kwargs):
            pass

    class DuckLoss:  # a duck-typed plugin changing the loss
        def before_backward(self, strategy, **kwargs):
            pass

    cfg = _cfg(smoke_config, "finetune")
    bm = stream_to_avalanche(_stream(cfg))
    plugins = [ReplayPlugin(mem_size=10), LwFPlugin(), EWCPlugin(ewc_lambda=1.0), EvalOnly(), DuckLoss()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClsimStrategy(config=cfg, benchmark=bm, evaluator=_quiet_evaluator(), plugins=plugins)
    ignored = [str(w.message) for w in caught if issubclass(w.category, IgnoredPluginWarning)]
    names = [m.split("plugin ")[1].split(":")[0] for m in ignored]
    assert names == ["ReplayPlugin", "LwFPlugin", "EWCPlugin", "DuckLoss"]  # one each, in order; EvalOnly honoured
    assert "before_training_exp" in ignored[0] and "before_backward" in ignored[1]


def test_bare_config_warns_and_model_argument_is_used(smoke_config, tmp_path):
    import timm

    from cl.errors import BackboneError
    from cl.integrations.avalanche import (
        ClsimStrategy,
        RandomBackboneWarning,
        load_clsim_checkpoint,
        save_clsim_checkpoint,
        stream_to_avalanche,
    )

    with pytest.warns(RandomBackboneWarning, match="randomly initialised.*model="):
        ClsimStrategy(config="finetune", evaluator=_quiet_evaluator())  # the bare call
    cfg = _cfg(smoke_config, "finetune")
    bm = stream_to_avalanche(_stream(cfg))
    vit = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32)
    with torch.no_grad():
        vit.blocks[0].mlp.fc1.weight.add_(0.25)  # weights the config could not rebuild
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomBackboneWarning)
        strat = ClsimStrategy(config=cfg, benchmark=bm, model=vit, evaluator=_quiet_evaluator())
    assert strat.model.backbone is vit and vit.num_classes == 0 and not vit.training
    assert not any(p.requires_grad for p in vit.parameters())
    strat.train(bm.train_stream[0])
    acc = strat.eval(bm.test_stream[:1])["Top1_Acc_Stream/eval_phase/test_stream"]
    path = tmp_path / "c.ckpt"
    save_clsim_checkpoint(strat, path)
    other = ClsimStrategy(config=cfg, benchmark=bm, backbone=timm.create_model("test_vit", img_size=32),
                          evaluator=_quiet_evaluator())
    other, start = load_clsim_checkpoint(other, path)  # the checkpoint carries the user's backbone
    assert start == 1
    assert torch.equal(other.model.backbone.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)
    test = bm.test_stream[0].dataset.eval()
    x = torch.stack([test[i][0] for i in range(len(test))])
    strat.model.eval()
    other.model.eval()
    with torch.no_grad():  # exactly the same function (the pickled backbone must not bring the old session's hooks)
        assert torch.equal(other.model(x), strat.model(x))
    assert other.eval(bm.test_stream[:1])["Top1_Acc_Stream/eval_phase/test_stream"] == pytest.approx(acc)
    hooks = len(vit.blocks[0].norm2._forward_pre_hooks)
    lazy_vit = timm.create_model("test_vit", img_size=32)
    lazy = ClsimStrategy(config=cfg, model=lazy_vit, evaluator=_quiet_evaluator())
    lazy.train(bm.train_stream[0])  # no benchmark=: the session is rebuilt on the origin stream, same backbone
    assert lazy.model.backbone is lazy_vit and len(lazy_vit.blocks[0].norm2._forward_pre_hooks) == hooks
    with pytest.raises(ValueError, match="not both"):
        ClsimStrategy(config=cfg, model=vit, backbone=vit)
    with pytest.raises(BackboneError, match="timm VisionTransformer"):
        ClsimStrategy(config=cfg, model=torch.nn.Linear(4, 4))
