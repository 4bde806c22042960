"""cliplab's training step against `open_clip_train.main`, same model, batch and precision, like for like.

    PYTHONPATH=platform python bench/train_throughput.py --compile                      # GPU: ViT-B-32, 512, bf16
    PYTHONPATH=platform python bench/train_throughput.py --model cliplab-tiny --batch 64 --device cpu

1. `open_clip_train.main` (from the installed open_clip wheel) with `--dataset-type synthetic`,
   run in a subprocess; its own per-step `samples/s` log lines are parsed. With `--compile` it
   runs a second time with its own `--torchcompile`.
2. cliplab's Ray-free step (`cliplab.train.step.train_step`: DualEncoder + the `clip` objective
   + AdamW with CLIP's parameter groups) on synthetic tensors, eager and (with `--compile`) under
   `torch.compile`, timed per step in this process, step start to step start (as a training loop runs).

Each drops the first `--warmup` steps and reports the median samples/s. open_clip's figure
includes its synthetic data loader (worker processes); cliplab's is the step alone, because its
data path (Ray Data) runs in separate CPU tasks. Prints a Markdown table and the like-for-like
ratios: cliplab eager / open_clip_train eager, and cliplab compiled / open_clip_train compiled
(the goal: ≥ 1.6×, with MFU ≥ 40% for ViT-B/32 at batch 512 on a GPU).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _synthetic import synthetic_step
from cliplab.models import CONFIG_DIR
from cliplab.train.metering import count_flops, peak_tflops

OPEN_CLIP_PRECISION = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}


def open_clip_train(args, compile_model: bool = False) -> float:
    """Median samples/s of open_clip_train.main on synthetic data (``--torchcompile`` when asked)."""
    with tempfile.TemporaryDirectory() as logs:
        argv = ["--dataset-type", "synthetic", "--train-num-samples", str(args.steps * args.batch),
                "--batch-size", str(args.batch), "--epochs", "1", "--model", args.model, "--workers", str(args.workers),
                "--precision", OPEN_CLIP_PRECISION[args.precision], "--device", args.device,
                "--log-every-n-steps", "1", "--logs", logs, "--name", "bench", "--save-frequency", "0",
                "--report-to", "", "--warmup", "10", "--lr", "5e-4", *(["--torchcompile"] if compile_model else [])]
        code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                "from open_clip_train.main import main; main(sys.argv[2:])")
        proc = subprocess.run([sys.executable, "-c", code, str(CONFIG_DIR), *argv], capture_output=True, text=True)
        log = Path(logs, "bench", "out.log")
        if proc.returncode != 0 or not log.is_file():
            raise SystemExit(f"open_clip_train failed:\n{proc.stderr[-3000:]}")
        rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log.read_text())]
    return statistics.median(rates[args.warmup:])


def cliplab_step(args, compile_model: bool) -> float:
    """Median samples/s of cliplab's train_step on synthetic tensors."""
    step = synthetic_step(args.model, "clip", args.batch, args.device, args.precision,
                          compile_mode=args.compile_mode if compile_model else False)
    if args.flops is None:  # counted once, eager, on the first (warm-up) step: the same FLOPs compiled
        _, args.flops = count_flops(step.run)
    # timed like a training loop, step start to step start: each step's own host sync (its
    # metrics) bounds it, and nothing else waits for the GPU (open_clip_train's per-step
    # log line syncs the same way)
    step.sync()
    stamps = [time.perf_counter()]
    for _ in range(args.steps):
        step.run()
        stamps.append(time.perf_counter())
    step.sync()  # the last step's optimizer kernels count too
    stamps[-1] = time.perf_counter()
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return args.batch / statistics.median(times[args.warmup:])


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32" if gpu else "cliplab-tiny")
    p.add_argument("--batch", type=int, default=512 if gpu else 64)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16" if gpu else "fp32")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="open_clip_train's data-loader worker processes (its synthetic images are made on the CPU)")
    p.add_argument("--compile", action="store_true",
                   help="also time both compiled: cliplab's step under torch.compile, open_clip_train with --torchcompile")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for cliplab's step: default, reduce-overhead, max-autotune-no-cudagraphs")
    p.add_argument("--skip-open-clip", action="store_true", help="time cliplab only (ratios then against its eager step)")
    args = p.parse_args()
    args.flops = None

    # (name, samples/s, the open_clip_train row it is compared with like for like)
    rows = [] if args.skip_open_clip else [("open_clip_train.main (eager)", open_clip_train(args), None)]
    rows.append(("cliplab train_step (eager)", cliplab_step(args, compile_model=False), rows[0][0] if rows else None))
    if args.compile:
        if not args.skip_open_clip:
            rows.append(("open_clip_train.main (--torchcompile)", open_clip_train(args, compile_model=True), None))
        rows.append((f"cliplab train_step (torch.compile, mode {args.compile_mode or 'default'})",
                     cliplab_step(args, compile_model=True),
                     None if args.skip_open_clip else "open_clip_train.main (--torchcompile)"))
    rates = {name: rate for name, rate, _ in rows}
    device = torch.cuda.get_device_name() if gpu and args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, {args.precision}, {device}, median of steps {args.warmup}..{args.steps}\n")
    peak = peak_tflops(torch.device(args.device))
    per_sample = args.flops / args.batch  # the same model and batch in every row
    print(f"FLOPs per sample (torch.utils.flop_counter, forward + backward): {per_sample / 1e9:.1f} GFLOP; "
          f"peak bf16 dense: {peak or 'unknown'} TFLOP/s\n")
    print("| trainer | samples/s | vs open_clip_train, like for like | TFLOP/s | MFU |\n| --- | --- | --- | --- | --- |")
    for name, rate, against in rows:
        tflops = rate * per_sample / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        ratio = f"{rate / rates[against]:.2f}×" if against else "1.00×" if name.startswith("open_clip") else "-"
        print(f"| {name} | {rate:,.0f} | {ratio} | {tflops:.1f} | {mfu} |")
    print()
    for name, rate, against in rows:
        if against:
            print(f"ratio {name} / {against}: {rate / rates[against]:.2f}×")


if __name__ == "__main__":
    main()
