"""The epoch plan: which sample each rank reads, in which order. Pure numpy, no I/O, no Ray.

For epoch ``e`` and seed ``s`` (``rng = default_rng([s, e])``):

1. **Mixing.** The epoch has as many samples as all sources hold together; source ``k`` gets
   ``round(w_k / Σw · N)`` of them (largest remainders). A source draws whole shards in a
   seeded random order (again and again when up-weighted) and a seeded subset of its last shard.
2. **Shard shuffle.** The drawn shard chunks of all sources are shuffled together.
3. **Rank split.** The sample sequence is cut into ``world`` contiguous slices of equal length
   (``N // world``; the remainder, different each epoch, is left out), so each rank streams
   whole shards and every rank can produce the same number of batches.
4. **Sample shuffle.** Each rank's slice is shuffled within consecutive windows of
   ``shuffle_window`` samples (one read task each: a window is read with a few range requests).

A rank's plan is a pure function of (index, seed, epoch, world, rank, window), so a restarted
rank rebuilds it and continues at the first position it had not consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cliplab.data.index import TrainIndex


@dataclass(frozen=True)
class RankPlan:
    """One rank's samples for one epoch, in reading order: shard ``gid[p]``, sample ``idx[p]``."""

    epoch: int
    rank: int
    gid: np.ndarray
    idx: np.ndarray
    window: int

    def __len__(self) -> int:
        return len(self.gid)

    def windows(self, start: int = 0) -> list[tuple[int, int]]:
        """``[lo, hi)`` position ranges of the read tasks, the first one starting at ``start``."""
        out = []
        for lo in range(0, len(self), self.window):
            hi = min(lo + self.window, len(self))
            if hi > start:
                out.append((max(lo, start), hi))
        return out


def quotas(sizes: list[int], weights: list[float], total: int | None = None) -> list[int]:
    """Samples per source for an epoch of ``total`` (default Σ sizes), by weight, summing exactly."""
    total = sum(sizes) if total is None else total
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[k] += 1
    return [int(x) for x in out]


def epoch_sequence(index: TrainIndex, *, seed: int, epoch: int, shuffle_shards: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's global sample sequence ``(gid, idx)`` before the rank split (steps 1-2)."""
    rng = np.random.default_rng([seed, epoch])
    counts = index.counts()
    src = np.asarray(index.shard_source)
    chunks: list[tuple[int, np.ndarray]] = []
    for k, need in enumerate(quotas(index.source_samples(), list(index.weights))):
        gids = np.flatnonzero((src == k) & (counts > 0))
        while need > 0:
            order = rng.permutation(gids) if shuffle_shards else gids
            for g in order:
                n = int(counts[g])
                take = min(n, need)
                idx = np.arange(n) if take == n else np.sort(rng.choice(n, take, replace=False))
                chunks.append((int(g), idx))
                need -= take
                if need == 0:
                    break
    if shuffle_shards:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    gid = np.concatenate([np.full(len(i), g, np.int64) for g, i in chunks])
    idx = np.concatenate([i.astype(np.int64) for _, i in chunks])
    return gid, idx


def samples_per_rank(index: TrainIndex, world: int) -> int:
    return int(index.counts().sum()) // world


def steps_per_epoch(index: TrainIndex, world: int, batch_size: int) -> int:
    """Batches every rank gets per epoch (the same on all ranks)."""
    return samples_per_rank(index, world) // batch_size


def rank_plan(index: TrainIndex, *, seed: int, epoch: int, world: int, rank: int, window: int,
              shuffle: bool = True) -> RankPlan:
    """Rank ``rank``'s reading order for ``epoch`` (steps 3-4)."""
    gid, idx = epoch_sequence(index, seed=seed, epoch=epoch, shuffle_shards=shuffle)
    per_rank = len(gid) // world
    lo = rank * per_rank
    gid, idx = gid[lo:lo + per_rank].copy(), idx[lo:lo + per_rank].copy()
    if shuffle:
        rng = np.random.default_rng([seed, epoch, 1, rank])
        for w in range(0, per_rank, window):
            perm = w + rng.permutation(min(window, per_rank - w))
            gid[w:w + len(perm)], idx[w:w + len(perm)] = gid[perm], idx[perm]
    return RankPlan(epoch, rank, gid, idx, window)


def read_spec(index: TrainIndex, plan: RankPlan, lo: int, hi: int) -> dict:
    """What one read task needs for positions ``[lo, hi)``: per row ``[pos, gid, start, end]``
    and each shard's path (as its filesystem names it) and whether it lives on S3."""
    rows = []
    shards: dict[str, list] = {}
    for p in range(lo, hi):
        g, i = int(plan.gid[p]), int(plan.idx[p])
        shard = index.shards[g]
        rows.append([p, g, int(shard.starts[i]), int(shard.ends[i])])
        if str(g) not in shards:
            shards[str(g)] = [shard.path, bool(index.is_s3[index.shard_source[g]]), index.url_of(g)]
    return {"rows": rows, "shards": shards}


# -- resume integrity ---------------------------------------------------------------------------
PLAN_KEYS = ("seed", "shuffle_files", "shuffle_window", "batch_size")  # data.* that shape the plan and position


def fingerprint(index: TrainIndex, data_cfg) -> dict:
    """What a checkpoint's data position is relative to: every shard (as listed, with its usable
    sample count), the sources' names and weights, and the ``data.*`` keys that shape the plan.
    Plain types only (it is saved in ``trainer.pt``)."""
    return {"shards": [index.url_of(g) for g in range(len(index.shards))],
            "counts": [int(c) for c in index.counts()],
            "sources": [[n, float(w)] for n, w in zip(index.names, index.weights, strict=True)],
            "config": {k: getattr(data_cfg, k) for k in PLAN_KEYS + _fraction_keys(data_cfg)}}


def _fraction_keys(data_cfg) -> tuple[str, ...]:
    """The subset's keys, only where there is a subset (checkpoints from before the option match)."""
    return ("train_fraction", "train_fraction_seed") if getattr(data_cfg, "train_fraction", 1.0) < 1 else ()


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def data_changes(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's :func:`fingerprint` and the current one, one phrase each
    (empty when the plan is the same)."""
    out = [f"data.{k} {saved['config'].get(k)!r} → {current['config'].get(k)!r}"
           for k in current["config"] if saved.get("config", {}).get(k) != current["config"][k]]
    if [tuple(s) for s in saved.get("sources", [])] != [tuple(s) for s in current["sources"]]:
        out.append(f"sources {saved.get('sources')} → {current['sources']}")
    was = dict(zip(saved.get("shards", []), saved.get("counts", []), strict=True))
    now = dict(zip(current["shards"], current["counts"], strict=True))
    added, removed = [s for s in now if s not in was], [s for s in was if s not in now]
    if added:
        out.append(f"{len(added)} shard(s) added ({_some(added)})")
    if removed:
        out.append(f"{len(removed)} shard(s) removed ({_some(removed)})")
    recounted = [f"{s} {was[s]} → {now[s]} samples" for s in now if s in was and was[s] != now[s]]
    if recounted:
        out.append(f"{len(recounted)} shard(s) changed ({_some(recounted)})")
    if not (added or removed or recounted) and list(was) != list(now):
        out.append("the shard order changed")
    return out
