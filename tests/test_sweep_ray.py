"""Sweeps on a real Ray cluster: ASHA, results, MLflow parent/child runs, dashboards, resume, promotion."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from ray import tune

from conftest import experiment

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow, pytest.mark.slow]


def _children(client: MlflowClient, experiment: str, parent_run_id: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_asha_stops_weak_trials_and_the_sweep_leaves_a_table_plots_and_parent_child_runs(
        tmp_path, s3_server, mlflow_server, ray_cluster):
    from cliplab.tune import ASHA, Sweep, run_sweep

    base = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.max_steps": None, "train.epochs": 2, "train.num_workers": 1, "train.checkpoint_every": 1000,
        "train.eval_every_epoch": True, "optim.warmup_steps": 0, "tracking.experiment": "asha"})
    # one learning trial first, then three that cannot learn (lr 1e-8): ASHA's first rung (epoch 1)
    # keeps the top half by train loss, so the later ones stop there
    sweep = Sweep(base=base, space={"optim.lr": tune.grid_search([3e-3, 1e-8, 1.1e-8, 1.2e-8])},
                  metric="train/loss", mode="min", scheduler=ASHA(grace_period=1, reduction_factor=2),
                  name="asha-test", register_as="asha-model")
    outcome = run_sweep(sweep)
    assert not outcome.errors
    assert len(outcome.rows) == 4
    stops = {r["optim.lr"]: r["stop_reason"] for r in outcome.rows}
    assert stops[3e-3] == "completed"
    assert any(s.startswith("stopped early at epoch 1") for s in stops.values()), stops

    md = outcome.files["md"].read_text()
    assert "| trial " in md and "stop reason" in md and md.count("| trial_") == 4
    assert outcome.files["csv"].read_text().splitlines()[0].startswith("trial,optim.lr,train/loss")
    for key in ("plot:optim.lr", "plot:curves"):
        assert outcome.files[key].stat().st_size > 5000  # a real PNG, not an empty canvas
    assert outcome.files["plot:curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["cliplab.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["space.optim.lr"].startswith("{'grid_search'")
    children = _children(client, "asha", outcome.parent_run_id)
    assert len(children) == 4 and {c.data.tags["sweep"] for c in children} == {"asha-test"}
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"results.md", "results.csv", "plots"} <= artifacts
    _check_tensorboard(base.storage_path, "asha-test", expected_trials=4,
                       screenshot=Path(base.storage_path) / "asha-test-tensorboard.png")

    # the best completed trial is registered in its own run; a first model becomes the champion
    assert outcome.best["optim.lr"] == 3e-3 and outcome.registered["alias"] == "champion"
    version = client.get_model_version_by_alias("asha-model", "champion")
    assert version.run_id == outcome.best["mlflow_run_id"]
    assert float(version.tags["metric.train/loss"]) == pytest.approx(outcome.best["train/loss"])


def test_each_trial_runs_the_epochs_of_its_own_data(tmp_path, s3_server, mlflow_server, ray_cluster):
    """Steps per epoch depend on the trial's data.train_fraction, batch and workers. They were
    computed once from the sweep's base, so a 30% trial ran the full data's epoch (repeating its
    samples to fill it) and a trial whose epoch was shorter than the base's was never "completed"."""
    from cliplab.config import with_overrides
    from cliplab.train.launch import steps_per_epoch
    from cliplab.tune import NoScheduler, Sweep, run_sweep

    base = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.max_steps": None, "train.epochs": 1, "train.num_workers": 1, "train.checkpoint_every": 1000,
        "data.batch_size": 32, "tracking.experiment": "trial-steps"})
    fractions = (0.3, 1.0)
    sweep = Sweep(base=base, space={"data.train_fraction": tune.grid_search(list(fractions))},
                  scheduler=NoScheduler(), name="trial-steps")
    outcome = run_sweep(sweep, register=False)
    assert not outcome.errors
    expected = {f: steps_per_epoch(with_overrides(base, {"data.train_fraction": f})) for f in fractions}
    assert 1 <= expected[0.3] < expected[1.0]
    got = {r["data.train_fraction"]: (r["step"], r["stop_reason"]) for r in outcome.rows}
    assert got == {f: (n, "completed") for f, n in expected.items()}


