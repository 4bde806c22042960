"""Submit ``cliplab train`` / ``cliplab sweep`` to a running Ray cluster as a Ray Job, and follow it.

What the job is (entrypoint, working dir, runtime env, which variables travel and which secrets
stay behind) is :mod:`cliplab.jobspec`'s. This module talks to the cluster's job server: its
address, the Ray auth token (sent only as an HTTP header), submitting, and following a job's logs
(secrets masked) to its end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError, ServiceError
from cliplab.jobspec import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------------------------
# addresses and auth


def default_address() -> str:
    """``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` when it is an http(s) URL (a ``host:port``
    RAY_ADDRESS names the GCS, not the job server), else the local dashboard."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def normalize_address(address: str | None) -> str:
    address = (address or default_address()).strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        if "://" in address:
            raise ConfigError(f"job server address must be http(s)://HOST:PORT (the dashboard), got {address}")
        address = f"http://{address}"
    return address


def auth_token() -> str | None:
    """The Ray auth token to send, in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then
    ``~/.ray/auth_token`` (the last only when RAY_AUTH_MODE=token, so a local token is not sent to
    clusters that did not ask for one)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as err:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {err.strerror}") from None
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip() or None
    return None


def _headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One short GET of the job server's version: a clear :class:`ServiceError` for a dead address
    or a rejected token, instead of a hang or a traceback from the Ray client."""
    request = urllib.request.Request(f"{address}/api/version", headers=_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            resp.read()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise ServiceError(f"Ray job server at {address} requires a token: set RAY_AUTH_MODE=token and "
                               "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH); on KubeRay it is in the cluster's "
                               "auth Secret") from None
        if err.code == 403:
            raise ServiceError(f"Ray job server at {address} rejected the auth token: check RAY_AUTH_TOKEN / "
                               "RAY_AUTH_TOKEN_PATH") from None
        if err.code == 404:
            raise ServiceError(f"{address} answered but is not a Ray job server (no /api/version); "
                               "point --address at the Ray dashboard port (8265)") from None
        raise ServiceError(f"Ray job server at {address} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServiceError(f"cannot reach the Ray job server at {address} ({reason}); is the cluster up and its "
                           "dashboard port (8265) reachable, e.g. through `kubectl port-forward`?") from None


def _quiet_ray_logs() -> None:
    """Ray's packaging chatter (each ignored .gitignore, default excludes) is noise here."""
    import logging

    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING if name.endswith("sdk") else logging.ERROR)


def client(address: str | None = None):
    """A ``JobSubmissionClient`` for ``address``, after a quick reachability check."""
    address = normalize_address(address)
    check_reachable(address)
    _quiet_ray_logs()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_headers())
    except Exception as err:  # the Ray client raises RuntimeError/ConnectionError with multi-line text
        raise ServiceError(f"Ray job server at {address}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------------
# submitting and following


def submit(job: JobSpec, address: str | None = None, job_client=None) -> str:
    """Submit ``job``; returns its submission id."""
    job_client = job_client or client(address)
    try:
        return job_client.submit_job(entrypoint=job.entrypoint, runtime_env=job.runtime_env,
                                     submission_id=job.submission_id)
    except Exception as err:
        msg = _first_line(err)
        if "exceeds" in msg.lower() or "too large" in msg.lower():
            msg += " (add excludes to cluster/runtime_env.yaml or pass --working-dir)"
        raise ServiceError(f"job submission failed: {msg}") from None


def redacted_writer(secrets: Iterable[str] = ()) -> Callable[[str], None]:
    """Writes to stdout with the secrets of this environment (and ``secrets``) masked: a job's log can
    echo its runtime env, which carries the forwarded credentials."""
    from cliplab.redaction import Redactor, secret_values

    redactor = Redactor(secret_values(extra=secrets))

    def write(text: str) -> None:
        sys.stdout.write(redactor.text(text))
        sys.stdout.flush()

    return write


def follow(job_client, job_id: str, out: Callable[[str], None] | None = None, poll_s: float = 1.0) -> str:
    """Stream the job's logs (secrets masked) until it ends; returns its terminal status name."""
    out = out or redacted_writer()

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            out(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # the log socket closed early: fall back to polling the status
        print(f"cliplab: log stream ended ({_first_line(err)}); waiting for the job's status", file=sys.stderr)
    except Exception as err:  # aiohttp connection errors
        print(f"cliplab: log stream failed ({type(err).__name__}); waiting for the job's status", file=sys.stderr)
    while True:
        status = status_name(job_client.get_job_status(job_id))
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def job_message(job_client, job_id: str) -> str:
    """The first line of the job's status message, without the log tail Ray appends to it."""
    try:
        info = job_client.get_job_info(job_id)
    except Exception:  # noqa: BLE001 (best effort, for the error line only)
        return ""
    text = (info.message or "").strip()
    first = text.splitlines()[0] if text else ""
    first = first.split(", last available logs")[0].rstrip(":")
    from cliplab.redaction import Redactor

    return Redactor().text(first)
