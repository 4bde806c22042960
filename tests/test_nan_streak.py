"""A NaN streak ends the run once: no Ray restart, the MLflow run FAILED with its spool flushed,
and one line from `cliplab train` naming the step and the metrics that went non-finite. Also:
time-based checkpoints are decided by rank 0 alone, so ranks whose clocks disagree never split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_a_nan_streak_stops_the_run_once_marks_it_failed_and_names_the_step(tmp_path, s3_server, mlflow_server,
                                                                            ray_cluster):
    from mlflow import MlflowClient

    from cliplab.config import to_dict
    from cliplab.tracking.artifacts import write_config

    # lr 1e30: the first step blows the weights up, every later loss is NaN
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "optim.lr": 1e30, "optim.warmup_steps": 0, "train.max_steps": 12, "train.checkpoint_every": 100,
        "train.max_nonfinite_steps": 3, "train.max_failures": 2, "train.eval_every_epoch": False,
        "tracking.run_name": "nan-run", "tracking.experiment": "nan-streak", "tracking.spool_dir": str(tmp_path / "spool")})
    config = write_config(to_dict(cfg), tmp_path / "config")[0]
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", str(config), "--name", "nan"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cliplab: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert "run 'nan' stopped at step 1, without a restart: 3 non-finite losses in a row after step 1" in line, line
    assert "not finite: " in line and "train/loss=nan" in line, line
    assert "cliplab train --resume nan" in line

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("nan-streak")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'nan-run'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert "train/resumed_from_step" not in run.data.metrics  # Ray Train never restarted the workers
    assert "3 non-finite losses in a row after step 1" in run.data.tags["cliplab.stopped"]
    # the spool was flushed before the run ended: the good step and the skip counts are in MLflow
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "train/nonfinite_skipped")) == 2
    assert not any((tmp_path / "spool").rglob("*.jsonl")), list((tmp_path / "spool").rglob("*"))


# -- rank 0 decides time-based checkpoints --------------------------------------------------------------

class _Clock:
    """A rank's own clock: rank 0's runs 10 s a step, rank 1's 100 s a step."""

    def __init__(self, rank: int) -> None:
        self.now, self.tick = 0.0, 10.0 if rank == 0 else 100.0

    def __call__(self) -> float:
        return self.now


def _decide(rank: int, world: int, init: str, out: str) -> None:
    from cliplab.distributed import DistContext
    from cliplab.train.step import CheckpointTimer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        clock = _Clock(rank)
        timer = CheckpointTimer(every_steps=7, every_minutes=1.0, ctx=DistContext.current(), clock=clock)
        decisions, local = [], []
        for step in range(1, 15):
            clock.now += clock.tick
            local.append(step % 7 == 0 or clock.now - timer.last >= 60)  # what this rank alone would decide
            due = timer.due(step)
            decisions.append(due)
            if due:
                timer.done()
        torch.save({"decisions": decisions, "local": local}, out)
    finally:
        dist.destroy_process_group()


def test_ranks_whose_clocks_disagree_take_the_same_time_based_checkpoints(tmp_path):
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_decide, args=(r, 2, f"file://{tmp_path}/pg", outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [torch.load(o, weights_only=True) for o in outs]
    assert got[0]["local"] != got[1]["local"]  # left alone, the ranks would checkpoint at different steps
    assert got[0]["decisions"] == got[1]["decisions"]  # but every rank takes rank 0's decision
    # rank 0: 60 s pass every 6 steps (and step 7 and 14 by count)
    assert [s for s, d in enumerate(got[0]["decisions"], start=1) if d] == [6, 7, 13, 14]
