"""Heads: growth keeps old rows; prototype and cosine scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.heads import CosineHead, IncrementalLinear, PrototypeHead, TaskHeads, head_from_spec


def test_incremental_linear_grows_and_keeps_old_rows():
    h = IncrementalLinear(8, 3)
    w, b = h.weight.detach().clone(), h.bias.detach().clone()
    h.grow(2)
    assert h.out_features == 5 and h(torch.randn(4, 8)).shape == (4, 5)
    assert torch.equal(h.weight[:3], w) and torch.equal(h.bias[:3], b) and torch.equal(h.bias[3:], torch.zeros(2))
    rebuilt = head_from_spec(h.spec())
    rebuilt.load_state_dict(h.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(rebuilt(x), h(x))


def test_cosine_head_is_scaled_cosine():
    h = CosineHead(8, 4, sigma=2.0)
    x = torch.randn(3, 8)
    expected = 2.0 * F.normalize(x, dim=-1) @ F.normalize(h.weight, dim=-1).t()
    assert torch.allclose(h(x), expected, atol=1e-6)


def test_prototype_head_nearest_mean():
    h = PrototypeHead(2)
    h.set_prototypes(torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    h.set_prototypes(torch.tensor([2]), torch.tensor([[-1.0, 0.0]]))
    assert h.out_features == 3
    assert h(torch.tensor([[0.9, 0.1], [0.1, 0.8], [-2.0, 0.1]])).argmax(1).tolist() == [0, 1, 2]
    e = PrototypeHead(2, metric="euclidean")
    e.set_prototypes(torch.tensor([0, 1]), torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    assert e(torch.tensor([[1.0, 1.0]])).argmax(1).item() == 0


def test_task_heads_concatenate_slices_and_rebuild():
    h = TaskHeads(8, init_std=0.001)
    first = h.add_task(3)
    assert float(first.weight.detach().std()) < 0.01 and torch.equal(first.bias, torch.zeros(3))
    h.add_task(2)
    x = torch.randn(4, 8)
    out = h(x)
    assert out.shape == (4, 5) and h.task_slice(1) == slice(3, 5)
    assert torch.equal(out[:, h.task_slice(1)], h.heads[1](x))
    assert [p.shape for p in h.task_parameters(0)] == [(3, 8), (3,)]
    rebuilt = head_from_spec(h.spec())
    rebuilt.load_state_dict(h.state_dict())
    assert torch.equal(rebuilt(x), out)
    assert TaskHeads(8)(x).shape == (4, 0)
