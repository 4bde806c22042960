"""The shard index: where every usable sample sits in its tar, and why the others are skipped.

Training reads samples by byte range, so that every rank can read its own deterministic list
of samples (and resume at any of them) instead of whole shards in whatever order Ray Data's
dynamic split hands them out. The index is one streaming pass over each tar's members
(parallel over shards, cached on disk by path, size and mtime), which also catches the
structural faults that never need an image decode:

==================  =====================================================================
reason              counted per
==================  =====================================================================
unreadable_shard    shard that cannot be opened or is not a tar (0 samples from it)
truncated_tar       shard that ends mid-member or without its end marker (the samples
                    read before the cut are kept; the one being read is dropped)
oversized_member    sample with a member over its cap (``data.max_image_bytes`` for images,
                    ``data.max_text_bytes`` for the rest), judged by its declared size and
                    never read (also a long-name/pax header over 1 MiB: the rest of that
                    shard is skipped)
empty_file          sample with a 0-byte member
missing_image       sample without a jpg/jpeg/png/webp member
missing_caption     sample without a txt member
non_utf8_caption    sample whose txt is not UTF-8
empty_caption       sample whose txt is blank
==================  =====================================================================

Image content faults (``corrupt_image``, ``truncated_image``, ``decompression_bomb``), byte
ranges that cannot be read any more (``read_error``) and X-CLR keys without a caption embedding
(``missing_embedding``) are found by the decode tasks (:mod:`cliplab.data.stream`). Each skip
is logged with shard and key. The reading, grouping and checks are :mod:`cliplab.data.decode`,
shared with val, ``cliplab eval`` and ``cliplab data inspect``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import sys
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cliplab.data.decode import (
    GROUP_REASONS,
    IMAGE_EXTS,  # noqa: F401 - one list of image extensions, re-exported
    IMAGE_REASONS,
    SHARD_REASONS,
    Limits,
    ShardFault,
    Skip,
    check_group,
    shard_groups,
    split_name,  # noqa: F401 - the key rule, re-exported
)
from cliplab.data.sources import ShardSet
from cliplab.errors import DataError

log = logging.getLogger(__name__)

INDEX_REASONS = SHARD_REASONS + GROUP_REASONS
DECODE_REASONS = (*IMAGE_REASONS, "read_error", "missing_embedding")
REASONS = INDEX_REASONS + DECODE_REASONS
DEFAULT_LIMITS = Limits()
CACHE_VERSION = 2  # 2: member caps (oversized_member); a sparse member's range ends at its stored data


@dataclass
class ShardIndex:
    """The usable samples of one tar: byte ranges ``[starts[i], ends[i])`` (member headers
    included) in tar order, and the count of skipped samples/shards by reason."""

    path: str
    starts: np.ndarray
    ends: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.starts)


def scan_shard(path: str, filesystem, url: str | None = None, limits: Limits = DEFAULT_LIMITS) -> ShardIndex:
    """One streaming pass over a tar: group members by key and check each sample's structure
    (:func:`~cliplab.data.decode.check_group`; only captions are read, and no member over its cap)."""
    where = url or path
    starts: list[int] = []
    ends: list[int] = []
    skipped: Counter = Counter()
    try:
        for group in shard_groups(filesystem, path, limits, read=lambda ext: ext == "txt"):
            reason = check_group(group)
            if reason:
                skipped[reason] += 1
                log.warning("skipping %s:%s: %s", where, group.key, Skip(reason, group.oversized))
            else:
                starts.append(group.start)
                ends.append(group.end)
    except ShardFault as fault:
        skipped[fault.reason] += 1
        log.warning("shard %s: %s after %d samples (%s); the rest is skipped", where, fault.reason.replace("_", " "),
                    len(starts), fault.detail)
    return ShardIndex(path, np.asarray(starts, np.int64), np.asarray(ends, np.int64), dict(skipped))


def _cache_dir() -> Path:
    return Path(os.environ.get("CLIPLAB_INDEX_CACHE") or Path.home() / ".cache" / "cliplab" / "shard-index")


def _cache_file(path: str, info, limits: Limits) -> Path:
    mtime = getattr(info, "mtime_ns", None)
    caps = f"{limits.image_bytes}|{limits.text_bytes}"
    digest = hashlib.blake2b(f"{CACHE_VERSION}|{path}|{info.size}|{mtime}|{caps}".encode(),
                             digest_size=16).hexdigest()
    return _cache_dir() / f"{digest}.pkl"


def index_shards(shards: ShardSet, *, workers: int = 16, progress: bool = False,
                 limits: Limits = DEFAULT_LIMITS) -> list[ShardIndex]:
    """Index every shard of ``shards``, reusing cached indexes of unchanged shards (same path,
    size, mtime and member caps; ``CLIPLAB_INDEX_CACHE`` or ~/.cache/cliplab).

    The scans of uncached shards read each tar once, end to end. With a Ray driver connected they
    run as Ray tasks (``scan_shard``, a quarter CPU each), so a large corpus is indexed by the
    whole cluster; otherwise on a local thread pool of ``workers`` (the scans are I/O bound)."""
    infos = shards.filesystem.get_file_info(list(shards.paths))
    prefix = "s3://" if shards.is_s3 else ""
    entries: list[ShardIndex | None] = [None] * len(infos)
    todo: list[tuple[int, str, Path | None]] = []
    for i, (path, info) in enumerate(zip(shards.paths, infos, strict=True)):
        cache = _cache_file(f"{prefix}{path}", info, limits) if info.size else None
        entries[i] = _load_cached(cache)
        if entries[i] is None:
            todo.append((i, path, cache))
    desc = f"indexing {shards.url}"
    scan = _scan_on_ray if todo and _ray_connected() else _scan_in_threads
    scanned = scan([(path, f"{prefix}{path}") for _, path, _ in todo], shards.filesystem,
                   workers=workers, progress=progress, desc=desc, limits=limits)
    for (i, _, cache), entry in zip(todo, scanned, strict=True):
        entries[i] = entry
        if cache is not None and "unreadable_shard" not in entry.skipped:
            _store_cached(cache, entry)
    return entries  # type: ignore[return-value]


def _load_cached(cache: Path | None) -> ShardIndex | None:
    if cache is None or not cache.is_file():
        return None
    try:
        return pickle.loads(cache.read_bytes())
    except Exception:  # noqa: BLE001 - a bad cache entry is rebuilt
        return None


def _store_cached(cache: Path, entry: ShardIndex) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(entry))
        tmp.replace(cache)
    except OSError:
        pass


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _scan_in_threads(items, filesystem, *, workers: int, progress: bool, desc: str,
                     limits: Limits) -> list[ShardIndex]:
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(tqdm(pool.map(lambda it: scan_shard(it[0], filesystem, it[1], limits), items), total=len(items),
                         desc=desc, unit="shard", disable=not progress or not items))


def _scan_on_ray(items, filesystem, *, workers: int, progress: bool, desc: str, limits: Limits) -> list[ShardIndex]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from tqdm import tqdm

    # outside any placement group: a sweep's trial indexes its own data from inside Tune's (a sliver of CPU)
    task = ray.remote(num_cpus=0.25, max_retries=2)(scan_shard).options(
        name="scan_shard", scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    fs_ref = ray.put(filesystem)
    refs = [task.remote(path, fs_ref, url, limits) for path, url in items]
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="shard", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), 64), timeout=1.0)
            bar.update(len(done))
    return ray.get(refs)


@dataclass(frozen=True)
class TrainIndex:
    """Every training source's shards, indexed. ``gid`` numbers shards across sources."""

    names: tuple[str, ...]  # per source
    urls: tuple[str, ...]
    weights: tuple[float, ...]
    is_s3: tuple[bool, ...]
    shard_source: tuple[int, ...]  # per gid
    shards: tuple[ShardIndex, ...]  # per gid

    def counts(self) -> np.ndarray:
        return np.array([len(s) for s in self.shards], dtype=np.int64)

    def source_samples(self) -> list[int]:
        out = [0] * len(self.names)
        for src, shard in zip(self.shard_source, self.shards, strict=True):
            out[src] += len(shard)
        return out

    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for shard in self.shards:
            total.update(shard.skipped)
        return dict(total)

    def url_of(self, gid: int) -> str:
        return ("s3://" if self.is_s3[self.shard_source[gid]] else "") + self.shards[gid].path


