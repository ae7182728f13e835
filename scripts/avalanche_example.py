"""Run a clsim strategy inside Avalanche (copy this file as a starting point).

    python scripts/avalanche_example.py                                  # finetune, configs/smoke.yaml, CPU, offline
    python scripts/avalanche_example.py --strategy simplecil --builder avalanche
    python scripts/avalanche_example.py --checkpoint /tmp/av.ckpt         # resumes if the file exists

``--builder clsim`` (default) converts the config's clsim stream with ``stream_to_avalanche`` (same split, same data
order, same results as ``clsim run``); ``--builder avalanche`` builds the benchmark from tensors with Avalanche's own
``class_incremental_benchmark`` (original class ids; the bridge maps them to clsim's incremental labels).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tensor_benchmark(stream):
    """The same images as plain tensors -> Avalanche's ``class_incremental_benchmark`` (original class ids).

    The tensors are the decoded images before any preprocessing (``ImageDataset.raw``, all of one size here): the
    bridge applies clsim's train and eval views (``cl.transforms``) to them, as ``clsim run`` does.
    """
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset
    from torch.utils.data import TensorDataset

    def dataset(split):
        xs, ys = [], []
        for t in stream.tasks:
            ds = getattr(t, split)
            xs += [ds.raw(i) for i in range(len(ds))]
            ys += [stream.class_order[int(v)] for v in ds.labels]
        y = torch.tensor(ys)
        return make_avalanche_dataset(TensorDataset(torch.stack(xs), y), data_attributes=[DataAttribute(ys, "targets")])

    sizes = [len(t.class_ids) for t in stream.tasks]  # num_classes_per_exp keeps the smaller last task
    return class_incremental_benchmark({"train": dataset("train"), "test": dataset("test")},
                                       class_order=list(stream.class_order), num_classes_per_exp=sizes)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    ap.add_argument("--strategy", default="finetune")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--builder", choices=("clsim", "avalanche"), default="clsim")
    ap.add_argument("--out", default="runs/avalanche_example")
    ap.add_argument("--checkpoint", default=None, help="checkpoint file: written after every experience, resumed from")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*QP solver.*")
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.logging import CSVLogger, InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    from cl.config import load_config
    from cl.integrations.avalanche import (
        ClsimStrategy,
        ExpansionMetric,
        TaskRetrievalMetric,
        load_clsim_checkpoint,
        save_clsim_checkpoint,
        stream_to_avalanche,
    )
    from cl.plugins import load_builtin
    from cl.registries import STRATEGIES, STREAMS

    load_builtin()
    smoke = [f"strategy.{k}={v!r}" for k, v in STRATEGIES.get(args.strategy).smoke.items()]
    if Path(args.config).name != "smoke.yaml":
        smoke = []
    cfg = load_config(args.config, [f"strategy.name={args.strategy}", *smoke, *args.set])

    # the benchmark: a clsim stream converted, or tensors through Avalanche's own builder
    stream = STREAMS.get(cfg.stream.name).build(cfg.stream, cfg.backbone.img_size or 224)
    bm = stream_to_avalanche(stream) if args.builder == "clsim" else tensor_benchmark(stream)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True, trained_experience=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        ExpansionMetric(),
        TaskRetrievalMetric(),
        loggers=[InteractiveLogger(), CSVLogger(str(out))],
    )
    strat = ClsimStrategy(config=cfg, benchmark=bm, evaluator=evaluator)

    start = 0
    if args.checkpoint:
        strat, start = load_clsim_checkpoint(strat, args.checkpoint)
        if start:
            print(f"resumed from {args.checkpoint} after {start} experience(s)")
    results: dict = {}
    for exp in bm.train_stream[start:]:
        strat.train(exp)
        results = strat.eval(bm.test_stream)  # the full, index-aligned test stream (forgetting/BWT need it)
        if args.checkpoint:
            save_clsim_checkpoint(strat, args.checkpoint)
    for logger in strat.evaluator.loggers:
        if hasattr(logger, "close"):
            logger.close()
    keep = ("clsim/adapters_total", "clsim/deployed_params")
    print({k: round(v, 4) for k, v in results.items() if "Stream" in k or "Trained" in k or k in keep}
          if results else "nothing left to train")
    return results


if __name__ == "__main__":
    main()
