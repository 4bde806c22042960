"""Throughput, data-wait, memory and MFU for the training loop. No Ray here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# dense bf16 peak TFLOP/s per GPU (vendor datasheets, without sparsity), matched on the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """The per-device peak for MFU: ``configured``, else a known GPU's datasheet value, else None."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once under torch's FLOP counter: its result and the FLOPs it executed
    (forward and backward matmuls/convolutions, as ``torch.utils.flop_counter`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, float(counter.get_total_flops())


class Throughput:
    """Per-epoch meter: samples/s per worker and overall, and the fraction of wall time spent
    waiting for the next batch (the data pipeline not keeping up)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.start_epoch()

    def start_epoch(self) -> None:
        self.t0 = time.perf_counter()
        self.wait = 0.0
        self.samples = 0
        self.steps = 0

    def timed(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def step_done(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def metrics(self, flops_per_step: float | None, device: torch.device,
                configured_peak: float | None = None) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        per_worker = self.samples / elapsed
        out = {"train/samples_per_s_per_worker": per_worker,
               "train/samples_per_s": per_worker * self.world_size,
               "train/data_wait_fraction": self.wait / elapsed}
        if flops_per_step:
            achieved = flops_per_step * self.steps / elapsed / 1e12
            out["train/tflops_per_s_per_worker"] = achieved
            peak = peak_tflops(device, configured_peak)
            if peak:
                out["train/mfu"] = achieved / peak
        if device.type == "cuda":
            out["train/gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
