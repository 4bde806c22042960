"""Will a sweep's trials fit the cluster: never, now, or once the autoscaler has scaled up?

KubeRay clusters start their GPU group at zero replicas, so before the first trial asks for a GPU
the cluster has none. The check therefore tells two cases apart:

- **never**: one worker's bundle fits no node the cluster can ever have (its current nodes and the
  node types it can scale to), or one trial (or the concurrent trials) needs more than the cluster
  can ever hold. A :class:`~cliplab.errors.ConfigError` says what to lower.
- **not yet**: the cluster autoscales (an autoscaler reports to the GCS, or the user named the node
  shape it scales to) and could hold a trial, but does not now. :func:`wait_for_capacity` asks the
  autoscaler for one trial's bundles, logs what it waits for and gives up after a timeout.

The node types come from the autoscaler's own config where this process can read it (``ray up`` and
the fake multi-node provider run the monitor on the head), else from ``--max-node-resources`` /
``CLIPLAB_MAX_NODE_RESOURCES`` (the KubeRay manifests set it from the GPU group's shape: the
autoscaler runs in a sidecar there).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cliplab.errors import ConfigError

log = logging.getLogger(__name__)

#: ``GPU=8,CPU=96,memory=...``: the largest node the cluster can scale to (see the module docstring)
MAX_NODE_ENV = "CLIPLAB_MAX_NODE_RESOURCES"
SCALE_UP_TIMEOUT_ENV = "CLIPLAB_SCALE_UP_TIMEOUT_S"
EPS = 1e-9
# a Tune trial's driver only waits on its TorchTrainer, but it needs a CPU node: a KubeRay head
# started with num-cpus 0 keeps trial drivers (each a Python process with torch) off the head
TRIAL_DRIVER = {"cpu": 0.01}


@dataclass(frozen=True)
class NodeType:
    """A node shape the cluster can have: ``resources`` per node, up to ``max_count`` of them
    (None: no known limit)."""

    name: str
    resources: dict[str, float]
    max_count: int | None = None


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds now, and what it can scale to."""

    total: dict[str, float]  # ray.cluster_resources()
    nodes: list[dict[str, float]]  # each alive node's resources
    node_types: list[NodeType] = field(default_factory=list)  # what an autoscaler can add
    autoscaling: bool = False


def parse_resources(text: str, source: str = "--max-node-resources") -> dict[str, float]:
    """``GPU=8,CPU=96`` → ``{"GPU": 8.0, "CPU": 96.0}``; a :class:`ConfigError` on anything else."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not name.strip() or amount < 0:
            raise ConfigError(f"{source}: '{part}' is not RESOURCE=AMOUNT; write e.g. GPU=8,CPU=96")
        out[name.strip()] = amount
    if not out:
        raise ConfigError(f"{source} is empty; write e.g. GPU=8,CPU=96")
    return out


def worker_bundle(cfg) -> dict[str, float]:
    """One Train worker's resources."""
    t = cfg.train
    out = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        out["GPU"] = float(t.gpus_per_worker)
    return out


def trial_resources(cfg) -> dict[str, float]:
    """What one trial's TorchTrainer holds: its workers (the trial's driver needs ~nothing)."""
    return {k: v * cfg.train.num_workers for k, v in worker_bundle(cfg).items()}


