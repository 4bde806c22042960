"""Submit ``cliplab train`` / ``cliplab sweep`` to a running Ray cluster as a Ray Job.

The job's entrypoint is the same ``cliplab`` command a user would run on the head node; the
current directory (the repo, minus data, runs, virtualenvs and VCS) travels as the job's
``working_dir`` so that sweep and experiment files resolve the same way there. The runtime env
comes from ``cluster/runtime_env.yaml`` (env vars, excludes) merged with what is computed here.

Secrets never go into the job: Ray keeps a job's entrypoint and runtime env in its job table, and
anyone holding the cluster's auth token reads them in plain text (``ray job list``, the dashboard).
So the submitting shell's S3 / MLflow settings are forwarded as runtime-env ``env_vars`` only when
they hold no secret (endpoints, region, the tracking URI without a password); keys, tokens and
passwords come from the cluster itself (Kubernetes Secrets mounted as env vars, see cluster/).
``--forward-secrets`` sends them anyway, with a warning saying who can read them; a secret in
``--env``, ``--set`` or the runtime env file is refused without it. The Ray auth token is sent
only as an HTTP header.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError, ServiceError
from cliplab.ray_connect import DRIVER_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
CONNECT_TIMEOUT_S = 5.0

# Never uploaded as part of the working dir (gitignore syntax, relative to it). Ray also honours
# the working dir's .gitignore files.
WORKING_DIR_EXCLUDES = (
    ".venv", "venv", ".git", ".cliplab", "runs", "mlruns", "/data", "*.tar", "*.tar.gz", "*.parquet",
    "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "/build", "/dist", "*.egg-info", "/bench/results",
)

# Forwarded from the submitting environment when set: the S3 and MLflow settings a job needs.
FORWARD_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL",
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

SECRETS_WARNING = ("cliplab: warning: --forward-secrets puts {names} in the job's runtime env: Ray keeps it in its "
                   "job table, readable in plain text by anyone holding the cluster's auth token (`ray job list`, "
                   "the dashboard's Jobs page) for as long as the job is listed. Prefer a Kubernetes Secret "
                   "(cluster/README.md).")

# Set by cliplab's driver in its own ray.init runtime env (cliplab.ray_connect.init_ray): Ray fails a
# job whose runtime env sets the same variable, so a job's runtime env must not.
DRIVER_ENV_VARS = tuple(DRIVER_ENV)


@dataclass
class JobSpec:
    """What ``cliplab submit`` sends: an entrypoint and a runtime env."""

    entrypoint: str
    runtime_env: dict[str, Any]
    forwarded: list[str] = field(default_factory=list)  # names of env vars passed through (never values)
    submission_id: str | None = None
    secrets: list[str] = field(default_factory=list)  # forwarded names that hold secrets (--forward-secrets)
    withheld: list[str] = field(default_factory=list)  # secret names set here and left to the cluster


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
# building the job


_SWEEP_DEF = re.compile(r"^SWEEP\s*[:=]", re.MULTILINE)


def command_for(path: Path) -> str:
    """``sweep`` for files under a ``sweeps/`` folder or Python files defining ``SWEEP``, else ``train``."""
    if "sweeps" in path.parts[:-1]:
        return "sweep"
    if path.suffix == ".py":
        try:
            if _SWEEP_DEF.search(path.read_text()):
                return "sweep"
        except OSError:
            pass
    return "train"


def load_runtime_env(path: str | Path | None, working_dir: Path) -> dict[str, Any]:
    """The runtime env YAML at ``path``; without one, ``cluster/runtime_env.yaml`` under the working
    dir when it exists, else an empty env."""
    import yaml

    if path is None:
        found = working_dir / RUNTIME_ENV_FILE
        if not found.is_file():
            return {}
        path = found
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"runtime env file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a runtime env is a mapping (env_vars, excludes, ...)")
    return data


def forwarded_env(names: Iterable[str] = FORWARD_ENV, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ) if environ is None else environ
    return {n: environ[n] for n in names if environ.get(n)}


def holds_secret(name: str, value: str, redactor=None) -> bool:
    """Whether an env var (or a config override) carries a secret: a secret-named variable
    (``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``, ``*_PASSWORD``...), or a value the MLflow redactor
    would mask (a URI with a password, a known secret value)."""
    from cliplab.redaction import Redactor, is_secret_name

    redactor = redactor or Redactor()
    return is_secret_name(name) or redactor.text(value) != value


def _refuse_secret(what: str, fix: str) -> ConfigError:
    return ConfigError(f"{what} holds a secret, and Ray shows a job's runtime env and entrypoint in plain text to "
                       f"anyone with the cluster's auth token (`ray job list`): {fix}, or pass --forward-secrets "
                       "to send it anyway")


def build_job(file: str | Path, *, overrides: Iterable[str] = (), extra_args: Iterable[str] = (),
              working_dir: str | Path = ".", runtime_env_file: str | Path | None = None,
              forward_env: bool = True, env: Iterable[str] = (), submission_id: str | None = None,
              command: str | None = None, forward_secrets: bool = False) -> JobSpec:
    """The entrypoint and runtime env for ``cliplab submit FILE``. ``FILE`` must lie inside the
    working dir (it is uploaded with it) and is addressed relative to it on the cluster.

    Without ``forward_secrets`` no secret value reaches the entrypoint or the runtime env: secret
    variables of :data:`FORWARD_ENV` stay here (``withheld``), and a secret in ``env``, ``overrides``
    or the runtime env file is a :class:`ConfigError`."""
    from cliplab.redaction import Redactor

    redactor = Redactor()
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ConfigError(f"working dir not found: {wd}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"file not found: {file}")
    try:
        rel = path.resolve().relative_to(wd)
    except ValueError:
        raise ConfigError(f"{file} is outside the working dir {wd}, which is what the job receives; "
                          "move it there or pass --working-dir") from None
    if any(part in {".cliplab", "runs", "mlruns", "data", ".git", ".venv"} for part in rel.parts[:-1]):
        raise ConfigError(f"{file} lies in an excluded folder ({rel.parts[0]}/) and would not be uploaded")
    command = command or command_for(path)
    args = ["cliplab", command, rel.as_posix()]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, _, value = item.partition("=")
        if not forward_secrets and holds_secret(key.rsplit(".", 1)[-1], value, redactor):
            raise _refuse_secret(f"--set {key}", "keep it out of the config (MLFLOW_TRACKING_USERNAME/PASSWORD and "
                                 "AWS_* on the cluster, from a Kubernetes Secret)")
        args += ["--set", item]
    args += list(extra_args)

    runtime_env = load_runtime_env(runtime_env_file, wd)
    runtime_env = dict(runtime_env)
    runtime_env["working_dir"] = str(wd)
    excludes = list(runtime_env.get("excludes") or [])
    runtime_env["excludes"] = excludes + [e for e in WORKING_DIR_EXCLUDES if e not in excludes]
    env_vars = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    secret_names = [k for k, v in env_vars.items() if holds_secret(k, v, redactor)]
    if secret_names and not forward_secrets:
        raise _refuse_secret(f"the runtime env file's env_vars {', '.join(secret_names)}",
                             "remove it there and give the cluster the credential as a Kubernetes Secret")
    forwarded: dict[str, str] = {}
    withheld: list[str] = []
    if forward_env:
        for name, value in forwarded_env().items():
            if holds_secret(name, value, redactor) and not forward_secrets:
                withheld.append(name)
            else:
                forwarded[name] = value
    for name in env:
        if name not in os.environ:
            raise ConfigError(f"--env {name}: not set in this environment")
        if holds_secret(name, os.environ[name], redactor) and not forward_secrets:
            raise _refuse_secret(f"--env {name}", "give the cluster the credential as a Kubernetes Secret")
        forwarded[name] = os.environ[name]
    env_vars.update(forwarded)
    secret_names += [k for k, v in forwarded.items() if holds_secret(k, v, redactor) and k not in secret_names]
    if "CLIPLAB_GIT_SHA" not in env_vars:
        from cliplab.tracking.artifacts import git_sha

        sha = git_sha(wd)
        if sha != "unknown":
            env_vars["CLIPLAB_GIT_SHA"] = sha  # the job's working dir ships no .git
    clash = sorted(set(env_vars) & set(DRIVER_ENV_VARS))
    if clash:
        raise ConfigError(f"the job's runtime env sets {', '.join(clash)}, which cliplab's driver sets itself "
                          "(Ray refuses such a job): remove it from the runtime env file or --env")
    runtime_env["env_vars"] = env_vars
    return JobSpec(entrypoint=shlex.join(args), runtime_env=runtime_env, forwarded=sorted(forwarded),
                   submission_id=submission_id, secrets=sorted(secret_names), withheld=sorted(withheld))


def check_config(file: str | Path, command: str, overrides: Iterable[str] = ()) -> None:
    """Load and validate the experiment or sweep here, so a typo fails before anything is uploaded."""
    if command == "sweep":
        from cliplab.tune import load_sweep

        load_sweep(file, list(overrides))
    else:
        from cliplab.config import load_experiment

        load_experiment(file, list(overrides))


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