def _screenshot_has_curves(url: str, png: Path) -> None:
    """Headless Chromium (Debian's) renders the page; the chart area must hold curves in several
    colours (one per trial), not just an empty frame."""
    import shutil

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: `make setup` installs Debian's chromium for the browser checks")
    proc = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={png}", "--window-size=1400,1000", "--virtual-time-budget=20000", url],
                          capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]
    img = Image.open(png).convert("HSV")
    w, h = img.size
    chart = img.crop((int(w * 0.25), 130, w, h))  # right of the runs panel, below the header
    hues = [hue // 16 for hue, sat, val in chart.getdata() if sat > 90 and val > 60]
    buckets = {b for b in set(hues) if hues.count(b) > 40}
    assert len(hues) > 400 and len(buckets) >= 2, f"no trial curves in {png} ({len(hues)} coloured pixels)"


def _check_tensorboard(storage: str, sweep: str, expected_trials: int, screenshot: Path | None) -> None:
    """`cliplab dashboard SWEEP` serves every trial's scalars (Tune's event files) over HTTP, local
    or mirrored from S3; ``screenshot``: also render the page there and look for the curves."""
    import re
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "cliplab.cli.main", "dashboard", sweep, "--storage-path", storage,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline()).group(0)
        deadline, tags = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as resp:
                    tags = json.loads(resp.read())
                if len(tags) >= expected_trials:
                    break
            except OSError:
                pass
            time.sleep(1)
        trials = [run for run in tags if "trial_" in run]
        assert len(trials) == expected_trials, tags
        assert all(any(t.endswith("train/loss") for t in tags[run]) for run in trials)
        if screenshot:
            _screenshot_has_curves(f"{url}/#scalars", screenshot)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


