"""Adapter contract tests, parametrised over every registered adapter type."""

from __future__ import annotations

import pytest
import torch

from cl.adapters import adapter_name
from cl.mixture import ExpandableRouter, Route
from cl.registries import ADAPTERS


def _x(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _cfg(type_name: str, **kw):
    return ADAPTERS.get(type_name).config_cls(**kw)


def _perturb(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("type_name", ADAPTERS.names())
def test_zero_at_init_and_output_unchanged(tiny_model, type_name):
    x = _x()
    before = tiny_model.features(x)
    state = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    keys = tiny_model.attach(type_name, _cfg(type_name), adapter_name(0))
    assert keys
    if ADAPTERS.get(type_name).adapter_cls.zero_at_init:
        assert torch.equal(tiny_model.features(x), before)
    else:  # LAE's Prefix: small non-zero tokens by design (its exact formula: tests/test_lae_pets.py)
        assert not torch.equal(tiny_model.features(x), before)
        with tiny_model.routing(Route.off()):
            assert torch.equal(tiny_model.features(x), before)
    # timm's own module names and state-dict keys are unchanged
    assert set(tiny_model.backbone.state_dict()) == set(state)


@pytest.mark.parametrize("type_name", ADAPTERS.names())
def test_only_adapter_params_get_gradients(tiny_model, type_name):
    tiny_model.attach(type_name, _cfg(type_name), "t000")
    params = tiny_model.adapter_parameters("t000")
    assert params and all(not p.requires_grad for p in params)  # new adapters start frozen
    _perturb(params)
    for p in params:
        p.requires_grad_(True)
    tiny_model.features(_x()).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in tiny_model.backbone.parameters())


@pytest.mark.parametrize("type_name", ADAPTERS.names())
def test_adding_second_adapter_leaves_first_unchanged_and_delete_restores(tiny_model, type_name):
    x = _x()
    tiny_model.attach(type_name, _cfg(type_name), "t000")
    _perturb(tiny_model.adapter_parameters("t000"))
    with tiny_model.routing(Route.select("t000")):
        y0 = tiny_model.features(x)
    snap = {k: v.clone() for k, v in tiny_model.trainable_state_dict().items()}
    tiny_model.attach(type_name, _cfg(type_name), "t001")
    _perturb(tiny_model.adapter_parameters("t001"), seed=1)
    with tiny_model.routing(Route.select("t000")):
        assert torch.equal(tiny_model.features(x), y0)
    for k, v in snap.items():
        assert torch.equal(tiny_model.trainable_state_dict()[k], v)
    tiny_model.delete("t001")
    tiny_model.delete("t000")
    assert not len(tiny_model.sites)
    tiny_model2_out = tiny_model.features(x)
    tiny_model.attach(type_name, _cfg(type_name), "t000")
    route = Route.sum() if ADAPTERS.get(type_name).adapter_cls.zero_at_init else Route.off()
    with tiny_model.routing(route):
        assert torch.equal(tiny_model.features(x), tiny_model2_out)


@pytest.mark.parametrize("type_name", ADAPTERS.names())
def test_state_dict_and_structure_round_trip(tiny_backbone, type_name):
    from cl.backbone import BackboneConfig, create_backbone
    from cl.model import CLModel

    backbone, spec = tiny_backbone
    m = CLModel(backbone, spec)
    m.attach(type_name, _cfg(type_name, blocks=(1, 3)), "t000")
    _perturb(m.adapter_parameters())
    m2 = CLModel(create_backbone(BackboneConfig(name="test_vit", img_size=32))[0], spec)
    m2.backbone.load_state_dict(m.backbone.state_dict())
    m2.load_structure(m.structure())
    m2.load_state_dict(m.state_dict())
    x = _x()
    assert torch.equal(m.features(x), m2.features(x))


def test_checks_before_mutation(tiny_model):
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.attach("bottleneck", _cfg("bottleneck", blocks=(0, 99)), "t000")
    with pytest.raises(ValueError, match="matched nothing"):
        tiny_model.attach("lora", _cfg("lora", targets=("nonexistent",)), "t000")
    assert not len(tiny_model.sites)
    tiny_model.attach("bottleneck", _cfg("bottleneck"), "t000")
    with pytest.raises(ValueError, match="already exists"):
        tiny_model.attach("bottleneck", _cfg("bottleneck"), "t000")


def test_lora_delta_weight_matches_forward():
    lin = torch.nn.Linear(8, 6)
    a = ADAPTERS.get("lora").adapter_cls(8, 6, _cfg("lora", rank=2))
    _perturb(a.parameters())
    x = torch.randn(4, 8)
    assert torch.allclose(a(x), x @ a.delta_weight().t(), atol=1e-6)
    merged = lin.weight + a.delta_weight()
    assert torch.allclose(lin(x) + a(x), x @ merged.t() + lin.bias, atol=1e-5)


def test_routes_select_sum_soft_per_sample(tiny_model):
    x = _x(4)
    for i in range(3):
        tiny_model.attach("bottleneck", _cfg("bottleneck", blocks=(2,)), f"t00{i}")
    _perturb(tiny_model.adapter_parameters())
    outs = {}
    for i in range(3):
        with tiny_model.routing(Route.select(f"t00{i}")):
            outs[i] = tiny_model.features(x)
    site = tiny_model.sites["blocks_2"]
    h = torch.randn(4, 5, 64)
    deltas = torch.stack([site.adapters[f"t00{i}"](h) for i in range(3)])
    with tiny_model.routing(Route.sum()):
        assert torch.allclose(site.delta(h), deltas.sum(0), atol=1e-6)
    w = torch.softmax(torch.randn(4, 3), -1)
    with tiny_model.routing(Route.soft(weights=w)):
        assert torch.allclose(site.delta(h), torch.einsum("kbnd,bk->bnd", deltas, w), atol=1e-5)
    idx = torch.tensor([2, 0, 1, 2])
    with tiny_model.routing(Route.per_sample(["t000", "t001", "t002"], idx)):
        mixed = tiny_model.features(x)
    for b in range(4):
        assert torch.allclose(mixed[b], outs[int(idx[b])][b], atol=1e-5)


def test_expandable_router_growth_keeps_old_columns():
    r = ExpandableRouter(16, columns=1)
    old_w, old_b = r.weight.detach().clone(), r.bias.detach().clone()
    assert not r.weight.requires_grad
    col = r.add_column()
    assert r.num_columns == 2 and col.weight.requires_grad
    u = torch.randn(5, 16)
    logits = r(u)
    assert logits.shape == (5, 2)
    logits[:, 1].sum().backward()
    r.merge()
    assert r.weight.shape == (2, 16) and not r.weight.requires_grad
    assert torch.equal(r.weight[0], old_w[0]) and torch.equal(r.bias[0], old_b[0])
    assert r(torch.randn(2, 7, 16)).shape == (2, 2)  # token inputs are mean-pooled


def test_lora_merge_equals_unmerged_and_unmerge_restores_exactly(tiny_model):
    x = _x()
    base = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    tiny_model.attach("lora", _cfg("lora", blocks=(0, 2)), "t000")
    tiny_model.attach("lora", _cfg("lora", blocks=(2,)), "t001")
    _perturb(tiny_model.adapter_parameters())
    with tiny_model.routing(Route.sum()):
        unmerged = tiny_model.features(x)
        tiny_model.merge("t000")
        tiny_model.merge("t001")
        assert torch.allclose(tiny_model.features(x), unmerged, atol=1e-5)
        tiny_model.unmerge("t000")
        assert torch.allclose(tiny_model.features(x), unmerged, atol=1e-5)
    tiny_model.unmerge("t001")
    assert all(torch.equal(base[k], v) for k, v in tiny_model.backbone.state_dict().items())
    with pytest.raises(TypeError, match="not linear-mergeable"):
        tiny_model.attach("bottleneck", _cfg("bottleneck", blocks=(1,)), "t002")
        tiny_model.merge("t002")


def test_safe_merge_rejects_non_finite_without_touching_weights(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    tiny_model.attach("lora", _cfg("lora", blocks=(0,)), "t000")
    with torch.no_grad():
        tiny_model.adapter_parameters("t000")[-1].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        tiny_model.merge("t000")
    assert all(torch.equal(base[k], v) for k, v in tiny_model.backbone.state_dict().items())
