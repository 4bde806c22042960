"""Sweeps on a cluster that scales from zero GPUs: "never fits" fails at once, "not yet" waits.

The end-to-end test starts Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1`` and an
``--autoscaling-config``, as ``ray.cluster_utils.AutoscalingCluster`` does, but on free ports and
without its ``ray stop --force``, which would stop every Ray on the machine): a head with no GPU and
a ``gpu`` node type the autoscaler launches on demand. A two-trial sweep with fractional GPUs must
wait for it and complete. Training on the simulated GPU node runs on the CPU; the test checks the
scheduling, not CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from cliplab.config import ExperimentConfig, with_overrides
from cliplab.errors import ConfigError
from cliplab.tune.capacity import (
    TRIAL_DRIVER,
    Capacity,
    NodeType,
    check_capacity,
    node_types_from_config,
    parse_resources,
    trials_that_fit,
    wait_for_capacity,
)

REPO = Path(__file__).resolve().parents[1]


def _gpu_cfg(workers=1, gpus=0.5, cpus=0.5):
    return with_overrides(ExperimentConfig(), {"train.use_gpu": True, "train.num_workers": workers,
                                               "train.gpus_per_worker": gpus, "train.cpus_per_worker": cpus})


HEAD = {"CPU": 2.0, "memory": 1e9}
GPU_NODE = NodeType("gpu", {"CPU": 16.0, "GPU": 1.0}, max_count=2)


def test_a_fixed_cluster_without_gpus_refuses_a_gpu_sweep_at_once():
    with pytest.raises(ConfigError, match="one trial needs 0.5 GPU .* has 0 and no autoscaler"):
        check_capacity(_gpu_cfg(), 1, Capacity(HEAD, [HEAD]))


def test_an_autoscaling_cluster_at_zero_gpus_is_not_yet_rather_than_never():
    short = check_capacity(_gpu_cfg(), 2, Capacity(HEAD, [HEAD], [GPU_NODE], autoscaling=True))
    assert short is not None and "0.5 GPU" in short and "0 GPU now" in short
    # once a GPU node is up, a trial fits and there is nothing to wait for
    up = {"CPU": 18.0, "GPU": 1.0}
    assert check_capacity(_gpu_cfg(), 2, Capacity(up, [HEAD, GPU_NODE.resources], [GPU_NODE], True)) is None


def test_a_worker_larger_than_every_node_type_can_never_run():
    with pytest.raises(ConfigError, match=r"needs 0.5 CPU, 2 GPU but no node this cluster can scale to offers that .*largest: "
                                          r"16 CPU, 1 GPU"):
        check_capacity(_gpu_cfg(gpus=2), 1, Capacity(HEAD, [HEAD], [GPU_NODE], autoscaling=True))


def test_trials_beyond_what_the_cluster_scales_to_can_never_run():
    with pytest.raises(ConfigError, match="one trial needs 3 GPU but this cluster scales to at most 2"):
        check_capacity(_gpu_cfg(workers=3, gpus=1), 1, Capacity(HEAD, [HEAD], [GPU_NODE], autoscaling=True))
    with pytest.raises(ConfigError, match="5 concurrent trials need 2.5 GPU .* at most 2: lower "
                                          "max_concurrent_trials to 4"):
        check_capacity(_gpu_cfg(), 5, Capacity(HEAD, [HEAD], [GPU_NODE], autoscaling=True))
    # an autoscaler whose node types are unknown (KubeRay's sidecar): only "not yet" can be said
    assert check_capacity(_gpu_cfg(workers=3, gpus=1), 5, Capacity(HEAD, [HEAD], [], autoscaling=True))


def test_a_sweep_left_open_runs_as_many_trials_at_once_as_the_cluster_holds():
    """``max_concurrent_trials`` None: the trials' workers and drivers (0.01 CPU each) decide."""
    from cliplab.tune.sweep import Optuna, RandomSearch

    two = with_overrides(ExperimentConfig(), {"train.num_workers": 2, "train.cpus_per_worker": 0.5})
    assert trials_that_fit(two, {"CPU": 4.0}, limit=5) == 3  # 1.01 CPU a trial
    assert trials_that_fit(two, HEAD, limit=5) == 1
    assert trials_that_fit(with_overrides(two, {"train.num_workers": 1}), HEAD, limit=5) == 3
    assert trials_that_fit(two, {"CPU": 8.0}, limit=2) == 2  # never more than the sweep's trials
    assert trials_that_fit(two, {"CPU": 0.5}, limit=5) == 1  # at least one: the capacity check says the rest
    assert trials_that_fit(_gpu_cfg(workers=2, gpus=1), {"CPU": 18.0, "GPU": 3.0}, limit=8) == 1
    assert trials_that_fit(_gpu_cfg(), {"CPU": 18.0, "GPU": 2.0}, limit=8) == 4
    assert TRIAL_DRIVER["cpu"] > 0  # keeps trial drivers off a KubeRay head started with num-cpus 0
    assert RandomSearch().concurrent(3) == 3 and Optuna().concurrent(3) == 1  # Optuna learns from each result


def test_the_node_types_of_an_autoscaler_config():
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}},
                                       "gpu": {"resources": {"CPU": 8, "GPU": 8}, "max_workers": 10},
                                       "cpu": {"resources": {"CPU": 32}}}}
    assert node_types_from_config(config) == [NodeType("gpu", {"CPU": 8.0, "GPU": 8.0}, 3),
                                              NodeType("cpu", {"CPU": 32.0}, 3)]


