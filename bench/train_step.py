"""A full training step (model forward + loss + backward + AdamW) per preset, against CLIP.

    PYTHONPATH=platform python bench/train_step.py                      # GPU: ViT-B-32, batch 512, bf16
    PYTHONPATH=platform python bench/train_step.py --model cliplab-tiny --batch 64 --device cpu

Uses the real Ray-free step (`cliplab.train.step.train_step`) on one device with synthetic
images and tokens, so it measures what an objective adds to a step. X-CLR's step includes its
second image view (and a frozen text tower), as in training. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cliplab.config import ModelConfig, ObjectiveConfig, OptimConfig
from cliplab.distributed import DistContext
from cliplab.models import DualEncoder, build_model, freeze_text_tower
from cliplab.objectives import build_objective
from cliplab.train.step import build_optimizer, configure_device, cosine_with_warmup, train_step

PRESETS = ("clip", "siglip", "cloob", "meru", "xclr")


def measure(preset: str, args) -> float:
    torch.manual_seed(0)
    configure_device(torch.device(args.device), tf32=True)  # what the trainer does (train.tf32)
    bundle = build_model(ModelConfig(name=args.model))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig(name=preset), bundle.embed_dim))
    if not module.objective.needs_text:
        freeze_text_tower(module.model)
    module = module.to(args.device)
    opt = build_optimizer(module, OptimConfig())
    sched = cosine_with_warmup(opt, 10, 10_000)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    batch = {"image": torch.randn(args.batch, 3, size, size, device=args.device),
             "text": torch.randint(0, 49408, (args.batch, bundle.context_length), device=args.device)}
    if preset == "xclr":
        batch["image_2"] = torch.randn_like(batch["image"])
        batch["caption_embedding"] = torch.randn(args.batch, 384, device=args.device)
    use_bf16 = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if use_bf16 else (lambda: None)
    times = []
    for i in range(args.warmup + args.iters):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            train_step(module, batch, opt, sched, DistContext())
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--model", default="ViT-B-32" if gpu else "cliplab-tiny")
    parser.add_argument("--batch", type=int, default=512 if gpu else 64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name() if gpu and args.device.startswith('cuda') else 'CPU'}, "
          f"model {args.model}, batch {args.batch}, {'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, "
          f"median of {args.iters} steps\n")
    print("| objective | step (ms) | × CLIP |")
    print("|---|---|---|")
    base = None
    for preset in PRESETS:
        ms = measure(preset, args)
        base = base or ms
        print(f"| {preset} | {ms:.1f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
