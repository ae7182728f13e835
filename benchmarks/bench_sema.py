"""SEMA training throughput and memory: this implementation against a naive reference path, in the same run.

State benchmarked: every expandable block already holds ``--adapters`` frozen adapters (with RDs and merged router
columns) and the last expandable block has one more, newly added adapter being trained (a training round of a later
task). Two steps are timed, each as forward + backward + SGD step on one batch:

- classification step. ours: the site's stacked mixture (all K adapters in two batched matmuls) and the new RD's
  training-mode errors recorded by a hook in the same forward. naive (the official code's structure): each adapter
  called separately in a Python loop and weighted by the router, then a second backbone forward (no gradient) to
  compute the RD errors that the buffer records.
- RD step. ours: the forward stops after the last block with a trainable RD. naive: a full forward with the head;
  every RD of the block is evaluated in a loop.

Memory: ``torch.cuda.max_memory_allocated`` on CUDA; on every device also the peak bytes autograd saves for
backward (a device-independent measure of activation memory). Prints images/s, memory and the naive/ours ratios.

    python benchmarks/bench_sema.py                                     # tiny test_vit on CPU, < 2 min
    python benchmarks/bench_sema.py --model vit_base_patch16_224 --img-size 224 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.backbone import BackboneConfig, create_backbone
from cl.config import TrainConfig
from cl.loop import RunContext
from cl.mixture import Route
from cl.model import CLModel
from cl.plugins import load_builtin
from cl.runlog import JsonlLog
from cl.types import Batch, Phase, Stream, Task

load_builtin()

from strategies.sema import SemaConfig, SemaStrategy  # noqa: E402  (after registration)


def build(args: argparse.Namespace) -> tuple[CLModel, SemaStrategy, list[int]]:
    backbone, spec = create_backbone(BackboneConfig(name=args.model, img_size=args.img_size))
    device = torch.device(args.device)
    model = CLModel(backbone, spec).to(device)
    n = spec.num_blocks
    blocks = tuple(range(n - 3, n))
    ctx = RunContext(TrainConfig(device=args.device, progress=False), device, 0, JsonlLog(None))
    strategy = SemaStrategy(SemaConfig(expandable_blocks=blocks, rd_dim=min(128, spec.num_features // 2)), ctx)
    strategy.setup(model, Stream("bench", [], 10, list(range(10))))
    for block in blocks:
        strategy.rds(model, block)[0].freeze()
        model.sites[f"blocks_{block}"].router.merge()
    for t in range(1, args.adapters):
        for block in blocks:
            strategy.expand(model, t, block)
            strategy.rds(model, block)[-1].freeze()
            model.sites[f"blocks_{block}"].router.merge()
    strategy.expand(model, args.adapters, blocks[-1])  # the module being trained
    labels = list(range(5, 10))
    ctx.task = Task(1, labels, labels, None, None)  # type: ignore[arg-type]
    for rd in strategy.rds(model, blocks[0]):  # give the frozen buffers some statistics
        rd.errors.normal_().abs_()
        rd.num_recorded.fill_(rd.capacity)
    return model, strategy, list(blocks)


class Naive:
    """The reference path: a Python loop over adapters and RDs, and a separate forward for the RD errors."""

    def __init__(self, model: CLModel, strategy: SemaStrategy, blocks: list[int]) -> None:
        self.model, self.strategy, self.blocks = model, strategy, blocks
        self.captured: dict[int, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> Naive:
        for b in self.blocks:
            blk = self.model.backbone.blocks[b]
            self.handles.append(blk.norm2.register_forward_pre_hook(lambda _m, a, b=b: self._capture(b, a[0])))
            self.handles.append(blk.ls2.register_forward_hook(lambda _m, _a, out, b=b: out + self._mixture(b)))
        self.model.eval()  # the strategy's own RD hook only acts in training mode; the naive path records itself
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.model.train()

    def _capture(self, block: int, h: Tensor) -> None:
        self.captured[block] = h

    def _mixture(self, block: int) -> Tensor:
        site = self.model.sites[f"blocks_{block}"]
        h = self.captured[block]
        weights = torch.softmax(site.router(h).float(), dim=-1)  # (B, K)
        out = torch.zeros_like(h)
        for k, adapter in enumerate(site.adapters.values()):
            out = out + weights[:, k, None, None] * adapter(h)
        return out

    def rd_errors(self) -> dict[int, Tensor]:
        out = {}
        for b in self.blocks:
            rds = [rd for rd in self.strategy.rds(self.model, b) if not rd.is_frozen]
            u = self.captured[b].detach().mean(dim=1)
            if rds:
                out[b] = torch.stack([rd(u) for rd in rds])
                for rd, e in zip(rds, out[b], strict=True):
                    rd.record(e.detach())
        return out

    def logits(self, x: Tensor) -> Tensor:
        routes = {f"blocks_{b}": Route.off() for b in self.blocks}
        with self.model.routing(routes):
            return self.model.heads["main"](self.model.features(x))


@contextlib.contextmanager
def saved_bytes(peak: list[int]):
    """Track the peak number of bytes autograd keeps for backward."""
    current = [0]

    def pack(t: Tensor) -> Tensor:
        current[0] += t.numel() * t.element_size()
        peak[0] = max(peak[0], current[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    current[0] = 0


def measure(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak = [0]
    t0 = time.perf_counter()
    for _ in range(steps):
        with saved_bytes(peak):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"s_per_step": (time.perf_counter() - t0) / steps, "saved_mib": peak[0] / 2**20}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="test_vit")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--adapters", type=int, default=3, help="frozen adapters per expandable block")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, strategy, blocks = build(args)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(5, 10, (args.batch,), device=device)
    batch = Batch(x, y, 1)
    head = list(model.heads["main"].parameters())
    new = model.adapter_parameters(f"t{args.adapters:03d}") + list(model.sites[f"blocks_{blocks[-1]}"].router.pending
                                                                    .parameters())
    rd_params = list(strategy.rds(model, blocks[-1])[-1].parameters())
    cls_phase, rd_phase = Phase("sema_cls", new + head, 1), Phase("sema_rd", rd_params, 1)

    def optimiser(params: list) -> torch.optim.Optimizer:
        for p_ in model.parameters():
            p_.requires_grad_(False)
        for p_ in params:
            p_.requires_grad_(True)
        model.train()
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def train_step(opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    naive = Naive(model, strategy, blocks)

    def ours_cls() -> None:
        train_step(opt_cls, strategy.loss(model, batch, cls_phase).loss)

    def naive_cls() -> None:
        with naive:
            logits = naive.logits(x)
            loss = F.cross_entropy(logits[:, :10].masked_fill(torch.arange(10, device=device) < 5, float("-inf")), y)
            train_step(opt_cls, loss)
            with torch.no_grad():
                naive.logits(x)
                naive.rd_errors()

    def ours_rd() -> None:
        train_step(opt_rd, strategy.loss(model, batch, rd_phase).loss)

    def naive_rd() -> None:
        with naive:
            naive.logits(x)
            errs = naive.rd_errors()
            train_step(opt_rd, sum(e.mean(dim=1).sum() for e in errs.values()))

    opt_cls = optimiser(cls_phase.params)
    results = {"cls ours": measure(ours_cls, args.steps, device), "cls naive": measure(naive_cls, args.steps, device)}
    opt_rd = optimiser(rd_phase.params)
    results |= {"rd ours": measure(ours_rd, args.steps, device), "rd naive": measure(naive_rd, args.steps, device)}
    print(f"SEMA training step, {args.model} @ {args.img_size}px, batch {args.batch}, {args.device}, "
          f"K = {args.adapters} frozen + 1 new adapters at blocks {blocks}, {args.steps} steps")
    for name, r in results.items():
        mem = f"  peak {r['peak_mib']:.1f} MiB" if "peak_mib" in r else ""
        print(f"  {name:10s} {args.batch / r['s_per_step']:9.1f} img/s  saved-for-backward {r['saved_mib']:8.2f} MiB"
              f"{mem}")
    for phase in ("cls", "rd"):
        o, n_ = results[f"{phase} ours"], results[f"{phase} naive"]
        line = f"  {phase}: speed-up naive/ours {n_['s_per_step'] / o['s_per_step']:.2f}x"
        if o["saved_mib"]:
            line += f", saved-memory ratio {n_['saved_mib'] / o['saved_mib']:.2f}x"
        if "peak_mib" in o:
            line += f", peak-memory ratio {n_['peak_mib'] / o['peak_mib']:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
