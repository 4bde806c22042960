"""``cliplab data inspect``: what a set of shards holds, read in parallel (local or s3://).

Counts samples and skip reasons (the same checks as training's index and decode), image
formats, an image size histogram (by the longer side), caption
length statistics (characters and words) and the first few samples.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cliplab.data.index import IMAGE_EXTS, _check_group, split_name
from cliplab.data.sources import ShardSet

SIZE_BINS = (64, 128, 256, 512, 1024, 2048)


def size_bin(side: int) -> str:
    lo = 0
    for hi in SIZE_BINS:
        if side < hi:
            return f"{lo}-{hi - 1}px"
        lo = hi
    return f">={SIZE_BINS[-1]}px"


def _image_size(raw: bytes) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """``(size, format, problem)``: a full decode, as training does (``problem`` is its skip reason)."""
    from PIL import Image

    from cliplab.data.pipeline import load_rgb

    rgb, problem = load_rgb(raw)
    if rgb is None:
        return None, None, problem[0]
    with Image.open(io.BytesIO(raw)) as im:
        return rgb.size, (im.format or "").lower(), None


def inspect_shard(path: str, filesystem, url: str, keep: int) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": 0, "skipped": Counter(), "sizes": Counter(), "formats": Counter(),
                           "chars": [], "words": [], "examples": [], "shard_samples": {url: 0}}

    def finish(key: str, files: dict) -> None:
        reason = _check_group({k: v for k, v in files.items()})
        raw = next((files[e] for e in IMAGE_EXTS if e in files), None)
        size = fmt = None
        if reason is None:
            size, fmt, reason = _image_size(raw)
        if reason:
            out["skipped"][reason] += 1
            return
        caption = files["txt"].decode("utf-8").strip()
        out["samples"] += 1
        out["shard_samples"][url] += 1
        out["sizes"][size_bin(max(size))] += 1
        out["formats"][fmt] += 1
        out["chars"].append(len(caption))
        out["words"].append(len(caption.split()))
        if len(out["examples"]) < keep:
            out["examples"].append({"shard": url, "key": key, "caption": caption, "size": list(size), "format": fmt})

    key, files = None, {}
    try:
        with filesystem.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if k != key and key is not None:
                    finish(key, files)
                    files = {}
                key = k
                files[ext] = tar.extractfile(member).read()
        if key is not None:
            finish(key, files)
    except (tarfile.TarError, OSError, EOFError):
        out["skipped"]["unreadable_shard" if key is None else "truncated_tar"] += 1
    return out


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "mean": round(float(a.mean()), 1), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def inspect_shards(shards: ShardSet, *, examples: int = 3, workers: int = 8, progress: bool = True) -> dict[str, Any]:
    """Read every shard of ``shards`` (a thread per shard, up to ``workers``) and summarise."""
    from tqdm import tqdm

    prefix = "s3://" if shards.is_s3 else ""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(shards.paths)))) as pool:
        parts = list(tqdm(pool.map(lambda p: inspect_shard(p, shards.filesystem, prefix + p, examples), shards.paths),
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
