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

from _synthetic import synthetic_step

PRESETS = ("clip", "siglip", "cloob", "meru", "xclr")


def measure(preset: str, args) -> float:
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    step = synthetic_step(args.model, preset, args.batch, args.device, precision)
    times = []
    for i in range(args.warmup + args.iters):
        step.sync()
        t0 = time.perf_counter()
        step.run()
        step.sync()
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
