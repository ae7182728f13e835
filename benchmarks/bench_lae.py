"""LAE's extra cost, as ratios measured in one run: the EMA after every step and the two-expert inference.

State benchmarked: a model at task 1 (online and offline PET sets on blocks 0–4, two task heads), for each PET type.
Timed, interleaved, median over ``--repeats`` rounds:

- step: forward + CE on the new head's slice + backward + Adam step over heads and online PETs. ``plain`` stops there
  (a plain adapter step); ``lae`` adds the offline EMA (one fused ``torch._foreach_lerp_``); ``loop-ema`` adds the
  same EMA written as a Python loop over parameters (the naive form, for reference).
- inference: ``plain`` = one forward with the online PETs and the heads; ``lae`` = ``LaeStrategy.predict`` (online
  and offline forwards, both softmaxes, element-wise max).

Prints the ratios ``lae / plain`` (step and inference) and ``loop-ema / lae`` (EMA form). Absolute times depend on the
machine and its load and are printed only for orientation.

    python benchmarks/bench_lae.py                                      # tiny test_vit on CPU, < 1 min
    python benchmarks/bench_lae.py --model vit_base_patch16_224 --img-size 224 --batch 24 --device cuda
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import time_interleaved  # benchmarks/, run as a script

from cl.backbone import BackboneConfig, create_backbone
from cl.config import TrainConfig
from cl.heads import TaskHeads
from cl.loop import RunContext
from cl.model import CLModel
from cl.plugins import load_builtin
from cl.runlog import JsonlLog
from cl.types import Stream, Task

load_builtin()

from strategies._lae_parts import ema_update_, pet_pairs  # noqa: E402  (after registration)
from strategies.lae import OFFLINE, ONLINE, LaeConfig, LaeStrategy  # noqa: E402


def build(args: argparse.Namespace, pet: str) -> tuple[CLModel, LaeStrategy]:
    backbone, spec = create_backbone(BackboneConfig(name=args.model, img_size=args.img_size))
    device = torch.device(args.device)
    model = CLModel(backbone, spec).to(device)
    ctx = RunContext(TrainConfig(device=args.device, progress=False), device, 0, JsonlLog(None))
    strategy = LaeStrategy(LaeConfig(pet=pet, adapt_blocks=tuple(range(min(5, spec.num_blocks)))), ctx)  # type: ignore[arg-type]
    strategy.setup(model, Stream("bench", [], 20, list(range(20))))
    for t in range(2):
        labels = list(range(10 * t, 10 * t + 10))
        ctx.task = Task(t, labels, labels, None, None)  # type: ignore[arg-type]
        strategy.before_task(model, ctx.task)
    assert OFFLINE in model.adapter_names()
    return model, strategy


def bench_pet(args: argparse.Namespace, pet: str, gen: torch.Generator) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds of the step variants and of the two inference paths for one PET type."""
    device = torch.device(args.device)
    model, strategy = build(args, pet)
    shape = (args.batch, 3, args.img_size, args.img_size)
    x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(10, 20, (args.batch,), generator=gen).to(device)
    heads = model.head("main", TaskHeads)
    params = list(heads.parameters()) + model.adapter_parameters(ONLINE)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-4)
    on, off = pet_pairs(model, ONLINE, OFFLINE)
    cols = heads.task_slice(1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(heads(model.features(x))[:, cols], y - cols.start).backward()
        opt.step()

    def step_lae() -> None:
        step()
        ema_update_(off, on, 0.9999)

    def step_loop_ema() -> None:
        step()
        with torch.no_grad():
            for o, n in zip(off, on, strict=True):
                o.mul_(0.9999).add_(n, alpha=1 - 0.9999)

    def infer_plain() -> None:
        with torch.no_grad():
            heads(model.features(x)).softmax(-1)

    def infer_lae() -> None:
        strategy.predict(model, x)

    def measure(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        return {k: v * 1e3 for k, v in time_interleaved(fns, args.repeats, device, warmup=2).items()}

    model.train()
    steps = measure({"plain": step, "lae": step_lae, "loop": step_loop_ema})
    model.eval()
    return steps, measure({"plain": infer_plain, "lae": infer_lae})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="test_vit")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pets", default="adapter,lora,prefix")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"model {args.model} @ {args.img_size}px, batch {args.batch}, device {args.device}, median of {args.repeats}")
    print(f"{'pet':8s} {'step plain ms':>13s} {'step lae ms':>11s} {'lae/plain':>9s} {'loop-ema/lae':>12s}  "
          f"{'infer plain ms':>14s} {'infer lae ms':>12s} {'lae/plain':>9s}")
    for pet in args.pets.split(","):
        s, i = bench_pet(args, pet, gen)
        print(f"{pet:8s} {s['plain']:13.2f} {s['lae']:11.2f} {s['lae'] / s['plain']:9.3f} "
              f"{s['loop'] / s['lae']:12.3f}  {i['plain']:14.2f} {i['lae']:12.2f} {i['lae'] / i['plain']:9.3f}")


if __name__ == "__main__":
    main()
