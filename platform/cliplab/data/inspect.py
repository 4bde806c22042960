"""``cliplab data inspect``: what a set of shards holds, read in parallel (local or s3://).

Counts samples and skip reasons (the shared decoder of training, val and eval), image
formats, an image size histogram (by the longer side), caption
length statistics (characters and words) and the first few samples.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cliplab.data.decode import Limits, Sample, ShardFault, Skip, decode_sample, shard_groups
from cliplab.data.sources import ShardSet

SIZE_BINS = (64, 128, 256, 512, 1024, 2048)
MAX_EXAMPLES = 50  # the report stays small whatever --examples asks
CAPTION_CHARS = 200  # an example's caption and key are cut to these lengths
KEY_CHARS = 120


def size_bin(side: int) -> str:
    lo = 0
    for hi in SIZE_BINS:
        if side < hi:
            return f"{lo}-{hi - 1}px"
        lo = hi
    return f">={SIZE_BINS[-1]}px"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def inspect_shard(path: str, filesystem, url: str, keep: int, limits: Limits = Limits()) -> dict[str, Any]:
    """One shard through the shared decoder (:mod:`cliplab.data.decode`: the same caps, checks and
    full image decode as training); ``keep`` examples, with key and caption truncated."""
    out: dict[str, Any] = {"samples": 0, "skipped": Counter(), "sizes": Counter(), "formats": Counter(),
                           "chars": [], "words": [], "examples": [], "shard_samples": {url: 0}}
    try:
        for group in shard_groups(filesystem, path, limits):
            _count(out, url, decode_sample(group), keep)
    except ShardFault as fault:
        out["skipped"][fault.reason] += 1
    return out


def _count(out: dict[str, Any], url: str, sample: Sample | Skip, keep: int) -> None:
    if isinstance(sample, Skip):
        out["skipped"][sample.reason] += 1
        return
    caption = sample.caption
    out["samples"] += 1
    out["shard_samples"][url] += 1
    out["sizes"][size_bin(max(sample.size))] += 1
    out["formats"][sample.format] += 1
    out["chars"].append(len(caption))
    out["words"].append(len(caption.split()))
    if len(out["examples"]) < keep:
        out["examples"].append({"shard": url, "key": _clip(sample.key, KEY_CHARS),
                                "caption": _clip(caption, CAPTION_CHARS), "size": list(sample.size),
                                "format": sample.format})


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "mean": round(float(a.mean()), 1), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def inspect_shards(shards: ShardSet, *, examples: int = 3, workers: int = 8, progress: bool = True,
                   limits: Limits = Limits()) -> dict[str, Any]:
    """Read every shard of ``shards`` (a thread per shard, up to ``workers``) and summarise. The
    report is bounded: at most :data:`MAX_EXAMPLES` examples, captions cut to :data:`CAPTION_CHARS`."""
    from tqdm import tqdm

    examples = max(0, min(examples, MAX_EXAMPLES))
    prefix = "s3://" if shards.is_s3 else ""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(shards.paths)))) as pool:
        parts = list(tqdm(pool.map(lambda p: inspect_shard(p, shards.filesystem, prefix + p, examples, limits), shards.paths),
                          total=len(shards.paths), desc="reading shards", unit="shard", disable=not progress))
    skipped, sizes, formats, per_shard = Counter(), Counter(), Counter(), {}
    chars, words, found = [], [], []
    for part in parts:
        skipped.update(part["skipped"])
        sizes.update(part["sizes"])
        formats.update(part["formats"])
        chars += part["chars"]
        words += part["words"]
        found += part["examples"]
        per_shard.update(part["shard_samples"])
    order = [f"{lo}-{hi - 1}px" for lo, hi in zip((0, *SIZE_BINS[:-1]), SIZE_BINS, strict=True)] + [f">={SIZE_BINS[-1]}px"]
    return {
        "url": shards.url,
        "shards": len(shards.paths),
        "samples": sum(p["samples"] for p in parts),
        "skipped": dict(skipped),
        "image_formats": dict(formats),
        "image_size_histogram": {b: sizes.get(b, 0) for b in order},
        "caption_chars": _stats(chars),
        "caption_words": _stats(words),
        "samples_per_shard": _stats(list(per_shard.values())),
        "examples": found[:examples],
    }


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"{report['url']}: {report['samples']} samples in {report['shards']} shards",
             "skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items())) or "none"),
             "image formats: " + (", ".join(f"{k} {v}" for k, v in report["image_formats"].items()) or "-"),
             "image size (longer side):"]
    peak = max(report["image_size_histogram"].values() or [0]) or 1
    for label, n in report["image_size_histogram"].items():
        lines.append(f"  {label:>12} {n:8d} {'#' * round(40 * n / peak)}")
    for name in ("caption_chars", "caption_words", "samples_per_shard"):
        s = report[name]
        if s:
            lines.append(f"{name.replace('_', ' ')}: min {s['min']}, mean {s['mean']}, median {s['median']:g}, "
                         f"p95 {s['p95']:g}, max {s['max']}")
    if report["examples"]:
        lines.append("examples:")
        for ex in report["examples"]:
            lines.append(f"  {ex['shard']}:{ex['key']}  {ex['size'][0]}x{ex['size'][1]} {ex['format']}  {ex['caption']!r}")
    return "\n".join(lines)
