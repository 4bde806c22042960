"""What a cliplab run asks of Ray Train before any cluster work: Ray Data options without a
deprecated argument, and cliplab's Ray Train defaults, which a user's environment overrides."""

import os
import warnings

import pytest

from cliplab.config import ExperimentConfig, with_overrides
from cliplab.train import launch


def _trainer(tmp_path):
    cfg = with_overrides(ExperimentConfig(), {"data.train": str(tmp_path), "storage_path": str(tmp_path / "runs")})
    return launch.build_trainer(launch.Prepared(cfg, train=None, val=None), name="t", datasets={}, steps=1)


def test_the_val_datasets_ingest_options_raise_no_ray_deprecation_warning(tmp_path):
    """Ray's default ingest options pass ``exclude_resources``, deprecated in Ray 2.60: one
    RayDeprecationWarning in every run's controller log."""
    from ray.train import DataConfig
    from ray.util.annotations import RayDeprecationWarning

    data_config = _trainer(tmp_path).data_config
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ours = data_config._resolve_execution_options("val")
        with pytest.raises(RayDeprecationWarning, match="exclude_resources"):  # the control: Ray's default
            DataConfig(datasets_to_split=[])._resolve_execution_options("val")
    from ray.data.context import DataContext

    ctx = DataContext.get_current().execution_options
    assert (ours.resource_limits, ours.preserve_order, ours.verbose_progress) == \
        (ctx.resource_limits, ctx.preserve_order, ctx.verbose_progress)


def test_runs_default_to_a_faster_controller_poll_and_no_preemption_watcher_unless_the_user_set_them(
        tmp_path, monkeypatch):
    for key in launch.RAY_TRAIN_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # a user who wants it
    _trainer(tmp_path)
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    propagated = get_env_vars_to_propagate()  # what Ray hands the controller and the workers
    assert propagated["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert propagated["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


UNPICKLE = """
import sys
import cloudpickle

cloudpickle.loads(sys.stdin.buffer.read())
print(sorted(m for m in ("open_clip", "transformers", "torchvision", "cliplab.models") if m in sys.modules))
"""


def test_the_train_function_ray_trains_controller_unpickles_imports_no_model_code(tmp_path):
    """Ray Train's controller, and a Tune trial's driver, unpickle the per-worker function by
    reference: its module must not import open_clip, transformers or torchvision (about 1.7 s of
    CPU on every run's start-up). The workers import them when the function runs."""
    import subprocess
    import sys

    import cloudpickle

    train_fn = _trainer(tmp_path).train_loop_per_worker
    assert train_fn.__module__ == "cliplab.train.launch"
    out = subprocess.run([sys.executable, "-c", UNPICKLE], input=cloudpickle.dumps(train_fn),
                         capture_output=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.decode().strip() == "[]", out.stdout
    assert callable(cloudpickle.loads(cloudpickle.dumps(train_fn)))


QUIET_DRIVER = """
import sys, warnings
import ray
from cliplab.ray_connect import init_ray

init_ray(sys.argv[1])

def ingest_warnings():  # what Ray Train's state export calls in every run's controller
    from ray.train import DataConfig
    with warnings.catch_warnings(record=True) as seen:
        DataConfig.default_ingest_options()
    return [str(w.message) for w in seen]

control = ray.remote(ingest_warnings).options(runtime_env={"env_vars": {"PYTHONWARNINGS": "default"}})
print("OURS", ray.get(ray.remote(ingest_warnings).remote()))
print("CONTROL", ray.get(control.remote()))
"""


@pytest.mark.ray
def test_ray_processes_of_a_cliplab_driver_do_not_log_rays_own_exclude_resources_warning(ray_cluster):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", QUIET_DRIVER, ray_cluster.address], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "default::ResourceWarning"})
    assert run.returncode == 0, run.stderr[-3000:]
    ours = next(line for line in run.stdout.splitlines() if line.startswith("OURS"))
    control = next(line for line in run.stdout.splitlines() if line.startswith("CONTROL"))
    assert ours == "OURS []" and "exclude_resources" in control, (ours, control)


STATE_LOOKUP = """
import sys
import ray
from cliplab.ray_connect import init_ray

init_ray(sys.argv[1] if len(sys.argv) > 1 else None)


@ray.remote(num_cpus=0)
def lookup():  # what Ray Train's PlacementGroupCleaner asks, from inside the cluster, about a run's controller
    from ray.train.v2._internal.state.util import is_actor_alive
    try:
        return f"alive={bool(is_actor_alive('ff' * 16, timeout=10))}"
    except Exception as err:  # the cleaner's monitor thread dies on this, and the run's CPUs leak
        return f"{type(err).__name__}: {err}"


print("LOOKUP", ray.get(lookup.remote()))
"""


@pytest.mark.ray
def test_with_two_rays_on_the_machine_each_clusters_processes_find_their_own_state_api(ray_cluster, tmp_path):
    """Ray's state API, asked from inside a cluster, looks for Ray's processes on the machine when it
    is not told its address, and fails with "Found multiple active Ray instances" where there are
    two: then Ray Train's PlacementGroupCleaner dies, and a run whose controller is killed (a trial
    ASHA stops) keeps its CPUs. The fresh-clone `make test` ran beside a sweep and lost both CPUs of
    its session cluster that way, and its sweep tests starved."""
    import subprocess
    import sys

    from cliplab.services import RayService

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with RayService(tmp_path / "other", num_cpus=1):  # a second Ray on this machine
        joined = subprocess.run([sys.executable, "-c", STATE_LOOKUP, ray_cluster.address], env=env,
                                capture_output=True, text=True, timeout=300)
        local = subprocess.run([sys.executable, "-c", STATE_LOOKUP], env=env,  # init_ray starts a local Ray
                               capture_output=True, text=True, timeout=300)
    for name, run in (("a cluster cliplab's RayService started", joined), ("a local Ray init_ray started", local)):
        assert run.returncode == 0, run.stderr[-3000:]
        line = next(x for x in run.stdout.splitlines() if x.startswith("LOOKUP"))
        assert line == "LOOKUP alive=False", f"{name}: {line}"
