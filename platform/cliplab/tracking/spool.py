"""An MLflow tracker that never makes training wait and never loses a record.

Every call is redacted (:mod:`cliplab.redaction`), appended to an on-disk spool
(``ops.jsonl``, one JSON record per call, numbered) and handed to a background thread that sends
records to MLflow in order. When the server is unreachable the thread keeps retrying with
backoff while training goes on; when it is back the backlog is flushed, with each metric's
original step and timestamp. ``finish`` waits up to ``flush_timeout_s`` for the backlog. Anything
still unsent stays in the spool, and ``cliplab tracking flush SPOOL`` sends it later. A tracker
opened on the same run (a restart from a checkpoint) sends the previous process's leftovers first.

What is retried and what is dropped (:func:`is_permanent`): connection errors, timeouts, every
5xx, 401/403 (credentials can be fixed, and the spool flushed later), 408, 429 and any reply that
says the store is busy ("database is locked") are retried with backoff, in order. Only a 4xx that
can never succeed (a malformed metric name, a param changed in place) is dropped, and it is
logged with the record. A merged batch that is refused is first resent record by record, so one
bad record never takes its neighbours with it.

A spool that cannot be written (a full disk, a read-only or missing folder) turns the tracker into
an in-memory one with a warning: records wait in memory, at most ``memory_records`` of them; past
that the oldest metrics records are dropped, counted and logged. Nothing raises into training.

Spool layout (one folder per run)::

    meta.json     {"uri": ..., "run_id": ...}
    ops.jsonl     {"seq": n, "op": "params"|"metrics"|"tags"|"artifact"|"finish", ...}
    acked         the highest seq MLflow has accepted
    artifacts/    copies of logged files (redacted when they are text)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from cliplab.redaction import Redactor

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".md", ".csv", ".log", ".toml", ".cfg", ".ini", ".py"}
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 6000  # MLflow's longest param value


def log_params_batched(client, run_id: str, params: Mapping[str, object], **log_batch_kwargs) -> None:
    """``params`` on MLflow run ``run_id`` through ``client.log_batch``, in batches MLflow accepts
    (:data:`MAX_PARAMS_PER_BATCH`), each value a string cut to :data:`MAX_PARAM_CHARS`. The one
    place params are batched: the spool's sender, :class:`~cliplab.tracking.tracker.MlflowTracker`
    and the sweep's parent run use it. ``log_batch_kwargs`` go to every ``log_batch``."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH], **log_batch_kwargs)


def default_spool_root() -> Path:
    return Path(tempfile.gettempdir()) / "cliplab-mlflow-spool"


RETRY_STATUS = (401, 403, 408, 429)  # 4xx that can succeed later: credentials fixed, a timeout, a rate limit
# a store that is busy, whatever status it came with (not words a param name or value could hold, like "timeout")
TRANSIENT_TEXT = ("database is locked", "deadlock detected", "try again later", "temporarily unavailable")