def trials_that_fit(cfg, total: dict[str, float], limit: int) -> int:
    """How many trials of ``cfg`` the resources ``total`` (``ray.cluster_resources()``) hold at
    once, by their workers' CPUs and GPUs and their drivers' CPU (:data:`TRIAL_DRIVER`): at least
    1, at most ``limit``. What a sweep runs concurrently when ``max_concurrent_trials`` is None, as
    Ray Tune packs trials by default."""
    need = trial_resources(cfg)
    need["CPU"] = need.get("CPU", 0.0) + TRIAL_DRIVER["cpu"]
    fits = min((int((total.get(kind, 0.0) + EPS) // amount) for kind, amount in need.items() if amount > 0),
               default=limit)
    return max(1, min(limit, fits))


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(amount <= have.get(kind, 0.0) + EPS for kind, amount in need.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    """``2 CPU, 1 GPU``: what a trial asks for, without Ray's bookkeeping resources (memory, node IPs)."""
    shown = {k: v for k, v in resources.items()
             if k in ("CPU", "GPU") or (v and not k.startswith(("node:", "accelerator_type:"))
                                        and k not in ("memory", "object_store_memory"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def ceiling(capacity: Capacity) -> dict[str, float] | None:
    """The most of each resource the cluster can ever hold, or None when some node type has no
    known count limit."""
    out: dict[str, float] = {}
    for node in capacity.nodes:
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + v
    for t in capacity.node_types:
        if t.max_count is None:
            return None
        for k, v in t.resources.items():
            out[k] = out.get(k, 0.0) + v * t.max_count
    return out


def check_capacity(cfg, concurrent: int, capacity: Capacity) -> str | None:
    """Raise :class:`ConfigError` when the trials can never run; return None when one trial fits
    now, else a line saying what the cluster still lacks (the case to wait for)."""
    bundle, need = worker_bundle(cfg), trial_resources(cfg)
    t = cfg.train
    if not capacity.autoscaling:  # a fixed cluster: what it has now is all it will ever have
        for kind, amount in need.items():
            have = capacity.total.get(kind, 0.0)
            if amount > have + EPS:
                raise ConfigError(f"one trial needs {amount:g} {kind} ({t.num_workers} workers) but the cluster "
                                  f"has {have:g} and no autoscaler: lower train.num_workers or "
                                  f"train.{kind.lower()}s_per_worker, or give the cluster an autoscaler")
            if amount * concurrent > have + EPS:
                raise ConfigError(f"{concurrent} concurrent trials need {amount * concurrent:g} {kind}, the cluster "
                                  f"has {have:g}: lower max_concurrent_trials to {int(have // amount)} or use "
                                  f"fractional train.{kind.lower()}s_per_worker")
        return None
    shapes = [*capacity.nodes, *(nt.resources for nt in capacity.node_types)]
    if capacity.node_types and not any(_fits(bundle, s) for s in shapes):
        largest = max(shapes, key=lambda s: (s.get("GPU", 0.0), s.get("CPU", 0.0)))
        raise ConfigError(f"one Train worker needs {_describe(bundle)} but no node this cluster can scale to offers "
                          f"that (the largest: {_describe(largest)}): lower train.gpus_per_worker / "
                          "train.cpus_per_worker, or add a node type that fits")
    top = ceiling(capacity) if capacity.node_types else None
    if top is not None:
        for kind, amount in need.items():
            cap = top.get(kind, 0.0)
            if amount > cap + EPS:
                raise ConfigError(f"one trial needs {amount:g} {kind} but this cluster scales to at most {cap:g}: "
                                  f"lower train.num_workers or train.{kind.lower()}s_per_worker, or raise the node "
                                  "group's maxReplicas")
            if amount * concurrent > cap + EPS:
                raise ConfigError(f"{concurrent} concurrent trials need {amount * concurrent:g} {kind} but this "
                                  f"cluster scales to at most {cap:g}: lower max_concurrent_trials to "
                                  f"{int(cap // amount)}, or raise the node group's maxReplicas")
    if _fits(need, capacity.total):
        return None
    missing = {k: v - capacity.total.get(k, 0.0) for k, v in need.items() if v > capacity.total.get(k, 0.0) + EPS}
    return (f"one trial needs {_describe(need)}; the cluster has "
            f"{_describe({k: capacity.total.get(k, 0.0) for k in need})} now, {_describe(missing)} short")


# reading the cluster ---------------------------------------------------------------------------
def _autoscaler_config_types(gcs_address: str) -> list[NodeType]:
    """The worker node types of the autoscaler monitor of the cluster at ``gcs_address`` when it runs
    on this host (its ``--autoscaling-config``), or none."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")), None)
        gcs = next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), "")
        if not path or not any("monitor" in a for a in cmd) or gcs.rsplit(":", 1)[-1] != port:
            continue  # another cluster's monitor on the same host
        try:
            import yaml

            config = yaml.safe_load(Path(path).read_text())
        except (OSError, ValueError):
            continue
        return node_types_from_config(config)
    return []


def node_types_from_config(config: dict) -> list[NodeType]:
    """The node types of a Ray autoscaler config (``available_node_types``; the head type counts
    once, the others up to their ``max_workers``, capped by the cluster's ``max_workers``)."""
    head = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = 1 if name == head else spec.get("max_workers", cluster_max)
        if count is not None and cluster_max is not None and name != head:
            count = min(count, cluster_max)
        if name != head:  # the head is among the live nodes already
            out.append(NodeType(name, resources, None if count is None else int(count)))
    return out


def _autoscaler_reports() -> bool:
    """Whether an autoscaler (v1: its status in the GCS KV store; v2: its state) watches this cluster."""
    import ray

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if _internal_kv_initialized() and _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
            return True
    except Exception:  # noqa: BLE001 - a private API: absence means "no v1 autoscaler seen"
        pass
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=5))
        return reply.autoscaling_state.autoscaler_state_version > 0
    except Exception:  # noqa: BLE001 - no v2 autoscaler
        return False


def read_capacity(max_node: dict[str, float] | None = None) -> Capacity:
    """The connected cluster's :class:`Capacity`. ``max_node`` (or ``CLIPLAB_MAX_NODE_RESOURCES``)
    names the largest node the cluster scales to, for autoscalers whose config is not readable here."""
    import ray

    if max_node is None and os.environ.get(MAX_NODE_ENV):
        max_node = parse_resources(os.environ[MAX_NODE_ENV], MAX_NODE_ENV)
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    types = _autoscaler_config_types(ray.get_runtime_context().gcs_address)
    if max_node:
        types = [*types, NodeType("--max-node-resources", dict(max_node))]
    autoscaling = bool(types) or _autoscaler_reports()
    return Capacity({k: float(v) for k, v in ray.cluster_resources().items()}, nodes, types, autoscaling)


def wait_for_capacity(cfg, concurrent: int, *, timeout_s: float, max_node: dict[str, float] | None = None,
                      poll_s: float = 2.0, read: Callable[[], Capacity] | None = None,
                      request: Callable[[list[dict[str, float]]], None] | None = None) -> float:
    """Block until one trial fits the cluster (returns the seconds waited). While it does not, ask
    the autoscaler for one trial's worker bundles (``ray.autoscaler.sdk.request_resources``) and log
    what is missing; after ``timeout_s`` raise :class:`ConfigError`. The request is withdrawn
    before returning: Tune's own placement groups keep the nodes busy from then on."""
    read = read or (lambda: read_capacity(max_node))
    short = check_capacity(cfg, concurrent, read())
    if short is None:
        return 0.0
    if request is None:
        from ray.autoscaler.sdk import request_resources

        def request(bundles):
            request_resources(bundles=bundles)
    start = last_log = time.monotonic()
    log.warning("waiting for the autoscaler (up to %.0f s): %s", timeout_s, short)
    print(f"waiting for the autoscaler (up to {timeout_s:.0f} s): {short}", flush=True)
    request([worker_bundle(cfg)] * cfg.train.num_workers)
    try:
        while short is not None:
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise ConfigError(f"gave up after {waited:.0f} s waiting for the cluster to scale up: {short}. Check "
                                  "the autoscaler's log (KubeRay: kubectl logs HEAD_POD -c autoscaler) and the GPU "
                                  "group's maxReplicas, or wait longer with --scale-up-timeout SECONDS")
            time.sleep(poll_s)
            short = check_capacity(cfg, concurrent, read())
            if short is not None and time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                print(f"still waiting for the autoscaler ({time.monotonic() - start:.0f} s): {short}", flush=True)
    finally:
        request([])
    waited = time.monotonic() - start
    print(f"the cluster scaled up in {waited:.0f} s", flush=True)
    return waited
