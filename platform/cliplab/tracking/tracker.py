"""The tracker protocol. Training code logs through it from rank 0 only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from cliplab.errors import ServiceError


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NoOpTracker:
    """Logs nothing: non-zero ranks and runs with tracking off."""

    run_id: str | None = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, artifact_path=None): pass
    def finish(self, status="FINISHED"): pass


class InMemoryTracker:
    """Keeps everything in lists and dicts, for unit tests of training code."""

    run_id: str | None = "in-memory"

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.status: str | None = None

    def log_params(self, params): self.params.update(params)
    def log_metrics(self, metrics, step): self.metrics.append((step, dict(metrics)))
    def set_tags(self, tags): self.tags.update(tags)
    def log_artifact(self, path, artifact_path=None): self.artifacts.append((str(path), artifact_path))
    def finish(self, status="FINISHED"): self.status = status


class MlflowTracker:
    """One MLflow run, through an explicit client (no global ``mlflow.start_run`` state)."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is not None:
            self.run_id = run_id
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id

    def log_params(self, params):
        from cliplab.tracking.spool import log_params_batched

        log_params_batched(self.client, self.run_id, params)

    def log_metrics(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags):
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status)


def resolve_uri(uri: str | None) -> str | None:
    """``uri`` (``tracking.uri``, ``--tracking-uri``), else ``MLFLOW_TRACKING_URI``, else None
    (tracking off): the one place that fallback is written."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def tracking_uri(cfg) -> str | None:
    """The MLflow URI of a :class:`~cliplab.config.TrackingConfig` (:func:`resolve_uri`)."""
    return resolve_uri(cfg.uri)


def check_reachable(uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast (before Ray work) when an http(s) tracking server does not answer.
    Credentials in the URI (``http://user:pw@host``) are sent as basic auth and never printed."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    from cliplab.redaction import Redactor

    parts = urllib.parse.urlsplit(uri)
    shown = Redactor().text(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health",
                                                              "", "")))
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            if resp.status == 200:
                return
    except urllib.error.HTTPError as err:
        raise ServiceError(f"MLflow tracking server {shown} answered /health with HTTP {err.code}"
                           + ("; check the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)" if err.code in (401, 403)
                              else "")) from None
    except (urllib.error.URLError, OSError) as err:
        raise ServiceError(f"MLflow tracking server {shown} is unreachable ({getattr(err, 'reason', err)}); "
                           "start one with `cliplab services mlflow` or fix tracking.uri / "
                           "MLFLOW_TRACKING_URI") from None
    raise ServiceError(f"MLflow tracking server {shown} answered /health with an error")


def quiet_run_links(uri: str | None) -> None:
    """MLflow prints "View run NAME at: URI/#/..." to stdout when a run ends, with the URI as given:
    a password in it would land in the driver's log. Such URIs get no printed link."""
    from cliplab.redaction import Redactor

    if uri and Redactor().text(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def build_tracker(cfg, *, rank: int, run_name: str | None = None, tags: dict[str, str] | None = None,
                  run_id: str | None = None, start_timeout_s: float = 30.0) -> Tracker:
    """On rank 0 with a URI configured: a new MLflow run behind a :class:`SpoolingTracker`
    (redacted, buffered on disk, never blocking training). Elsewhere a no-op tracker.

    ``run_id`` continues an existing run (a restart from a checkpoint). Creating the run needs
    the server; it is retried for ``start_timeout_s`` before giving up.
    """
    import time

    from cliplab.redaction import Redactor
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    uri = tracking_uri(cfg)
    if rank != 0 or not uri:
        return NoOpTracker()
    quiet_mlflow_retries()
    quiet_run_links(uri)
    redactor = Redactor()
    name = redactor.text(run_name or cfg.run_name or "") or None
    deadline = time.monotonic() + start_timeout_s
    while True:
        try:
            run = MlflowTracker(uri, cfg.experiment, run_name=name, tags=redactor.params(tags or {}), run_id=run_id)
            break
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            if time.monotonic() > deadline:
                raise ServiceError(f"cannot create an MLflow run at {redactor.text(uri)}: {err}") from None
            time.sleep(2.0)
    return SpoolingTracker(uri, run.run_id, spool_root=cfg.spool_dir, redactor=redactor,
                           flush_timeout_s=cfg.flush_timeout_s)
