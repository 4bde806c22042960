"""What ``model.cache_locked_text`` saves: a LiT training step with and without the cache.

    PYTHONPATH=platform python bench/locked_text_cache.py                  # cliplab-tiny-minilm, CPU
    PYTHONPATH=platform python bench/locked_text_cache.py --batch 64 --epochs 3 --threads 1

Trains the real Ray-free step (`cliplab.train.step.train_step`, CLIP) on a fixed pool of
``--captions`` distinct captions with synthetic images, ``--epochs`` passes over it, once without
and once with the cache, alternating ``--rounds`` times. Epoch 1 fills the cache (every caption is
new); later epochs read it. Prints the median step time per epoch and the ratio; a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cliplab.config import ExperimentConfig, with_overrides
from cliplab.distributed import DistContext
from cliplab.models import build_dual_encoder
from cliplab.train.step import build_optimizer, cosine_with_warmup, train_step


def epoch_step_times(cache: int, args) -> list[float]:
    """Median step seconds of each epoch."""
    cfg = with_overrides(ExperimentConfig(), {"data.train": "/unused", "model.name": args.model, "model.lock_text": True,
                                              "model.cache_locked_text": cache})
    torch.manual_seed(0)
    bundle, module = build_dual_encoder(cfg)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokens = bundle.tokenizer([f"caption {i}: an emoji of a thing in group {i % 9}" for i in range(args.captions)])
    images = torch.randn(args.captions, 3, size, size)
    steps = args.captions // args.batch
    opt = build_optimizer(module, cfg.optim)
    sched = cosine_with_warmup(opt, 0, steps * args.epochs)
    medians = []
    for _ in range(args.epochs):
        times = []
        for s in range(steps):
            batch = {"image": images[s * args.batch:(s + 1) * args.batch], "text": tokens[s * args.batch:(s + 1) * args.batch]}
            t0 = time.perf_counter()
            train_step(module, batch, opt, sched, DistContext())
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cliplab-tiny-minilm")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--captions", type=int, default=256, help="distinct captions (a multiple of --batch)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one CPU Train worker: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[list[float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        runs["off"].append(epoch_step_times(0, args))
        runs["on"].append(epoch_step_times(args.captions, args))
    print(f"{args.model}, batch {args.batch}, {args.captions} captions, {args.threads} thread(s), "
          f"{args.rounds} rounds (median over rounds of each epoch's median step)\n")
    print("| epoch | no cache s/step | cache s/step | cache / no cache |")
    print("| --- | --- | --- | --- |")
    for e in range(args.epochs):
        off = statistics.median(r[e] for r in runs["off"])
        on = statistics.median(r[e] for r in runs["on"])
        print(f"| {e + 1} | {off:.3f} | {on:.3f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
