"""Node loss on a Ray cluster of two nodes (``ray.cluster_utils.Cluster``, token auth as the
project's services use): the second node, where the Train workers run, is killed mid-training
and mid-sweep, and the work finishes on the head node that remains.

At the start a test actor holds most of the head's CPU, so the Train workers can only be placed
on the second node; it is released when that node is killed, as if the head had room again."""

import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import experiment

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture
def two_nodes(emoji_on_s3, monkeypatch):
    """A head (1 CPU) and a second node (1 CPU); the driver connects to it for the test, then
    back to the session's Ray head if there was one."""
    import ray
    from ray.cluster_utils import Cluster

    from cliplab.services.base import free_ports
    from cliplab.services.ray_cluster import ensure_auth_token

    previous = os.environ.get("RAY_ADDRESS") if ray.is_initialized() else None
    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the nodes' processes must not see the session's head
    ensure_auth_token()
    temp_dir = tempfile.mkdtemp(prefix="cl2n-")  # Ray's socket paths must stay short: under /tmp
    cluster = Cluster(initialize_head=True, head_node_args={  # the dashboard serves the state API (list_actors)
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": free_ports(1)[0], "temp_dir": temp_dir})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        ray.init(address=cluster.address, logging_level="WARNING")
        blocker = _hold_the_head(cluster.head_node.node_id)
        yield cluster, second, blocker
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous:
            ray.init(address=previous, logging_level="WARNING")


def _hold_the_head(head_id: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0.9)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
    ray.get(holder.ready.remote())
    return holder


def _train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def _kill_second_node(cluster, second, blocker) -> None:
    import ray

    ray.kill(blocker)  # the head has room again ...
    cluster.remove_node(second, allow_graceful=False)  # ... and the second node's raylet and workers are gone


def _has_checkpoint(run_dir: Path) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text()


def test_losing_the_second_node_mid_training_finishes_on_the_head_at_the_exact_step(tmp_path, s3_server,
                                                                                    mlflow_server, two_nodes):
    from cliplab.train.launch import run_training

    cluster, second, blocker = two_nodes
    steps, every = 16, 4
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.max_steps": steps, "train.epochs": 4, "train.checkpoint_every": every, "train.cpus_per_worker": 0.4,
        "data.cpus_per_task": 0.05, "train.eval_every_epoch": False, "train.max_failures": 2,
        "tracking.run_name": "two-node-run", "tracking.experiment": "two-nodes"})
    client = MlflowClient(mlflow_server.uri)
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("two-nodes")
            runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'two-node-run'") if exp else []
            logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []
            if _has_checkpoint(Path(cfg.storage_path) / "two-node") and logged and max(logged) > every:
                killed["nodes"] = sorted(a.node_id for a in _train_workers())
                killed["at_step"] = max(logged)
                _kill_second_node(cluster, second, blocker)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg, name="two-node")
    thread.join(timeout=60)
    assert "at_step" in killed, "the run ended before the second node could be killed"
    assert killed["nodes"] == [second.node_id] * 2  # both workers ran on the node that was lost
    assert result.error is None and result.metrics["step"] == steps

    run_id = result.metrics["mlflow_run_id"]
    seen = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert sorted(seen) == list(range(1, steps + 1))  # the exact final step, one MLflow run
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "train/resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= every and resumed[0] % every == 0, resumed
    redone = sum(c - 1 for c in seen.values())
    assert redone <= every, f"{redone} steps redone after losing the node at step {killed['at_step']}"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_losing_the_second_node_mid_sweep_resumes_the_trial_and_completes_the_sweep(tmp_path, s3_server,
                                                                                     mlflow_server, two_nodes):
    from ray import tune

    from cliplab.tune import NoScheduler, Sweep, run_sweep

    cluster, second, blocker = two_nodes
    steps, every = 8, 2
    base = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.max_steps": steps, "train.checkpoint_every": every, "train.num_workers": 1,
        "train.cpus_per_worker": 0.4, "data.cpus_per_task": 0.05, "train.eval_every_epoch": False,
        "train.max_failures": 2, "tracking.experiment": "two-node-sweep"})
    sweep = Sweep(base=base, space={"optim.lr": tune.grid_search([1e-3, 2e-3])}, metric="train/loss", mode="min",
                  scheduler=NoScheduler(), name="two-node-sweep", max_concurrent_trials=2)
    client = MlflowClient(mlflow_server.uri)
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("two-node-sweep")
            for run in client.search_runs([exp.experiment_id], "tags.sweep = 'two-node-sweep'") if exp else []:
                trial = run.data.tags.get("mlflow.runName", "")
                logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                if trial.startswith("trial_") and _has_checkpoint(Path(base.storage_path) / f"two-node-sweep-{trial}") \
                        and logged and max(logged) > every:
                    killed.update(trial=trial, run_id=run.info.run_id, at_step=max(logged),
                                  nodes={a.node_id for a in _train_workers()})
                    _kill_second_node(cluster, second, blocker)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = run_sweep(sweep, register=False)
    thread.join(timeout=60)
    assert "trial" in killed, "the sweep ended before the second node could be killed"
    assert killed["nodes"] == {second.node_id}  # the trials' workers ran on the node that was lost
    assert not outcome.errors, outcome.errors
    assert len(outcome.rows) == 2 and all(r["stop_reason"] == "completed" and r["step"] == steps
                                          for r in outcome.rows), outcome.rows
    # the affected trial went on from its checkpoint, in its own MLflow run
    resumed = [int(m.value) for m in client.get_metric_history(killed["run_id"], "train/resumed_from_step")]
    assert resumed and all(r >= every and r % every == 0 for r in resumed), resumed
    seen = Counter(m.step for m in client.get_metric_history(killed["run_id"], "train/loss"))
    assert sorted(seen) == list(range(1, steps + 1))
    exp = client.get_experiment_by_name("two-node-sweep")
    names = [r.data.tags["mlflow.runName"] for r in client.search_runs([exp.experiment_id],
                                                                      "tags.sweep = 'two-node-sweep'")
             if r.data.tags.get("cliplab.kind") != "sweep"]
    # the affected trial kept its one MLflow run across the restart (a trial that lost its node before
    # Ray Train registered its first checkpoint starts again from step 0, in a new run)
    assert set(names) == {r["trial"] for r in outcome.rows} and names.count(killed["trial"]) == 1, names