def test_max_node_resources_are_parsed_or_refused_with_an_example():
    assert parse_resources("GPU=8, CPU=96") == {"GPU": 8.0, "CPU": 96.0}
    for bad in ("GPU", "GPU=eight", "GPU=-1", ""):
        with pytest.raises(ConfigError, match="GPU=8,CPU=96"):
            parse_resources(bad)


def test_waiting_asks_the_autoscaler_for_a_trial_then_withdraws_or_gives_up(capsys):
    cfg = _gpu_cfg(workers=2)
    states = iter([Capacity(HEAD, [HEAD], [GPU_NODE], True)] * 3 + [Capacity({"CPU": 18, "GPU": 1}, [], [], True)])
    requests = []
    waited = wait_for_capacity(cfg, 1, timeout_s=60, poll_s=0.01, read=lambda: next(states), request=requests.append)
    assert waited >= 0 and requests == [[{"CPU": 0.5, "GPU": 0.5}] * 2, []]
    assert "waiting for the autoscaler (up to 60 s): one trial needs 1 CPU, 1 GPU" in capsys.readouterr().out

    requests.clear()
    with pytest.raises(ConfigError, match=r"gave up after \d+ s waiting .* 1 GPU short.*--scale-up-timeout"):
        wait_for_capacity(cfg, 1, timeout_s=0.05, poll_s=0.01, read=lambda: Capacity(HEAD, [HEAD], [], True),
                          request=requests.append)
    assert requests[-1] == []  # the request is withdrawn even when the sweep gives up


# end to end on Ray's fake autoscaler ------------------------------------------------------------
def _fake_autoscaler_config(gcs_address: str) -> dict:
    """A cluster config for Ray's ``fake_multinode`` provider (the shape of its example.yaml, which
    the wheel does not ship): the head, and one ``gpu`` node type launched on demand."""
    return {
        "cluster_name": "cliplab-fake", "max_workers": 1, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},  # else port 6379
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 200_000_000}, "node_config": {},
                    "min_workers": 0, "max_workers": 1}},
        "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "auth": {}, "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


@pytest.fixture
def fake_autoscaling_cluster(tmp_path, emoji_on_s3):
    """A head with 2 CPUs and no GPU, and a ``gpu`` node type (2 CPUs, 1 fake GPU, at most one node)
    that the autoscaler launches on demand."""
    from cliplab.services import RayService

    config_path = tmp_path / "autoscaling.json"

    class FakeAutoscalingHead(RayService):
        name = "Ray head (fake autoscaler)"

        def command(self):
            config_path.write_text(json.dumps(_fake_autoscaler_config(self.address)))
            return [*super().command(), "--num-gpus", "0", f"--autoscaling-config={config_path}"]

        def environment(self):
            return {**super().environment(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}

    svc = FakeAutoscalingHead(tmp_path / "ray", num_cpus=2).start()
    try:
        yield svc
    finally:
        svc.stop()
        for proc in psutil.process_iter(["cmdline"]):  # the simulated nodes the monitor started
            if any(svc.address in arg for arg in proc.info.get("cmdline") or []):
                proc.kill()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_a_gpu_sweep_waits_for_the_autoscaler_and_completes(tmp_path, s3_server, mlflow_server,
                                                           fake_autoscaling_cluster):
    """Fails on the old check: "one trial needs 0.5 GPU (1 workers) but the cluster has 0"."""
    sweep = tmp_path / "gpu_from_zero.py"
    sweep.write_text(textwrap.dedent('''
        """Two fractional-GPU trials on a cluster whose GPU group starts at zero."""
        from ray import tune
        from cliplab.config import ExperimentConfig
        from cliplab.tune import NoScheduler, Sweep

        SWEEP = Sweep(base=ExperimentConfig(), space={"optim.lr": tune.grid_search([1e-3, 2e-3])},
                      scheduler=NoScheduler(), max_concurrent_trials=2)
    '''))
    overrides = {"name": "gpu", "storage_path": str(tmp_path / "runs"), "data.train": "s3://cliplab/emoji/train/",
                 "data.val": "s3://cliplab/emoji/val/", "data.s3.endpoint_url": s3_server.endpoint,
                 "data.batch_size": 16, "train.max_steps": 2, "train.checkpoint_every": 2, "train.num_workers": 1,
                 "train.use_gpu": "true", "train.gpus_per_worker": 0.5, "train.cpus_per_worker": 0.5,
                 "tracking.uri": mlflow_server.uri, "tracking.experiment": "gpu-from-zero"}
    env = {**os.environ, **fake_autoscaling_cluster.env()}
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "sweep", str(sweep), "--no-register",
                           "--scale-up-timeout", "240", *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "waiting for the autoscaler (up to 240 s): one trial needs 0.5 CPU, 0.5 GPU" in out, out[-4000:]
    assert "the cluster scaled up in" in out
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| trial_")]
    assert len(rows) == 2 and all("completed" in r for r in rows), proc.stdout[-3000:]

    # a worker larger than the autoscaler's largest node type (read from its config) never waits
    overrides["train.gpus_per_worker"] = 2
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "sweep", str(sweep), "--no-register",
                           *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no node this cluster can scale to offers that (the largest: 2 CPU, 1 GPU)" in proc.stderr, proc.stderr
    assert "waiting for the autoscaler" not in proc.stdout and "Traceback" not in proc.stderr
