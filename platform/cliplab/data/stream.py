"""The training stream: each rank reads its own deterministic samples, decoded by Ray Data tasks
or by the worker's own decode thread.

Ray Data's ``streaming_split`` hands blocks to whichever rank asks first, which makes neither
the order nor a resume position reproducible. Here every rank instead builds its
:class:`~cliplab.data.plan.RankPlan` for the epoch; one read spec per shuffle window reads the
window's samples by byte range (a few requests per shard), decodes, augments (open_clip's train
transform, seeded per sample: :class:`~cliplab.data.samples.SeededAugment`) and tokenizes them, in plan order. Where
(``data.decode_on``): ``tasks`` runs a small Ray Data pipeline per rank and epoch, one CPU task per
window (``preserve_order``), so decoding can use cores beside a GPU worker's; ``worker`` decodes in
a background thread of the rank itself (:func:`worker_blocks`), with no per-epoch start-up, which
is what a CPU worker wants; ``auto`` picks ``tasks`` on a GPU, else ``worker``. Both give the same
samples, crops and batches. The worker re-batches the rows into exactly ``batch_size`` samples,
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
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from cliplab.data.decode import Limits
from cliplab.data.index import REASONS, TrainIndex
from cliplab.data.plan import RankPlan, rank_plan, read_spec
from cliplab.data.samples import ROW_REASONS, _split_transform, read_decode
from cliplab.errors import DataError

log = logging.getLogger(__name__)

RECORD_ENV = "CLIPLAB_RECORD_KEYS"  # or data.record_keys: a folder where each rank appends "epoch<TAB>batch<TAB>key"


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


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


DECODE_ON = ("tasks", "worker")  # where a rank's samples are decoded: Ray Data tasks, or its own thread
_DONE = object()


def worker_blocks(specs: list[dict], kwargs: dict[str, Any], prefetch: int) -> Iterator[dict[str, np.ndarray]]:
    """:func:`read_decode`'s blocks for ``specs``, in order, decoded by one background thread of
    this process, at most ``prefetch`` blocks ahead of the consumer.

    No Ray Data execution starts per epoch and nothing is scheduled: on a CPU worker the decode
    shares the worker's own cores with the step (PIL and the crop release the GIL), which on a
    small corpus costs a fraction of what starting and backpressuring a dataset per epoch and
    rank did. An error in the thread is raised here; a consumer that stops early stops the thread."""
    import queue
    import threading

    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for spec in specs:
                for block in read_decode({"spec": [spec]}, **kwargs):
                    if not put(block):
                        return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=produce, name="cliplab-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class RankStream:
    """One rank's training batches, epoch by epoch, with a resumable position and skip counts."""

    def __init__(self, index: TrainIndex, data_cfg, model_name: str, *, rank: int, world: int, steps: int,
                 device=None, views: int = 1, captions_ref=None, decode_on: str = "tasks") -> None:
        if decode_on not in DECODE_ON:
            raise ValueError(f"decode_on must be one of {DECODE_ON}, not {decode_on!r}")
        self.index, self.cfg, self.model_name, self.decode_on = index, data_cfg, model_name, decode_on
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

    def specs(self, plan: RankPlan, start: int) -> list[dict]:
        """One read spec per shuffle window of ``plan`` from position ``start``, each carrying the
        augmentation seed ``[data.seed, epoch]``."""
        return [{**read_spec(self.index, plan, lo, hi), "aug": [int(self.cfg.seed), int(plan.epoch)]}
                for lo, hi in plan.windows(start)]

    def _decode_kwargs(self) -> dict[str, Any]:
        from cliplab.config import to_dict

        return {"model_name": self.model_name, "s3": json.dumps(to_dict(self.cfg.s3)), "views": self.views,
                "captions_ref": self.captions_ref, "limits": Limits.of(self.cfg)}

    def dataset(self, plan: RankPlan, start: int):
        """The Ray Dataset of ``plan`` from position ``start``: one read task per window, in order."""
        import ray.data

        specs = [{"spec": json.dumps(spec)} for spec in self.specs(plan, start)]
        if not specs:
            return None
        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
        ds = ds.map_batches(read_decode, batch_size=1, batch_format="numpy", num_cpus=self.cfg.cpus_per_task,
                            fn_kwargs=self._decode_kwargs())
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = 16 << 20  # stream a window out in blocks, not at the task's end
        return ds

    def _blocks(self, plan: RankPlan, start: int) -> Iterator[dict[str, np.ndarray]]:
        if self.decode_on == "worker":
            yield from worker_blocks(self.specs(plan, start), self._decode_kwargs(), self.cfg.prefetch_batches)
            return
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
