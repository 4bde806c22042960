"""The driver's connection to Ray, shared by ``cliplab train``, ``eval``, ``sweep``, ``data`` and
the demo: one :func:`init_ray`, and the runtime env it gives its own driver (:data:`DRIVER_ENV`),
which a submitted job's runtime env must leave alone (:mod:`cliplab.jobspec`)."""

from __future__ import annotations

import logging
import os

from cliplab.errors import ServiceError

# Ray's own call of its deprecated API: Ray Train's state export (on for the dashboard's Train
# tab) builds ``DataConfig.default_ingest_options()``, which passes ``exclude_resources`` and warns
# once per run in the controller's log. cliplab's own options avoid it (launch.ingest_options).
QUIET_RAY_WARNINGS = "ignore:`ExecutionOptions.exclude_resources` is deprecated"

# the driver's own runtime env (ray.init): Ray fails a job whose runtime env sets one of these too
DRIVER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": QUIET_RAY_WARNINGS}


# Ray's state API (``ray.util.state``) finds its cluster from RAY_API_SERVER_ADDRESS, else
# RAY_ADDRESS, else by looking for Ray's processes on the machine, and fails with "Found multiple
# active Ray instances" where it finds two. Ray Train's PlacementGroupCleaner asks it, from inside
# the cluster, whether a run's controller is alive; when the lookup fails its monitor thread dies,
# and a run whose controller is killed (a trial ASHA stops, a driver killed mid-sweep) keeps its
# placement group, and its CPUs, for as long as the cluster lives. So the clusters cliplab starts
# tell their processes where their own dashboard is.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def _local_start_env() -> tuple[dict[str, str], dict]:
    """The runtime env and ``ray.init`` arguments for a Ray that ``ray.init`` is about to start
    here (none when it would join a running one): a dashboard port picked now, and its URL."""
    from ray._private import services

    try:
        if services.canonicalize_bootstrap_address(None) is not None:
            return {}, {}  # ray.init joins the cluster it found
    except Exception:  # noqa: BLE001 (ray.init reports whatever is wrong, as it always did)
        return {}, {}
    from cliplab.services.base import free_ports

    port = free_ports(1)[0]
    return {API_SERVER_ENV: f"http://127.0.0.1:{port}"}, {"dashboard_port": port}


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
    address = address or os.environ.get("RAY_ADDRESS")
    if inside_job:
        kwargs: dict = {}
    else:
        local_env, local_args = _local_start_env() if not address else ({}, {})
        kwargs = {"runtime_env": {"env_vars": {**driver_env(), **local_env}}, **local_args}
    try:
        ray.init(address=address, logging_level="WARNING", **kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises bare Exception, ConnectionError, RuntimeError...
        raise ServiceError(_init_failure(address, err)) from err


def _init_failure(address: str | None, err: BaseException) -> str:
    """One line for a ``ray.init`` that failed: what was tried, Ray's reason, what to do."""
    reason = " ".join(str(err).split()) or type(err).__name__
    if address:
        return (f"could not connect to Ray at {address}: {reason}. Check that the cluster is up "
                f"(`ray status --address {address}`), or unset RAY_ADDRESS / drop --address to start a local Ray")
    return (f"could not start a local Ray: {reason}. The machine may be overloaded, or a stale Ray holds its "
            "ports: run `ray stop --force` and retry, or pass --address of a running cluster")
