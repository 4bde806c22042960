"""The training stream: each rank reads its own deterministic samples through Ray Data tasks.

Ray Data's ``streaming_split`` hands blocks to whichever rank asks first, which makes neither
the order nor a resume position reproducible. Here every rank instead builds its
:class:`~cliplab.data.plan.RankPlan` for the epoch and runs its own small Ray Data pipeline:
one CPU task per shuffle window reads the window's samples by byte range (a few requests per
shard), decodes, augments (open_clip's train transform) and tokenizes them, in plan order
(``preserve_order``). The worker re-batches the rows into exactly ``batch_size`` samples,
moves them to the device (pinned memory and a non-blocking copy on CUDA; images travel as
uint8 and are normalised on the device) and tracks:

* the **position**: the plan position after the last sample handed to training, so a restart
  continues at the next unseen sample of the epoch (it is saved in the checkpoint);
* **skips** by reason: bad rows reach the worker as flagged rows (no image), so the counts are
  exact, summed over ranks, and cover only consumed positions (resume never counts twice).

Every rank yields ``steps_per_epoch`` batches. After the last one it reads the rest of its
slice only to count skips. If undecodable images left it short, it pads with a second pass over
its own slice (warned; those repeats are not counted as skips again).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from cliplab.data.decode import Limits, ShardFault, Skip, check_group, decode_sample, parse_sample
from cliplab.data.index import REASONS, TrainIndex, read_ranges
from cliplab.data.pipeline import _caption_table, _transforms
from cliplab.data.plan import RankPlan, rank_plan, read_spec
from cliplab.errors import DataError

log = logging.getLogger(__name__)

ROW_REASONS = ("ok", *REASONS)  # a row's skip code → reason
_CODE = {r: i for i, r in enumerate(ROW_REASONS)}
OUT_ROWS = 64  # rows per emitted block
RECORD_ENV = "CLIPLAB_RECORD_KEYS"  # or data.record_keys: a folder where each rank appends "epoch<TAB>batch<TAB>key"


@lru_cache(maxsize=4)
def _split_transform(model_name: str):
    """open_clip's train transform without ToTensor/Normalize (→ uint8 HWC) and its mean/std."""
    from torchvision import transforms as T

    transform, tokenizer = _transforms(model_name, True)
    steps = list(transform.transforms)
    normalize = steps[-1]
    if not type(normalize).__name__.endswith("Normalize") or not type(steps[-2]).__name__.endswith("ToTensor"):
        raise ValueError(f"unexpected open_clip train transform for {model_name}: {transform}")
    size = next(t.size for t in steps if hasattr(t, "size"))
    side = size[0] if isinstance(size, (tuple, list)) else size
    return T.Compose(steps[:-2]), tuple(normalize.mean), tuple(normalize.std), int(side), tokenizer


@lru_cache(maxsize=4)
def _filesystem(s3_json: str | None):
    from pyarrow import fs

    if s3_json is None:
        return fs.LocalFileSystem()
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem

    return s3_filesystem(S3Config(**json.loads(s3_json)))