def is_permanent(err: Exception) -> bool:
    """A request the server understood and refused for good (HTTP 4xx, e.g. INVALID_PARAMETER_VALUE),
    so retrying cannot help. Everything else (network errors, 5xx, a locked database, an
    authentication failure, a rate limit) is transient."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    text = str(err).lower()
    if any(word in text for word in TRANSIENT_TEXT):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in RETRY_STATUS


def _describe(err: Exception) -> str:
    from mlflow.exceptions import MlflowException

    status = f"HTTP {err.get_http_status_code()} " if isinstance(err, MlflowException) else ""
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{status}{type(err).__name__}" + (f": {text}" if text else "")


class Sender:
    """Sends spool records to one MLflow run. Used by the background thread and by ``flush``."""

    def __init__(self, uri: str, run_id: str, spool: Path) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.spool = spool

    def send(self, records: list[dict]) -> None:
        from mlflow.entities import Metric, RunTag

        head = records[0]["op"]
        if head == "metrics":
            items = [Metric(k, float(v), r["ts"], r["step"]) for r in records for k, v in r["data"].items()]
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH], synchronous=True)
        elif head == "params":
            log_params_batched(self.client, self.run_id, head_data(records), synchronous=True)
        elif head == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in head_data(records).items()],
                                  synchronous=True)
        elif head == "artifact":
            self.client.log_artifact(self.run_id, str(self.spool / records[0]["file"]), records[0]["artifact_path"])
        elif head == "finish":
            self.client.set_terminated(self.run_id, records[0]["status"])


def head_data(records: list[dict]) -> dict:
    return records[0]["data"]


def _next_batch(queue: deque, merge: bool = True) -> list[dict]:
    """The head record, merged (unless ``merge`` is False) with the metric records right behind it."""
    batch = [queue[0]]
    if merge and batch[0]["op"] == "metrics":
        count = len(batch[0]["data"])
        for rec in list(queue)[1:]:
            if rec["op"] != "metrics" or count + len(rec["data"]) > 10 * MAX_METRICS_PER_BATCH:
                break
            batch.append(rec)
            count += len(rec["data"])
    return batch


class SpoolingTracker:
    """Wraps an existing MLflow run (``uri`` + ``run_id``); see the module docstring."""

    def __init__(self, uri: str, run_id: str, *, spool_root: str | Path | None = None,
                 redactor: Redactor | None = None, flush_timeout_s: float = 120.0,
                 retry_s: float = 1.0, max_retry_s: float = 10.0, memory_records: int = 20_000) -> None:
        self.uri, self.run_id = uri, run_id
        self.redactor = redactor or Redactor()
        self._shown = self.redactor.text(uri)  # for messages: a password in the URI never reaches a log
        self.flush_timeout_s = flush_timeout_s
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.memory_records = max(1, memory_records)
        self.spool = Path(spool_root or default_spool_root()) / run_id
        self.metrics_produced = 0
        self.metrics_sent = 0
        self.dropped: list[str] = []
        self.overflowed = 0  # metrics records dropped because the spool disk and the memory buffer were full
        self.outages = 0
        self.on_disk = True
        self._ops = None
        self._cond = threading.Condition()
        self._inflight = 0  # records at the queue's head that the sender is sending now
        self._solo = 0  # records to send one by one (after a merged batch was refused)
        leftovers, last_seq = [], -1
        try:
            (self.spool / "artifacts").mkdir(parents=True, exist_ok=True)
            meta = self.spool / "meta.json"
            meta.write_text(json.dumps({"uri": uri, "run_id": run_id}))  # local only, owner-readable
            meta.chmod(0o600)
            # a run restarted from a checkpoint reuses its run id: send what the previous process left unsent
            leftovers, last_seq = _unsent(self.spool)
            leftovers = [r for r in leftovers if r["op"] != "finish"]  # this process decides how the run ends
            self._ops = open(self.spool / "ops.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        except OSError as err:
            self._to_memory(err)
        self._queue: deque = deque(leftovers)
        self._seq = last_seq + 1
        self._closed = False
        self._sender = Sender(uri, run_id, self.spool)
        self._thread = threading.Thread(target=self._run, name="cliplab-mlflow-sender", daemon=True)
        self._thread.start()

    # -- the Tracker protocol ------------------------------------------------------------------
    def log_params(self, params):
        self._put({"op": "params", "data": self.redactor.params(params)})

    def log_metrics(self, metrics, step):
        data = {self.redactor.text(k): float(v) for k, v in metrics.items()}
        self.metrics_produced += len(data)
        self._put({"op": "metrics", "step": int(step), "ts": int(time.time() * 1000), "data": data})

    def set_tags(self, tags):
        self._put({"op": "tags", "data": self.redactor.params(tags)})

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        with self._cond:
            slot = f"artifacts/{self._seq}/{path.name}"
        dest = self.spool / slot
        text = None
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
        try:
            if not self.on_disk:
                raise OSError("the spool is in memory")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if text is not None:
                dest.write_text(self.redactor.text(text), encoding="utf-8")
            else:
                shutil.copyfile(path, dest)
        except OSError as err:
            if self.on_disk:
                self._to_memory(err)
            if text is not None and self.redactor.text(text) != text:
                self._drop_record(f"artifact {path.name}: the spool disk is full and the file holds secrets that "
                                  "must be masked in a copy")
                return
            slot = str(path.resolve())  # send the original file (absolute: the spool folder is ignored)
        self._put({"op": "artifact", "file": slot, "artifact_path": artifact_path})

    def finish(self, status="FINISHED"):
        self._put({"op": "finish", "status": status})
        drained = self.flush(self.flush_timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._close_ops()
        if drained:
            shutil.rmtree(self.spool, ignore_errors=True)
        elif not self.on_disk:
            log.warning("MLflow at %s did not take %d tracking records of run %s in %.0f s, and the spool %s "
                        "could not be written: they are lost", self._shown, len(self._queue), self.run_id,
                        self.flush_timeout_s, self.spool)
        else:
            log.warning("MLflow at %s did not take %d tracking records of run %s in %.0f s; they are kept in "
                        "%s. Send them later with `cliplab tracking flush %s`.",
                        self._shown, len(self._queue), self.run_id, self.flush_timeout_s, self.spool, self.spool)

    # -- the spool -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record so far is in MLflow (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True

    def _put(self, record: dict) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("tracker already finished")
            record["seq"] = self._seq
            self._seq += 1
            if self.on_disk:
                try:
                    self._ops.write(json.dumps(record) + "\n")
                    self._ops.flush()
                except OSError as err:
                    self._to_memory(err)
            self._queue.append(record)
            if not self.on_disk and len(self._queue) > self.memory_records and record["op"] != "finish":
                self._overflow()
            self._cond.notify_all()

    def _to_memory(self, err: OSError) -> None:
        """The spool cannot be written: keep records in memory from now on (caller may hold the lock)."""
        self.on_disk = False
        self._close_ops()
        log.warning("the tracking spool %s cannot be written (%s); MLflow records of run %s are kept in memory "
                    "from now on, at most %d (beyond that the oldest metrics are dropped): free space there or "
                    "set tracking.spool_dir", self.spool, err.strerror or err, self.run_id, self.memory_records)

    def _close_ops(self) -> None:
        ops, self._ops = self._ops, None
        if ops is not None:
            try:
                ops.close()
            except OSError:  # the buffered tail of a full disk
                pass

    def _overflow(self) -> None:
        """Drop the oldest metrics record the sender is not sending (the lock is held)."""
        for i in range(self._inflight, len(self._queue)):
            if self._queue[i]["op"] == "metrics":
                rec = self._queue[i]
                del self._queue[i]
                self.overflowed += 1
                if self.overflowed == 1 or self.overflowed % 1000 == 0:
                    log.warning("the tracking spool is not writable and %d records wait for MLflow at %s: dropped "
                                "%d metrics records so far, oldest first (this one: step %s)", self.memory_records,
                                self._shown, self.overflowed, rec.get("step"))
                return

    def _drop_record(self, why: str) -> None:
        self.dropped.append(why)
        log.warning("tracking record of run %s dropped: %s", self.run_id, why)

    def _run(self) -> None:
        delay = self.retry_s
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = _next_batch(self._queue, merge=not self._solo)
                self._inflight = len(batch)
            try:
                self._sender.send(batch)
            except Exception as err:  # noqa: BLE001 - any failure: keep the records, retry or drop
                if is_permanent(err) and len(batch) > 1:
                    with self._cond:
                        self._inflight = 0
                        self._solo = len(batch)  # find the bad record: resend these one by one
                    continue
                if is_permanent(err):
                    rec = json.dumps(batch[0])
                    self._drop_record(f"MLflow refused it for good ({self.redactor.text(_describe(err))}): "
                                      f"{rec[:2000]}{' ...' if len(rec) > 2000 else ''}")
                else:
                    with self._cond:
                        self._inflight = 0
                    if delay == self.retry_s:
                        self.outages += 1
                        where = str(self.spool) if self.on_disk else "memory"
                        log.warning("MLflow at %s did not take tracking records (%s); training goes on, the "
                                    "records wait in %s and are retried with backoff", self._shown,
                                    self.redactor.text(_describe(err)),
                                    where)
                    with self._cond:
                        if self._closed:
                            return
                        self._cond.wait(timeout=delay)
                    delay = min(delay * 2, self.max_retry_s)
                    continue
            delay = self.retry_s
            with self._cond:
                for _ in batch:
                    rec = self._queue.popleft()
                    if rec["op"] == "metrics":
                        self.metrics_sent += len(rec["data"])
                self._inflight = 0
                self._solo = max(0, self._solo - len(batch))
                if self.on_disk:
                    try:
                        (self.spool / "acked").write_text(str(batch[-1]["seq"]))
                    except OSError as err:
                        self._to_memory(err)
                self._cond.notify_all()


def _unsent(spool: Path) -> tuple[list[dict], int]:
    """The records of a spool folder that MLflow has not acknowledged, and the highest seq in it (-1 if none)."""
    ops = spool / "ops.jsonl"
    if not ops.is_file():
        return [], -1
    acked = int((spool / "acked").read_text() or -1) if (spool / "acked").is_file() else -1
    records = []
    for line in ops.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a killed process
            continue
    last = max((r["seq"] for r in records), default=-1)
    return [r for r in records if r["seq"] > acked], last


def flush_spool(spool: str | Path, uri: str | None = None) -> int:
    """Send the unacknowledged records of a spool folder left by a run. Returns how many were sent."""
    spool = Path(spool)
    meta = json.loads((spool / "meta.json").read_text())
    queue = deque(_unsent(spool)[0])
    sender = Sender(uri or meta["uri"], meta["run_id"], spool)
    sent = 0
    while queue:
        batch = _next_batch(queue)
        sender.send(batch)
        for _ in batch:
            queue.popleft()
        sent += len(batch)
        (spool / "acked").write_text(str(batch[-1]["seq"]))
    shutil.rmtree(spool, ignore_errors=True)
    return sent


def quiet_mlflow_retries() -> None:
    """Let the spool do the retrying: MLflow's own HTTP retries back off for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
