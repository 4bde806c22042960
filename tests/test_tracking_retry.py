"""Tracking never loses a metric: the real MLflow server behind a real TCP proxy that answers
JSON errors (503 "database is locked", 500, 429) for a while and then passes requests through;
a record MLflow refuses for good is dropped alone and logged; a spool on a full disk (a real
16 KiB tmpfs in a private mount namespace) degrades to a bounded in-memory buffer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from netfaults import FailingHttpProxy

pytestmark = [pytest.mark.mlflow]
TESTS = Path(__file__).resolve().parent


def _new_run(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("retry") or client.get_experiment(client.create_experiment("retry"))
    return client.create_run(exp.experiment_id, run_name=name).info.run_id


def _wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# mlflow's client turns 408/429/500/502/503/504 into a retry error of its own (transient before and
# after the fix); any other status with a JSON body becomes a RestException, which was dropped
ERRORS = {
    "503-database-locked": (503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": '
                                 b'"(sqlite3.OperationalError) database is locked"}'),
    "400-database-locked": (400, b'{"error_code": "BAD_REQUEST", "message": '
                                 b'"(sqlalchemy.exc.PendingRollbackError) database is locked"}'),
    "507-json": (507, b'{"error_code": "INTERNAL_ERROR", "message": "the store is out of space"}'),
    "401-json": (401, b'{"error_code": "UNAUTHENTICATED", "message": "token expired"}'),
    "502-html": (502, b"<html><body>502 Bad Gateway</body></html>"),
}


@pytest.mark.parametrize("error", list(ERRORS))
def test_json_errors_from_the_server_are_retried_until_every_metric_arrives(error, mlflow_server, tmp_path):
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    status, body = ERRORS[error]
    run_id = _new_run(mlflow_server.uri, error)
    ctype = "text/html" if body.startswith(b"<") else "application/json"
    with FailingHttpProxy(mlflow_server.port, status=status, body=body, content_type=ctype) as proxy:
        tracker = SpoolingTracker(proxy.endpoint, run_id, spool_root=tmp_path / "spool", flush_timeout_s=60,
                                  retry_s=0.1, max_retry_s=0.3)
        tracker.log_params({"optim.lr": 1e-3})
        for step in range(20):
            tracker.log_metrics({"train/loss": 20.0 - step}, step)
        _wait_for(lambda: proxy.answered >= 3 or tracker.pending == 0, "three refused requests")
        assert tracker.pending > 0 and tracker.dropped == []
        proxy.failing.clear()
        tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(20))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
    assert tracker.dropped == [] and tracker.outages >= 1
    assert tracker.metrics_sent == tracker.metrics_produced == 20


def test_a_record_refused_for_good_is_dropped_alone_and_logged(mlflow_server, tmp_path, caplog):
    """Records pile up during an outage and are merged into one batch; one of them has a metric
    name MLflow refuses (HTTP 400). That record alone is dropped, logged with its content; its
    neighbours in the batch arrive."""
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    run_id = _new_run(mlflow_server.uri, "bad-record")
    with FailingHttpProxy(mlflow_server.port) as proxy, caplog.at_level(logging.WARNING, "cliplab.tracking.spool"):
        tracker = SpoolingTracker(proxy.endpoint, run_id, spool_root=tmp_path / "spool", flush_timeout_s=60,
                                  retry_s=0.1, max_retry_s=0.3)
        for step in range(10):
            metrics = {"train/loss": float(step)}
            if step == 4:
                metrics["train/../escape"] = 1.0  # a path-like name: INVALID_PARAMETER_VALUE
            tracker.log_metrics(metrics, step)
        _wait_for(lambda: proxy.answered >= 2, "two refused requests")
        proxy.failing.clear()
        tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert len(tracker.dropped) == 1
    assert '"train/../escape": 1.0' in tracker.dropped[0] and '"step": 4' in tracker.dropped[0]
    assert "HTTP 400" in tracker.dropped[0]
    logged = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(logged) == 1 and "train/../escape" in logged[0] and '"step": 4' in logged[0]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_retry_warnings_never_show_a_password_in_the_uri(mlflow_server, tmp_path, caplog):
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    run_id = _new_run(mlflow_server.uri, "uri-password")
    with FailingHttpProxy(mlflow_server.port) as proxy, \
            caplog.at_level(logging.WARNING, "cliplab.tracking.spool"):
        uri = proxy.endpoint.replace("http://", "http://cliplab:planted-pw-in-uri-5150@")
        tracker = SpoolingTracker(uri, run_id, spool_root=tmp_path / "spool", flush_timeout_s=60, retry_s=0.1,
                                  max_retry_s=0.3)
        tracker.log_metrics({"train/loss": 1.0}, 1)
        _wait_for(lambda: proxy.answered >= 2 or tracker.pending == 0, "two refused requests")
        proxy.failing.clear()
        tracker.finish()
    messages = [r.getMessage() for r in caplog.records]
    assert messages and not [m for m in messages if "planted-pw-in-uri-5150" in m]
    assert any("did not take tracking records" in m and "http://cliplab:***@" in m for m in messages), messages
    assert [m.step for m in MlflowClient(mlflow_server.uri).get_metric_history(run_id, "train/loss")] == [1]


def test_which_errors_are_permanent():
    from mlflow.exceptions import MlflowException, RestException

    from cliplab.tracking.spool import is_permanent

    assert is_permanent(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}))
    assert is_permanent(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    for transient in (RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}),
                      RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}),
                      RestException({"error_code": "BAD_REQUEST", "message": "database is locked"}),
                      RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "x"}),
                      RestException({"error_code": "UNAUTHENTICATED", "message": "x"}),
                      RestException({"error_code": "PERMISSION_DENIED", "message": "x"}),
                      MlflowException("API request failed with exception Read timed out"),
                      ConnectionError("refused"), TimeoutError()):
        assert not is_permanent(transient), transient
    # a param named like a timeout is still a param refused for good
    assert is_permanent(RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                       "message": "Changing param values is not allowed: data.s3.connect_timeout_s"}))


# ---------------------------------------------------------------------------------- a full spool disk

CHILD = """
import json, logging, os, sys, time
sys.path.insert(0, {tests!r})
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from netfaults import FailingHttpProxy
from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

