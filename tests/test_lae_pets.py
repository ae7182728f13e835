"""LAE's PET types and the explicit-softmax attention (lae.md §3, §4, §11 item 7): zero functions at init, K/V-only
LoRA, the parallel-attention placement, prefix calibration against hand computations, equality with timm."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention

from cl.adapters import AttnAdapterConfig, KvLoraConfig, PrefixConfig
from cl.adapters.attention import compensate_prefix, explicit_attention
from cl.backbone import DataSpec
from cl.mixture import Route
from cl.model import CLModel


def _model(init_values: float | None = None) -> CLModel:
    """timm's test_vit (64-d, 6 blocks), random init, at 32 px; LayerScale blocks when ``init_values`` is set."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, init_values=init_values)
    vit.requires_grad_(False).eval()
    return CLModel(vit, DataSpec(32, (0.5,) * 3, (0.5,) * 3, vit.num_features, len(vit.blocks)))


def _x(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _perturb(params, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["attn_adapter", "kv_lora"])
def test_adapter_and_lora_are_zero_functions_at_init(kind):
    m = _model(init_values=0.1)
    x = _x()
    before = m.features(x)
    cfg = AttnAdapterConfig(blocks=(0, 1, 2, 3, 4)) if kind == "attn_adapter" else KvLoraConfig(blocks=(0, 1, 2, 3, 4))
    m.attach(kind, cfg, "t000")
    assert torch.equal(m.features(x), before)
    assert len(m.sites) == 5
    scalers = [n for n, _ in m.sites[next(iter(m.sites))].adapters["t000"].named_parameters() if "scale" in n]
    assert scalers and all(float(getattr(a, n)) == 1.0 for a in m.adapters("t000") for n in scalers)


def test_scalers_learnable_switch():
    a = AttnAdapterConfig(learnable_scale=False)
    m = _model()
    m.attach("attn_adapter", a, "t000")
    adapter = m.adapters("t000")[0]
    assert "scale" not in dict(adapter.named_parameters()) and "scale" in dict(adapter.named_buffers())
    assert "scale" in m.adapters("t000")[0].state_dict()


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_attn_adapter_is_parallel_to_attention_and_outside_layer_scale(init_values):
    """Block output = x + ls1(attn(norm1 x)) + s·A(norm1 x), then the MLP sub-block (gqk/LAE ``Adapter`` mode
    ``parallel`` on ``blocks[i].attn``)."""
    m = _model(init_values)
    m.attach("attn_adapter", AttnAdapterConfig(blocks=(0,)), "t000")
    adapter = m.adapters("t000")[0]
    _perturb(adapter.parameters())
    with torch.no_grad():
        adapter.scale.fill_(1.7)
    blk = m.backbone.blocks[0]
    x = torch.randn(2, 5, 64)
    with m.routing(Route.off()):
        h = blk.norm1(x)
        y1 = x + blk.ls1(blk.attn(h)) + 1.7 * adapter.up(torch.nn.functional.gelu(adapter.down(h)))
        expected = y1 + blk.ls2(blk.mlp(blk.norm2(y1)))
    assert torch.allclose(blk(x), expected, atol=1e-6)


def test_kv_lora_touches_only_k_and_v_rows():
    m = _model()
    m.attach("kv_lora", KvLoraConfig(blocks=(0,)), "t000")
    lora = m.adapters("t000")[0]
    _perturb(lora.parameters())
    qkv = m.backbone.blocks[0].attn.qkv
    x = torch.randn(3, 5, 64)
    with m.routing(Route.off()):
        base = qkv(x)
    diff = qkv(x) - base
    d = 64
    assert torch.equal(diff[..., :d], torch.zeros_like(diff[..., :d]))  # Q rows untouched
    assert diff[..., d:2 * d].abs().sum() > 0
    assert diff[..., 2 * d:].abs().sum() > 0
    # hand computation: s_K · B_K A_K x and s_V · B_V A_V x
    with torch.no_grad():
        lora.scale_k.fill_(0.5)
        lora.scale_v.fill_(-2.0)
    diff = qkv(x) - base
    a, b = lora.lora_a, lora.lora_b
    assert torch.allclose(diff[..., d:2 * d], 0.5 * x @ a[0].t() @ b[0].t(), atol=1e-5)
    assert torch.allclose(diff[..., 2 * d:], -2.0 * x @ a[1].t() @ b[1].t(), atol=1e-5)
    # merge = the dense update with zero Q rows
    assert torch.equal(lora.delta_weight()[:d], torch.zeros(d, 64))
    assert torch.allclose(diff, x @ lora.delta_weight().t(), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 3"):
        m.attach("kv_lora", KvLoraConfig(blocks=(1,), targets=("attn.proj",)), "t001")
    assert "t001" not in m.adapter_names()  # checked before mutation


def test_compensation_makes_prefix_rows_sum_to_one_and_keeps_the_rest():
    probs = torch.softmax(torch.randn(2, 3, 7, 12), dim=-1)
    out = compensate_prefix(probs, 1, 4)
    assert torch.allclose(out[..., 1:5].sum(-1), torch.ones(2, 3, 7), atol=1e-6)
    assert torch.equal(out[..., :1], probs[..., :1]) and torch.equal(out[..., 5:], probs[..., 5:])
    lam = probs[..., 1:5].sum(-1, keepdim=True)
    assert torch.allclose(out[..., 1:5], probs[..., 1:5] / lam)


def _hand_prefix_attention(attn: Attention, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                           compensate: bool) -> torch.Tensor:
    """Per sample, head and query: (1 − λ)·softmax(orig)·V + softmax(prefix)·P_V (or the plain joint softmax)."""
    bsz, n, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    out = torch.zeros(bsz, n, c)
    for b in range(bsz):
        qkv = x[b] @ w.t() + bias
        q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
        for h in range(heads):
            s = slice(h * hd, (h + 1) * hd)
            lo = q[:, s] @ k[:, s].t() * hd ** -0.5  # (n, n)
            lp = q[:, s] @ pk[:, s].t() * hd ** -0.5  # (n, L)
            z = torch.cat([lo, lp], 1).exp().sum(1, keepdim=True)
            lam = lp.exp().sum(1, keepdim=True) / z
            if compensate:
                o = (1 - lam) * torch.softmax(lo, 1) @ v[:, s] + torch.softmax(lp, 1) @ pv[:, s]
            else:
                o = (lo.exp() @ v[:, s] + lp.exp() @ pv[:, s]) / z
            out[b, :, s] = o
    return attn.proj(out)


@pytest.mark.parametrize("compensate", [True, False])
def test_prefix_attention_matches_hand_computation(compensate):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).eval()
    x, pk, pv = torch.randn(2, 5, 8), torch.randn(3, 8), torch.randn(3, 8)
    got = explicit_attention(attn, x, (pk, pv), position=1, compensate=compensate)
    assert torch.allclose(got, _hand_prefix_attention(attn, x, pk, pv, compensate), atol=1e-5)
    # keys are a set: the insertion position only decides which columns are calibrated
    assert torch.allclose(explicit_attention(attn, x, (pk, pv), position=4, compensate=compensate), got, atol=1e-5)


def test_prefix_site_at_init_is_exactly_the_calibrated_formula():
    """Right after attach (tokens ~ U(0, 0.01), scalers 1), block 0's attention is the hand-computed formula."""
    m = _model()
    m.attach("prefix", PrefixConfig(blocks=(0,), length=4), "t000")
    prefix = m.adapters("t000")[0]
    assert 0 <= float(prefix.key.min()) and float(prefix.key.max()) <= 0.01
    attn = m.backbone.blocks[0].attn
    x = torch.randn(2, 5, 64)
    expected = _hand_prefix_attention(attn, x, prefix.key.detach(), prefix.val.detach(), compensate=True)
    assert torch.allclose(attn(x), expected, atol=1e-5)
    with m.routing(Route.off()):  # no prefix routed: timm's own forward
        assert torch.equal(attn(x), Attention.forward(attn, x))
    with torch.no_grad():
        prefix.scale_key.fill_(2.0)
        prefix.scale_val.fill_(0.5)
    expected = _hand_prefix_attention(attn, x, 2.0 * prefix.key.detach(), 0.5 * prefix.val.detach(), True)
    assert torch.allclose(attn(x), expected, atol=1e-5)
    m.delete("t000")
    assert "forward" not in vars(attn)


@pytest.mark.parametrize("name", ["test_vit", "vit_small_patch16_224", "vit_base_patch16_224",
                                  "vit_small_patch14_dinov2"])
def test_explicit_attention_equals_timm(name):
    torch.manual_seed(0)
    kw = {"img_size": 56} if "dinov2" in name else {}
    vit = timm.create_model(name, pretrained=False, num_classes=0, depth=1, **kw).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, vit.embed_dim)
    with torch.no_grad():
        assert torch.allclose(explicit_attention(attn, x), attn(x), atol=1e-5)


def test_prefix_with_layerscale_backbone_and_gradients():
    m = _model(init_values=0.1)
    m.attach("prefix", PrefixConfig(blocks=(0, 2)), "t000")
    params = m.adapter_parameters("t000")
    for p in params:
        p.requires_grad_(True)
    m.features(_x()).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in m.backbone.parameters())
    assert set(m.sites) == {"blocks_0_attn_prefix", "blocks_2_attn_prefix"}


def test_parameter_counts_match_the_paper_for_vit_b():
    """lae.md §3: per block of ViT-B (d = 768) Adapter5 8,454, LoRA5 15,362, Prefix10 15,362 parameters."""
    from cl.adapters import AttnAdapter, KvLoraAdapter, PrefixAdapter

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(AttnAdapter(768, 768, AttnAdapterConfig(down_sample=5))) == 8454
    assert count(KvLoraAdapter(768, 3 * 768, KvLoraConfig(rank=5))) == 15362
    assert count(PrefixAdapter(768, 768, PrefixConfig(length=10))) == 15362