SWEEP_FILE = '''"""Hypothesis: resuming keeps finished trials."""
from ray import tune
from cliplab.config import ExperimentConfig
from cliplab.tune import NoScheduler, Sweep
SWEEP = Sweep(base=ExperimentConfig(), space={"optim.lr": tune.grid_search([1e-3, 2e-3, 3e-3])},
              scheduler=NoScheduler(), name="resumable-sweep", register_as="resumable-sweep")
'''


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, s3_server, mlflow_server,
                                                                       ray_cluster):
    import signal
    import time

    from cliplab.config import flatten, to_dict

    path = tmp_path / "resumable.py"
    path.write_text(SWEEP_FILE)
    # the sweep's Tune state, trial checkpoints and parent-run marker on S3 (the KubeRay manifests' default)
    cfg = experiment(tmp_path, s3_server, mlflow_server, storage_path="s3://cliplab/sweeps",
                     **{"train.max_steps": 6, "train.checkpoint_every": 2, "tracking.experiment": "resume"})
    sets = []
    for key, value in flatten(to_dict(cfg)).items():
        if key.startswith(("data.", "train.", "tracking.", "eval.", "storage_path", "name")) and value is not None:
            sets += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, tuple)) else value}"]
    cmd = [sys.executable, "-m", "cliplab.cli.main", "sweep", str(path), *sets]
    client = MlflowClient(mlflow_server.uri)

    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
                             cwd=tmp_path)
    deadline = time.monotonic() + 400
    finished: list = []
    try:
        while time.monotonic() < deadline and first.poll() is None:
            exp = client.get_experiment_by_name("resume")
            runs = client.search_runs([exp.experiment_id], "tags.sweep = 'resumable-sweep'") if exp else []
            finished = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("cliplab.kind") != "sweep"]
            if finished:
                break
            time.sleep(0.5)
    finally:  # the driver dies mid-sweep; also when no trial finished, or its sweep starves the later tests
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert finished, "no trial finished before the deadline"
    done_trial = finished[0].data.tags["mlflow.runName"]

    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=os.environ.copy(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| trial_")]
    assert len(rows) == 3 and all("| 6 " in r and "completed" in r for r in rows), proc.stdout[-3000:]
    exp = client.get_experiment_by_name("resume")
    trial_runs = [r for r in client.search_runs([exp.experiment_id], "tags.sweep = 'resumable-sweep'")
                  if r.data.tags.get("cliplab.kind") != "sweep"]  # not the parent run
    names = [r.data.tags["mlflow.runName"] for r in trial_runs]
    assert names.count(done_trial) == 1, f"finished trial {done_trial} was run again: {names}"
    assert len(set(names)) == 3 and len(names) == 3  # the interrupted trial continued its own run
    parents = [r for r in client.search_runs([exp.experiment_id], "tags.sweep = 'resumable-sweep'")
               if r.data.tags.get("cliplab.kind") == "sweep"]
    assert len(parents) == 1, "the resumed sweep opened a second parent run"  # its marker is read back from S3
    best = client.get_model_version_by_alias("resumable-sweep", "champion")  # registered from the S3 checkpoint
    assert best.run_id in {r.info.run_id for r in trial_runs}
    s3 = s3_server.client()  # the results table and plots beside the Tune state in the bucket
    for name in ("results.csv", "results.md"):
        assert s3.head_object(Bucket="cliplab", Key=f"sweeps/resumable-sweep/{name}")["ContentLength"] > 0
    plots = s3.list_objects_v2(Bucket="cliplab", Prefix="sweeps/resumable-sweep/plots/").get("Contents", [])
    assert any(o["Key"].endswith(".png") for o in plots)
    _check_tensorboard("s3://cliplab/sweeps", "resumable-sweep", expected_trials=3, screenshot=None)  # mirrored


def _untrained_checkpoint(cfg, path):
    """A real cliplab checkpoint of ``cfg``'s model at step 1 (what a sweep registers)."""
    from cliplab.checkpoint import save_checkpoint
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective
    from cliplab.train.step import build_optimizer, cosine_with_warmup

    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    opt = build_optimizer(module, cfg.optim)
    return save_checkpoint(path, module, opt, cosine_with_warmup(opt, 1, 10), step=1, epoch=0, cfg=cfg)


def test_promotion_makes_champion_only_a_better_model(tmp_path, mlflow_server):
    from cliplab.config import ExperimentConfig, with_overrides
    from cliplab.tune import Sweep
    from cliplab.tune.promote import better, register_and_promote

    assert better(0.5, None, "max") and better(0.6, 0.5, "max") and not better(0.5, 0.5, "max")
    assert better(0.4, 0.5, "min") and not better(0.6, 0.5, "min")

    cfg = with_overrides(ExperimentConfig(), {"tracking.uri": mlflow_server.uri, "tracking.experiment": "promote"})
    ckpt = _untrained_checkpoint(cfg, tmp_path / "ckpt")
    sweep = Sweep(base=cfg, space={}, register_as="promotion-test", name="promo")
    client = MlflowClient(mlflow_server.uri)
    decisions = []
    for value in (0.5, 0.3, 0.7):
        reg = register_and_promote(sweep, {"trial": "t", "checkpoint_path": str(ckpt),
                                           "val/image_to_text_R1": value})
        decisions.append((reg["version"], reg["alias"]))
        assert "champion" in reg["decision"] or "challenger" in reg["decision"]
    assert decisions == [(1, "champion"), (2, "challenger"), (3, "champion")]
    assert client.get_model_version_by_alias("promotion-test", "champion").version == "3"
    assert client.get_model_version_by_alias("promotion-test", "challenger").version == "2"
    assert client.get_model_version("promotion-test", "3").tags["metric.val/image_to_text_R1"] == "0.7"

    listing = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "registry", "list", "promotion-test",
                              "--tracking-uri", mlflow_server.uri], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "| 2       | challenger" in listing.stdout, listing.stdout + listing.stderr
    promote = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "registry", "promote", "promotion-test", "2",
                              "--tracking-uri", mlflow_server.uri], capture_output=True, text=True, timeout=120)
    assert promote.returncode == 0 and client.get_model_version_by_alias("promotion-test", "champion").version == "2"