def build_train_index(sources: Sequence[tuple[str, float, ShardSet]], *, progress: bool = False,
                      limits: Limits = DEFAULT_LIMITS) -> TrainIndex:
    """Index each ``(name, weight, shards)``; a source with no usable sample is a :class:`DataError`."""
    names, urls, weights, is_s3, shard_source, entries = [], [], [], [], [], []
    for i, (name, weight, shards) in enumerate(sources):
        found = index_shards(shards, progress=progress, limits=limits)
        usable = sum(len(e) for e in found)
        if usable == 0:
            skipped = Counter()
            for e in found:
                skipped.update(e.skipped)
            raise DataError(f"data source '{name}' ({shards.url}) has no readable samples in "
                            f"{len(found)} shards (skipped: {dict(skipped) or 'nothing'})")
        names.append(name)
        urls.append(shards.url)
        weights.append(float(weight))
        is_s3.append(shards.is_s3)
        shard_source.extend([i] * len(found))
        entries.extend(found)
    return TrainIndex(tuple(names), tuple(urls), tuple(weights), tuple(is_s3), tuple(shard_source), tuple(entries))


def subsample(index: TrainIndex, fraction: float, seed: int = 0) -> TrainIndex:
    """``index`` with each sample kept with probability ``fraction`` (``data.train_fraction``).

    Sample ``i`` of a shard is kept when ``u_i < fraction``, where ``u`` is a uniform draw from a
    generator seeded by the shard's file name and ``seed``: the same subset on every rank, run and
    storage (local or S3), and a smaller fraction's subset inside a larger one's. Dropped samples
    are not counted as skipped. A source left with no sample is a :class:`DataError`."""
    if fraction >= 1:
        return index
    shards = []
    for shard in index.shards:
        name = shard.path.rstrip("/").rsplit("/", 1)[-1]
        u = np.random.default_rng([zlib.crc32(name.encode()), seed]).random(len(shard))
        keep = u < fraction
        shards.append(ShardIndex(shard.path, shard.starts[keep], shard.ends[keep], dict(shard.skipped)))
    out = dataclasses.replace(index, shards=tuple(shards))
    for name, n_before, n_after in zip(index.names, index.source_samples(), out.source_samples(), strict=True):
        if n_after == 0:
            raise DataError(f"data.train_fraction={fraction:g} keeps no sample of source '{name}' "
                            f"({n_before} samples): raise the fraction")
    return out


def read_ranges(filesystem, path: str, ranges: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The bytes of each ``(start, end)`` range of ``path``; adjacent ranges are read as one request."""
    out: dict[tuple[int, int], bytes] = {}
    wanted = sorted(set(ranges))
    runs: list[list[tuple[int, int]]] = []
    for r in wanted:
        if runs and r[0] <= runs[-1][-1][1] + 64 * 1024:  # adjacent (or a small gap): one request
            runs[-1].append(r)
        else:
            runs.append([r])
    with filesystem.open_input_file(path) as f:
        for run in runs:
            lo, hi = run[0][0], max(e for _, e in run)
            blob = f.read_at(hi - lo, lo)
            for start, end in run:
                out[(start, end)] = blob[start - lo:end - lo]
    return out
