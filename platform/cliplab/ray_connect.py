"""The driver's connection to Ray, shared by ``cliplab train``, ``eval``, ``sweep``, ``data`` and
the demo: one :func:`init_ray`, and the runtime env it gives its own driver (:data:`DRIVER_ENV`),
which a submitted job's runtime env must leave alone (:mod:`cliplab.jobspec`)."""

from __future__ import annotations

import logging
import os

# Ray's own call of its deprecated API: Ray Train's state export (on for the dashboard's Train
# tab) builds ``DataConfig.default_ingest_options()``, which passes ``exclude_resources`` and warns
# once per run in the controller's log. cliplab's own options avoid it (launch.ingest_options).
QUIET_RAY_WARNINGS = "ignore:`ExecutionOptions.exclude_resources` is deprecated"

# the driver's own runtime env (ray.init): Ray fails a job whose runtime env sets one of these too
DRIVER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": QUIET_RAY_WARNINGS}


def driver_env() -> dict[str, str]:
    """:data:`DRIVER_ENV`, keeping the filters of a ``PYTHONWARNINGS`` the user set."""
    user = os.environ.get("PYTHONWARNINGS")
    return {**DRIVER_ENV, **({"PYTHONWARNINGS": f"{user},{QUIET_RAY_WARNINGS}"} if user else {})}


def init_ray(address: str | None = None) -> None:
    """Connect to ``address``/``RAY_ADDRESS``, or start a local Ray (as ``ray.init`` does)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # inside a Ray job (`ray job submit`, KubeRay) the job's runtime env rules: Ray refuses a driver
    # runtime env that sets a variable the job's env sets too
    inside_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level="WARNING",
             **({} if inside_job else {"runtime_env": {"env_vars": driver_env()}}))
