"""Where a compiled training step's GPU time goes: kernel groups, and the GPU's idle share.

    PYTHONPATH=platform python bench/profile_step.py [--model ViT-B-32] [--batch 512] [--no-compile]

Runs cliplab's ``train_step`` (the `clip` objective, bf16 autocast) under ``torch.profiler`` for
a few steps after a warm-up, and prints CUDA kernel time grouped by kind (GEMM, attention,
elementwise/fused, optimizer, reductions, copies) plus the wall time each step took, so the
gap between kernel time and wall time (launch overhead, host syncs) is visible.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from _synthetic import synthetic_step

GROUPS = (("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "sm80_", "cublas")),
          ("attention", ("flash", "fmha", "attention", "cudnn")),
          ("optimizer", ("adam", "multi_tensor", "foreach")),
          ("triton (fused elementwise/norm)", ("triton",)),
          ("copies", ("copy", "memcpy", "memset", "fill")),
          ("reductions", ("reduce", "norm", "softmax", "logsumexp")))


def group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args()
    step = synthetic_step(args.model, "clip", args.batch, "cuda", "bf16",
                          compile_mode=None if args.compile else False).run

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    kernel_us: dict[str, float] = collections.Counter()
    top: dict[str, float] = collections.Counter()
    for evt in prof.key_averages():
        us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if us <= 0:
            continue
        kernel_us[group(evt.key)] += us
        top[evt.key] += us
    total_ms = sum(kernel_us.values()) / 1000 / args.steps
    wall_ms = 1000 * sum(walls) / len(walls)
    print(f"{args.model}, batch {args.batch}, bf16, {'compiled' if args.compile else 'eager'}, "
          f"{torch.cuda.get_device_name()}: wall {wall_ms:.1f} ms/step, kernels {total_ms:.1f} ms/step "
          f"(GPU idle {(1 - total_ms / wall_ms):.1%})\n")
    print("| kernel group | ms/step | share |\n| --- | --- | --- |")
    for name, us in sorted(kernel_us.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us / 1000 / args.steps:.2f} | {us / 1000 / args.steps / total_ms:.1%} |")
    print("\ntop kernels (ms/step):")
    for name, us in top.most_common(15):
        print(f"  {us / 1000 / args.steps:7.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
