"""Forward+backward time and peak memory of every objective preset against CLIP, on one device.

    PYTHONPATH=platform python bench/objectives.py [--device cuda] [--sizes 4096 16384 32768]

Sizes are the global batch N on one device (N × N logits), plus the per-rank slice of a
data-parallel run: 2048 local rows against 32768 global columns (``--slice``). The slice is
emulated on one device: the other ranks' features are fixed tensors appended by the gather,
so the cost measured is exactly one rank's loss. Features are fp32, D = 512. Objectives are
Ray-free, so no cluster is needed. Prints a Markdown table (paste it into docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cliplab.config import ObjectiveConfig
from cliplab.distributed import DistContext
from cliplab.objectives import build_objective

PRESETS = ("clip", "siglip", "cloob", "meru", "xclr")


class SliceContext(DistContext):
    """One rank of ``world_size``: gathers append fixed features of the other ranks."""

    def __init__(self, world_size: int, others: dict[int, torch.Tensor]) -> None:
        super().__init__(rank=0, world_size=world_size)
        object.__setattr__(self, "_others", others)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, self._others[t.shape[-1]]])

    def gather_no_grad(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, self._others[t.shape[-1]]])


def measure(preset: str, local: int, global_: int, dim: int, device: str, iters: int,
            hopfield_chunk: int | None = ObjectiveConfig.hopfield_chunk) -> tuple[float, float]:
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name=preset, learn_temperature=True, hopfield_chunk=hopfield_chunk),
                          embed_dim=dim).to(device)
    feats = [torch.randn(local, dim, device=device, requires_grad=True) for _ in range(3)]
    extras = {"image_features_2": feats[2], "caption_embeddings": torch.randn(local, 384, device=device)}
    if global_ > local:
        others = {d: torch.randn(global_ - local, d, device=device) for d in (dim, 384)}
        ctx: DistContext = SliceContext(global_ // local, others)
    else:
        ctx = DistContext()

    def step():
        out = obj.loss(feats[0], feats[1], ctx, extras)
        out.loss.backward()

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return statistics.median(times) * 1000, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--slice", type=int, nargs=2, default=[2048, 32768], metavar=("LOCAL", "GLOBAL"))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--hopfield-chunk", type=int, default=ObjectiveConfig.hopfield_chunk,
                        help="objective.hopfield_chunk for CLOOB (0: keep the B × N weights, no recomputation)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="clip is always the first row")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false",
                        help="IEEE fp32 matmuls (default: TF32 on CUDA, as training's train.tf32 and the anchors)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = [(n, n) for n in args.sizes] + [tuple(args.slice)]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    tf32 = "TF32 matmuls" if args.tf32 and args.device.startswith("cuda") else "IEEE fp32 matmuls"
    print(f"device: {name}, torch {torch.__version__}, fp32 features ({tf32}), D = {args.dim}, "
          f"median of {args.iters} forward+backward passes\n")
    print("| rows × columns | objective | time (ms) | × CLIP | peak memory (GiB) | × CLIP |")
    print("|---|---|---|---|---|---|")
    for local, global_ in shapes:
        base = None
        for preset in ["clip", *(p for p in args.presets if p != "clip")]:
            try:
                ms, mem = measure(preset, local, global_, args.dim, args.device, args.iters, args.hopfield_chunk or None)
            except torch.OutOfMemoryError:
                print(f"| {local} × {global_} | {preset} | OOM | | | |")
                torch.cuda.empty_cache()
                continue
            base = base or (ms, mem)
            print(f"| {local} × {global_} | {preset} | {ms:.1f} | {ms / base[0]:.2f} | {mem:.2f} | "
                  f"{mem / base[1]:.2f} |", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