def test_an_mlflow_down_at_registration_keeps_the_results_and_says_how_to_register(tmp_path, monkeypatch):
    """The sweep's trials are done when it registers the best one: an MLflow that is down then
    raised a bare MlflowException out of `cliplab sweep` and the demo, after the training."""
    from cliplab.config import ExperimentConfig, with_overrides
    from cliplab.services.base import free_ports
    from cliplab.tune import Sweep
    from cliplab.tune.report import outcome_text
    from cliplab.tune.sweep import SweepOutcome, register_best

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    cfg = with_overrides(ExperimentConfig(), {"tracking.uri": down})
    ckpt = _untrained_checkpoint(cfg, tmp_path / "ckpt")
    sweep = Sweep(base=cfg, space={}, register_as="m", name="s")
    best = {"trial": "trial_1", "checkpoint_path": str(ckpt), "val/image_to_text_R1": 0.5}
    registered, error = register_best(sweep, best)
    assert registered is None and error.startswith("registering the best trial trial_1 as 'm' failed: ")
    assert "Connection refused" in error or "Max retries exceeded" in error, error  # MLflow's failure, not ours
    assert str(ckpt) in error and "--resume" in error
    text = outcome_text(sweep, SweepOutcome([], best, registration_error=error))
    assert f"registration failed: {error}" in text.splitlines()


def test_optuna_proposes_every_trial_and_learns_each_result_on_ray_tune(tmp_path, ray_cluster, monkeypatch):
    """Optuna() on a real Tune run: the trials' values come from Optuna's study, every finished
    trial's metric reaches it, and reports without the metric (cliplab's pre-eval reports) are
    skipped instead of failing the sweep."""
    from cliplab.tune import Optuna

    def _quadratic(config):  # defined here: Ray pickles it by value (the tests folder is not on the workers' path)
        tune.report({"step": 0})  # before any eval, as a cliplab trial's checkpoint and log reports
        tune.report({"step": 1, "loss": (config["x"] - 2.0) ** 2})

    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # as run_sweep sets it
    searcher = Optuna(seed=0).build("loss", "min")
    grid = tune.Tuner(
        tune.with_resources(_quadratic, {"cpu": 0.1}),
        param_space={"x": tune.uniform(-10.0, 10.0)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=6, max_concurrent_trials=1,
                                    search_alg=searcher),
        run_config=tune.RunConfig(name="optuna", storage_path=str(tmp_path)),
    ).fit()
    assert not grid.errors and len(grid) == 6
    study = searcher._ot_study
    told = sorted((t.params["x"], t.value) for t in study.trials if t.state.name == "COMPLETE")
    tuned = sorted((r.config["x"], r.metrics["loss"]) for r in grid)
    assert len(told) == 6
    np.testing.assert_allclose(told, tuned, rtol=1e-12)
    assert min(v for _, v in told) == grid.get_best_result().metrics["loss"]


def test_optuna_refuses_a_grid_before_ray(tmp_path):
    from cliplab.errors import ConfigError
    from cliplab.tune import load_sweep

    path = tmp_path / "optuna_grid.py"
    path.write_text('''"""Hypothesis: a grid is not Optuna's to search."""
from ray import tune
from cliplab.config import ExperimentConfig
from cliplab.tune import Optuna, Sweep
SWEEP = Sweep(base=ExperimentConfig(), space={"optim.lr": tune.grid_search([1e-3, 2e-3])}, search=Optuna())
''')
    with pytest.raises(ConfigError, match="search space 'optim.lr': Optuna samples distributions"):
        load_sweep(path, ["data.train=x"])
