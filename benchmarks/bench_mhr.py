"""MHR-CIL skill mixture cost: the batched per-head einsum against per-skill loops, and against one plain LoRA.

Two measurements, each forward + backward, timed interleaved in one run (ratios only; absolute times on a shared
machine mean little):

1. one adapted linear (default: a ViT-S ``mlp.fc1``, 384 -> 1536, K = 8 skills, h = 64 heads, r = 1, a training batch
   routed to one row): ours (``SkillInventoryAdapter.routed``: one einsum mixes A and B over (head, skill), two more
   apply them) against a naive mixture that loops over the K skills in Python, and against one that loops over the
   skills *and* the heads; and the parameter-space mixture against a single rank-r LoRA on the same input.
2. the whole model: skills at qkv/proj/fc1/fc2 of every block against a rank-r LoRA at the same sites.

    python benchmarks/bench_mhr.py                                   # CPU, tiny sizes, < 1 min
    python benchmarks/bench_mhr.py --device cuda --batch 32 --tokens 197 --model vit_small_patch14_dinov2 \
        --img-size 224
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import time_interleaved  # benchmarks/, run as a script
from torch import Tensor

from cl.adapters import LoraConfig
from cl.adapters.lora import LoraAdapter
from cl.adapters.skills import SkillLinearAdapter, SkillsConfig, head_weights
from cl.backbone import BackboneConfig, create_backbone
from cl.mixture import Route
from cl.model import CLModel
from cl.plugins import load_builtin

load_builtin()


def naive_skill_loop(adapter: SkillLinearAdapter, x: Tensor, heads_too: bool) -> Tensor:
    """The same delta with the mixture written as Python loops over skills (and heads)."""
    a, b = adapter.skills()
    w = head_weights(adapter.rows[0])  # (h, K)
    h, k = w.shape
    if heads_too:
        a_t = torch.cat([sum(w[j, s] * a[j, s] for s in range(k)) for j in range(h)])  # (d_in, r)
        b_t = torch.cat([sum(w[j, s] * b[j, s] for s in range(k)) for j in range(h)], dim=1)  # (r, d_out)
    else:
        a_mix = sum(w[:, s, None, None] * a[:, s] for s in range(k))  # (h, i, r)
        b_mix = sum(w[:, s, None, None] * b[:, s] for s in range(k))  # (h, r, o)
        a_t = a_mix.reshape(-1, a.shape[-1])
        b_t = b_mix.permute(1, 0, 2).reshape(b.shape[-2], -1)
    return (x @ a_t @ b_t) * adapter.scaling


def site_benchmark(args: argparse.Namespace, device: torch.device) -> None:
    cfg = SkillsConfig(skills=args.skills, heads=args.heads, rank=args.rank)
    adapter = SkillLinearAdapter(args.d_in, args.d_out, cfg).to(device)
    adapter.add_row()
    with torch.no_grad():
        for p in adapter.skill_params():
            p.normal_()
    adapter.requires_grad_(True)
    lora = LoraAdapter(args.d_in, args.d_out, LoraConfig(rank=args.rank, alpha=1.0)).to(device)
    lora.requires_grad_(True)
    x = torch.randn(args.batch, args.tokens, args.d_in, device=device)
    rows = torch.tensor(0)  # a training batch: one row (0-dim)
    ref = adapter.routed(x, "rows", rows=rows)
    for heads_too in (False, True):
        torch.testing.assert_close(naive_skill_loop(adapter, x, heads_too), ref, rtol=1e-4, atol=1e-4)

    def step(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn().square().mean().backward()
        return run

    res = time_interleaved({
        "ours": step(lambda: adapter.routed(x, "rows", rows=rows)),
        "loop_skills": step(lambda: naive_skill_loop(adapter, x, False)),
        "loop_skills_heads": step(lambda: naive_skill_loop(adapter, x, True)),
        "lora": step(lambda: lora(x)),
    }, args.repeats, device)
    print(f"site {args.d_in}->{args.d_out}, K={args.skills}, h={args.heads}, r={args.rank}, batch {args.batch} x "
          f"{args.tokens} tokens, {device} (forward + backward, median of {args.repeats}, interleaved)")
    print(f"  per-skill loop / ours:          {res['loop_skills'] / res['ours']:.2f}")
    print(f"  per-skill-and-head loop / ours: {res['loop_skills_heads'] / res['ours']:.2f}")
    print(f"  ours / single rank-{args.rank} LoRA:     {res['ours'] / res['lora']:.2f}")


def model_benchmark(args: argparse.Namespace, device: torch.device) -> None:
    backbone, spec = create_backbone(BackboneConfig(name=args.model, img_size=args.img_size))
    models = {}
    for kind in ("skills", "lora"):
        model = CLModel(backbone, spec).to(device)
        if kind == "skills":
            model.attach("skills", SkillsConfig(skills=args.skills, heads=args.heads, rank=args.rank), "mhr")
            for site in model.sites.values():
                site.adapters["mhr"].add_row()  # type: ignore[operator]
        else:
            model.attach("lora", LoraConfig(rank=args.rank, alpha=1.0), "t000")
        for p in model.adapter_parameters():
            p.requires_grad_(True)
            with torch.no_grad():
                p.normal_(std=0.02)
        models[kind] = model
        backbone, spec = create_backbone(BackboneConfig(name=args.model, img_size=args.img_size))
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device)
    rows = torch.tensor(0)

    def skills_step() -> None:
        with models["skills"].routing(Route.skills("mhr", rows=rows)):
            models["skills"].features(x).square().mean().backward()

    def lora_step() -> None:
        with models["lora"].routing(Route.select("t000")):
            models["lora"].features(x).square().mean().backward()

    res = time_interleaved({"skills": skills_step, "lora": lora_step}, max(3, args.repeats // 4), device)
    print(f"model {args.model} at {args.img_size} px, batch {args.batch}, skills at qkv/proj/fc1/fc2 of every block")
    print(f"  skill inventory / single rank-{args.rank} LoRA (forward + backward): "
          f"{res['skills'] / res['lora']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=384)
    p.add_argument("--d-out", type=int, default=1536)
    p.add_argument("--skills", type=int, default=8)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", default="test_vit")
    p.add_argument("--img-size", type=int, default=32)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    site_benchmark(args, device)
    model_benchmark(args, device)


if __name__ == "__main__":
    main()
