"""The Ray Job that ``cliplab submit FILE`` sends: its entrypoint and runtime env (:func:`build_job`).

The job's entrypoint is the same ``cliplab`` command a user would run on the head node; the
current directory (the repo, minus data, runs, virtualenvs and VCS) travels as the job's
``working_dir`` so that sweep and experiment files resolve the same way there. The runtime env
comes from ``cluster/runtime_env.yaml`` (env vars, excludes) merged with what is computed here.

Secrets never go into the job: Ray keeps a job's entrypoint and runtime env in its job table, and
anyone holding the cluster's auth token reads them in plain text (``ray job list``, the dashboard).
So the submitting shell's S3 / MLflow settings are forwarded as runtime-env ``env_vars`` only when
they hold no secret (endpoints, region, the tracking URI without a password); keys, tokens and
passwords come from the cluster itself (Kubernetes Secrets mounted as env vars, see cluster/).
``--forward-secrets`` sends them anyway, with :data:`SECRETS_WARNING` saying who can read them; a
secret in ``--env``, ``--set`` or the runtime env file is refused without it.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError
from cliplab.ray_connect import DRIVER_ENV

RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"

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
    wd, path, rel = _locate(file, working_dir)
    args = ["cliplab", command or command_for(path), rel.as_posix(),
            *_override_args(overrides, redactor, forward_secrets=forward_secrets), *extra_args]
    runtime_env = _with_working_dir(load_runtime_env(runtime_env_file, wd), wd)
    env_vars = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    secret_names = [k for k, v in env_vars.items() if holds_secret(k, v, redactor)]
    if secret_names and not forward_secrets:
        raise _refuse_secret(f"the runtime env file's env_vars {', '.join(secret_names)}",
                             "remove it there and give the cluster the credential as a Kubernetes Secret")
    forwarded, withheld = _forwarded(env, redactor, forward_env=forward_env, forward_secrets=forward_secrets)
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


def _locate(file: str | Path, working_dir: str | Path) -> tuple[Path, Path, Path]:
    """The resolved working dir, ``file`` and ``file`` relative to the working dir; a
    :class:`ConfigError` when ``file`` would not be uploaded with it."""
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
    return wd, path, rel


def _override_args(overrides: Iterable[str], redactor, *, forward_secrets: bool) -> list[str]:
    """``--set KEY=VALUE`` for each override; one holding a secret is refused unless ``forward_secrets``."""
    args: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, _, value = item.partition("=")
        if not forward_secrets and holds_secret(key.rsplit(".", 1)[-1], value, redactor):
            raise _refuse_secret(f"--set {key}", "keep it out of the config (MLFLOW_TRACKING_USERNAME/PASSWORD and "
                                 "AWS_* on the cluster, from a Kubernetes Secret)")
        args += ["--set", item]
    return args


def _with_working_dir(runtime_env: dict, wd: Path) -> dict:
    """A copy of ``runtime_env`` shipping ``wd``, with cliplab's :data:`WORKING_DIR_EXCLUDES` added."""
    runtime_env = dict(runtime_env)
    runtime_env["working_dir"] = str(wd)
    excludes = list(runtime_env.get("excludes") or [])
    runtime_env["excludes"] = excludes + [e for e in WORKING_DIR_EXCLUDES if e not in excludes]
    return runtime_env


def _forwarded(env: Iterable[str], redactor, *, forward_env: bool,
               forward_secrets: bool) -> tuple[dict[str, str], list[str]]:
    """The variables this shell gives the job (:data:`FORWARD_ENV` when ``forward_env``, and every
    ``--env`` name) and the names withheld as secrets. A secret ``--env`` is refused unless
    ``forward_secrets``; so is a name this environment does not set."""
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
    return forwarded, withheld


def check_config(file: str | Path, command: str, overrides: Iterable[str] = ()) -> None:
    """Load and validate the experiment or sweep here, so a typo fails before anything is uploaded."""
    if command == "sweep":
        from cliplab.tune import load_sweep

        load_sweep(file, list(overrides))
    else:
        from cliplab.config import load_experiment

        load_experiment(file, list(overrides))