quiet_mlflow_retries()
disk = {disk!r}
out = {{}}
with FailingHttpProxy({port}) as proxy:
    # 1. the disk fills up mid-run while MLflow refuses: nothing raises, nothing is lost
    t = SpoolingTracker(proxy.endpoint, {run_a!r}, spool_root=disk, flush_timeout_s=60, retry_s=0.1, max_retry_s=0.3)
    for step in range(400):
        t.log_metrics({{"train/loss": float(step), "train/padding_to_fill_the_disk_" + "x" * 60: 1.0}}, step)
    out["a_on_disk"] = t.on_disk
    proxy.failing.clear()
    t.finish()
    out["a"] = dict(produced=t.metrics_produced, sent=t.metrics_sent, dropped=t.dropped, overflowed=t.overflowed)
    # 2. the disk is full from the start and the buffer holds 50 records: the oldest metrics go, counted
    proxy.failing.set()
    t = SpoolingTracker(proxy.endpoint, {run_b!r}, spool_root=disk, flush_timeout_s=60, retry_s=0.1,
                        max_retry_s=0.3, memory_records=50)
    t.log_params({{"optim.lr": 0.001, "pad": "x" * 17000}})  # over a 16 KiB file-size limit too
    for step in range(200):
        t.log_metrics({{"train/loss": float(step)}}, step)
    out["b_on_disk"], out["b_pending"] = t.on_disk, t.pending
    proxy.failing.clear()
    t.finish()
    out["b"] = dict(produced=t.metrics_produced, sent=t.metrics_sent, dropped=t.dropped, overflowed=t.overflowed)
print("RESULT " + json.dumps(out), flush=True)
"""


def _full_disk_command(disk: Path, script: str) -> tuple[list[str], str]:
    """A command running ``script`` with a real 16 KiB tmpfs mounted at ``disk`` (a private mount
    namespace: nothing is mounted outside the child), and how the disk was made."""
    python = [sys.executable, "-c", script]
    unshare = shutil.which("unshare")
    if unshare:
        flags = "-m" if os.geteuid() == 0 else "-rm"
        probe = subprocess.run([unshare, flags, "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {disk}"],
                               capture_output=True)
        if probe.returncode == 0:
            inner = f"mount -t tmpfs -o size=16k tmpfs {disk} && exec \"$@\""
            return [unshare, flags, "sh", "-c", inner, "sh", *python], "tmpfs"
    # no mount namespaces here: the nearest real limit is a file-size rlimit (EFBIG instead of ENOSPC)
    limit = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n")
    return [sys.executable, "-c", limit + script], "rlimit"


def test_a_full_spool_disk_degrades_to_a_bounded_memory_buffer(mlflow_server, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    run_a, run_b = _new_run(mlflow_server.uri, "full-disk"), _new_run(mlflow_server.uri, "full-from-start")
    script = textwrap.dedent(CHILD.format(tests=str(TESTS), disk=str(disk), port=mlflow_server.port,
                                          run_a=run_a, run_b=run_b))
    cmd, how = _full_disk_command(disk, script)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(f"full spool disk made with: {how}")

    assert out["a_on_disk"] is False  # the disk did fill up
    assert out["a"] == {"produced": 800, "sent": 800, "dropped": [], "overflowed": 0}
    client = MlflowClient(mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(run_a, "train/loss")) == list(range(400))
    assert client.get_run(run_a).info.status == "FINISHED"
    reason = "No space left on device" if how == "tmpfs" else "File too large"
    warned = [line for line in proc.stderr.splitlines() if "cannot be written" in line]
    assert warned and all(reason in line for line in warned), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    assert out["b_on_disk"] is False and out["b_pending"] == 50, out
    assert out["b"]["overflowed"] == 151 and out["b"]["sent"] == 49, out  # the params record stays, 49 metrics with it
    assert [m.step for m in client.get_metric_history(run_b, "train/loss")] == list(range(151, 200))
    assert client.get_run(run_b).data.params["optim.lr"] == "0.001"
    assert "dropped 1 metrics records so far, oldest first" in proc.stderr