def read_decode(batch: dict[str, np.ndarray], *, model_name: str, s3: str, views: int = 1,
                captions_ref=None, limits: Limits = Limits()) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: for each read spec (one shuffle window) read, decode, augment and tokenize
    the samples, in position order. Bad samples come out as rows with ``skip > 0`` and zeros."""
    pre, _mean, _std, side, tokenizer = _split_transform(model_name)
    table = _caption_table(captions_ref)
    for spec_json in batch["spec"]:
        spec = json.loads(spec_json)
        blobs: dict[tuple[int, int, int], bytes | None] = {}
        by_shard: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for _pos, g, start, end in spec["rows"]:
            by_shard[g].append((start, end))
        for g, ranges in by_shard.items():
            path, is_s3, url = spec["shards"][str(g)]
            try:
                got = read_ranges(_filesystem(s3 if is_s3 else None), path, ranges)
                blobs.update({(g, *r): b for r, b in got.items()})
            except OSError as err:
                log.warning("cannot read %d samples of %s: %s", len(ranges), url, err)
                blobs.update({(g, *r): None for r in ranges})
        rows: list[tuple] = []
        for pos, g, start, end in spec["rows"]:
            rows.append(_decode_one(pos, blobs[(g, start, end)], spec["shards"][str(g)][2], pre, views, table,
                                    limits))
            if len(rows) == OUT_ROWS:
                yield _block(rows, side, tokenizer, views, table)
                rows = []
        if rows:
            yield _block(rows, side, tokenizer, views, table)


def _decode_one(pos: int, blob: bytes | None, url: str, pre, views: int, table, limits: Limits) -> tuple:
    """``(pos, key, reason, caption, image, image_2, embedding)``; reason None for a good sample."""
    if blob is None:
        return pos, "", "read_error", None, None, None, None
    try:
        group = parse_sample(blob, limits)
    except ShardFault as err:  # the shard changed since it was indexed
        log.warning("skipping %s at byte %s: unreadable tar members (%s)", url, pos, err.detail)
        return pos, "", "read_error", None, None, None, None
    reason = check_group(group)
    embedding = None
    if reason is None and table is not None:
        embedding = table.get(group.key)
        if embedding is None:
            reason = "missing_embedding"
    sample = Skip(reason) if reason else decode_sample(group, draft=getattr(pre.transforms[0], "size", [None])[0])
    if isinstance(sample, Skip):
        log.warning("skipping %s:%s: %s", url, group.key, sample)
        return pos, group.key, sample.reason, None, None, None, None
    image = np.asarray(pre(sample.image), dtype=np.uint8)
    image_2 = np.asarray(pre(sample.image), dtype=np.uint8) if views == 2 else None
    return pos, group.key, None, sample.caption, image, image_2, embedding


def _block(rows: list[tuple], side: int, tokenizer, views: int, table) -> dict[str, np.ndarray]:
    n = len(rows)
    ok = [i for i, r in enumerate(rows) if r[2] is None]
    image = np.zeros((n, side, side, 3), np.uint8)
    for i in ok:
        image[i] = rows[i][4]
    tokens = tokenizer([rows[i][3] for i in ok]).numpy().astype(np.int64) if ok else None
    text = np.zeros((n, tokens.shape[1] if tokens is not None else 1), np.int64)
    if tokens is not None:
        text[ok] = tokens
    out = {
        "pos": np.array([r[0] for r in rows], np.int64),
        "key": np.array([r[1] for r in rows], dtype=object),
        "skip": np.array([0 if r[2] is None else _CODE[r[2]] for r in rows], np.int16),
        "image": image,
        "text": text,
    }
    if views == 2:
        image_2 = np.zeros_like(image)
        for i in ok:
            image_2[i] = rows[i][5]
        out["image_2"] = image_2
    if table is not None:
        dim = len(next(iter(table.values())))
        emb = np.zeros((n, dim), np.float32)
        for i in ok:
            emb[i] = rows[i][6]
        out["caption_embedding"] = emb
    return out


class Rebatcher:
    """Rows (good and flagged) in position order → batches of exactly ``size`` good rows, each
    with the position after its last row and the skips it covers."""

    def __init__(self, size: int) -> None:
        self.size, self.parts, self.n, self.bad = size, [], 0, []

    def add(self, block: dict[str, np.ndarray]) -> None:
        skip = np.asarray(block["skip"])
        good = skip == 0
        self.bad.extend((int(p), ROW_REASONS[int(c)]) for p, c in zip(block["pos"][~good], skip[~good], strict=True))
        if good.any():
            self.parts.append({k: np.asarray(v)[good] for k, v in block.items() if k != "skip"})
            self.n += int(good.sum())

    def ready(self) -> Iterator[tuple[dict[str, np.ndarray], int, Counter]]:
        while self.n >= self.size:
            taken, need = [], self.size
            while need:
                part = self.parts[0]
                rows = len(part["pos"])
                if rows <= need:
                    taken.append(self.parts.pop(0))
                    need -= rows
                else:
                    taken.append({k: v[:need] for k, v in part.items()})
                    self.parts[0] = {k: v[need:] for k, v in part.items()}
                    need = 0
            self.n -= self.size
            batch = {k: np.concatenate([t[k] for t in taken]) for k in taken[0]}
            next_pos = int(batch["pos"][-1]) + 1
            yield batch, next_pos, self._take_bad(next_pos)

    def _take_bad(self, below: int | None) -> Counter:
        done = Counter(r for p, r in self.bad if below is None or p < below)
        self.bad = [] if below is None else [(p, r) for p, r in self.bad if p >= below]
        return done

    def leftover_bad(self) -> Counter:
        return self._take_bad(None)


def index_rows(index: TrainIndex, chunk: int = 4 << 20) -> list[dict[str, Any]]:
    """The index as rows of a small Ray Dataset (how it reaches every Ray Train worker)."""
    blob = pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)
    return [{"seq": i, "blob": blob[o:o + chunk]} for i, o in enumerate(range(0, len(blob), chunk))]


def index_from_rows(rows) -> TrainIndex:
    return pickle.loads(b"".join(r["blob"] for r in sorted(rows, key=lambda r: r["seq"])))


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankStream:
    """One rank's training batches, epoch by epoch, with a resumable position and skip counts."""

    def __init__(self, index: TrainIndex, data_cfg, model_name: str, *, rank: int, world: int, steps: int,
                 device=None, views: int = 1, captions_ref=None) -> None:
        self.index, self.cfg, self.model_name = index, data_cfg, model_name
        self.rank, self.world, self.steps, self.device = rank, world, steps, device
        self.views, self.captions_ref = views, captions_ref
        self.epoch, self.position, self.batches_done = 0, 0, 0
        self.skipped: Counter = Counter()  # decode-time skips of this rank's consumed positions
        self.restored: Counter = Counter()  # all ranks' skips up to the checkpoint (held by rank 0)
        _, self.mean, self.std, _, _ = _split_transform(model_name)
        self._affine = None  # (scale, bias) on the device, made by the first to_torch
        record = data_cfg.record_keys or os.environ.get(RECORD_ENV)
        self.record = os.path.join(record, f"rank{rank}.tsv") if record else None
        if self.record:
            os.makedirs(record, exist_ok=True)

    # -- checkpoint state (collectives: call on every rank at the same point) ------------------

    def state(self) -> dict[str, Any]:
        mine = _all_gather({"position": self.position, "skipped": dict(self.skipped)})
        total = Counter(self.restored)
        for m in mine:
            total.update(m["skipped"])
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": [m["position"] for m in mine], "skipped": dict(total)}

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        positions = state.get("positions") or []
        if len(positions) == self.world:
            self.position = int(positions[self.rank])
        else:  # another world size: the plan's split changed; continue at about the same point
            log.warning("resuming with %d workers, the checkpoint had %d: the data position of epoch %d is "
                        "approximate", self.world, len(positions), self.epoch)
            self.position = self.batches_done * self.cfg.batch_size
        self.restored = Counter(state.get("skipped") or {}) if self.rank == 0 else Counter()

    def metrics(self) -> dict[str, float]:
        """``data/skipped/<reason>``: index-time skips (per corpus) + decode-time skips of the
        positions consumed so far, summed over ranks. A collective."""
        total = Counter(self.index.skipped())
        total.update(self.state()["skipped"])
        out = {f"data/skipped/{r}": float(total.get(r, 0)) for r in REASONS}
        out.update({f"data/skipped/{r}": float(n) for r, n in total.items()})
        out["data/skipped/total"] = float(sum(total.values()))
        return out

    # -- batches ---------------------------------------------------------------------------

    def plan(self, epoch: int) -> RankPlan:
        return rank_plan(self.index, seed=self.cfg.seed, epoch=epoch, world=self.world, rank=self.rank,
                         window=self.cfg.shuffle_window, shuffle=self.cfg.shuffle_files)

    def dataset(self, plan: RankPlan, start: int):
        """The Ray Dataset of ``plan`` from position ``start``: one read task per window, in order."""
        import ray.data

        from cliplab.config import to_dict

        specs = [{"spec": json.dumps(read_spec(self.index, plan, lo, hi))} for lo, hi in plan.windows(start)]
        if not specs:
            return None
        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
        ds = ds.map_batches(read_decode, batch_size=1, batch_format="numpy", num_cpus=self.cfg.cpus_per_task,
                            fn_kwargs={"model_name": self.model_name, "s3": json.dumps(to_dict(self.cfg.s3)),
                                       "views": self.views, "captions_ref": self.captions_ref,
                                       "limits": Limits.of(self.cfg)})
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = 16 << 20  # stream a window out in blocks, not at the task's end
        return ds

    def _blocks(self, plan: RankPlan, start: int) -> Iterator[dict[str, np.ndarray]]:
        ds = self.dataset(plan, start)
        if ds is None:
            return
        yield from ds.iter_batches(batch_size=None, batch_format="numpy",
                                   prefetch_batches=self.cfg.prefetch_batches)

    def batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Exactly ``steps`` batches of ``epoch`` (from the restored position), as device tensors."""
        if epoch != self.epoch:
            self.epoch, self.position, self.batches_done = epoch, 0, 0
        plan = self.plan(epoch)
        start, padding = self.position, False
        while True:
            yielded = 0
            reb = Rebatcher(self.cfg.batch_size)
            for block in self._blocks(plan, start):
                reb.add(block)
                for batch, next_pos, bad in reb.ready():
                    if not padding:
                        self.skipped.update(bad)
                    if self.batches_done >= self.steps:
                        continue  # the rest of the slice is read only to count its skips
                    self.position = len(plan) if padding else next_pos
                    self.batches_done += 1
                    yielded += 1
                    self._record(epoch, self.batches_done, batch["key"])
                    yield self.to_torch(batch)
            if not padding:
                self.skipped.update(reb.leftover_bad())
            if self.batches_done >= self.steps:
                break
            if padding and yielded == 0:
                raise DataError(f"rank {self.rank} has no decodable sample in epoch {epoch}")
            log.warning("rank %d: undecodable samples left %d of %d batches in epoch %d; repeating its samples",
                        self.rank, self.steps - self.batches_done, self.steps, epoch)
            padding, start = True, 0
        self.epoch, self.position, self.batches_done = epoch + 1, 0, 0

    def _record(self, epoch: int, batch: int, keys) -> None:
        """Audit log: one ``epoch<TAB>batch<TAB>key`` line per trained sample (``batch`` counts from 1
        within the epoch). After a restart from a checkpoint the replayed batches appear again, with
        the same numbers, so the last line of each (epoch, batch) is what the finished run trained on."""
        if self.record:
            with open(self.record, "a") as f:
                f.write("".join(f"{epoch}\t{batch}\t{k}\n" for k in keys))

    def to_torch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        device = self.device or torch.device("cpu")
        cuda = device.type == "cuda"

        def move(a: np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(a))
            if cuda:
                t = t.pin_memory()
            return t.to(device, non_blocking=cuda)

        # (x / 255 - mean) / std as one affine map: convert + transpose in one copy, then two in-place passes.
        # Built once: a host tensor copied to the GPU every batch would be a blocking copy.
        if self._affine is None:
            std = torch.tensor(self.std, dtype=torch.float64)
            self._affine = ((1.0 / (255.0 * std)).float().to(device).view(1, 3, 1, 1),
                            (-torch.tensor(self.mean, dtype=torch.float64) / std).float().to(device).view(1, 3, 1, 1))
        scale, bias = self._affine
        out: dict[str, Any] = {"text": move(batch["text"])}
        for name in ("image", "image_2"):
            if name in batch:
                nhwc = move(batch[name])
                n, h, w, c = nhwc.shape
                img = torch.empty((n, c, h, w), dtype=torch.float32, device=device)
                img.copy_(nhwc.permute(0, 3, 1, 2))
                out[name] = img.mul_(scale).add_(bias)
        if "caption_embedding" in batch:
            out["caption_embedding"] = move(batch["caption_embedding"].astype(np.float32))
        return out
