"""Resume on changed data: a checkpoint's data position is only meaningful for the plan it was
taken in, so the checkpoint records the shard list and the plan's data.* keys; resuming on other
data is a one-line error naming the change, unless --allow-data-change is given."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import experiment

REPO = Path(__file__).resolve().parents[1]


def _fp(shards, counts, **config):
    return {"shards": shards, "counts": counts, "sources": [["train", 1.0]],
            "config": {"seed": 0, "shuffle_files": True, "shuffle_window": 1000, "batch_size": 16, **config}}


def test_data_changes_name_each_kind_of_change():
    from cliplab.data.plan import data_changes

    base = _fp(["a.tar", "b.tar", "c.tar"], [100, 100, 50])
    assert data_changes(base, base) == []
    assert data_changes(base, _fp(["a.tar", "b.tar"], [100, 100])) == ["1 shard(s) removed (c.tar)"]
    assert data_changes(base, _fp(["a.tar", "b.tar", "c.tar", "d.tar"], [100, 100, 50, 7])) == \
        ["1 shard(s) added (d.tar)"]
    assert data_changes(base, _fp(["a.tar", "b.tar", "c.tar"], [100, 100, 49])) == \
        ["1 shard(s) changed (c.tar 50 → 49 samples)"]
    assert data_changes(base, _fp(["b.tar", "a.tar", "c.tar"], [100, 100, 50])) == ["the shard order changed"]
    assert data_changes(base, _fp(["a.tar", "b.tar", "c.tar"], [100, 100, 50], seed=1, batch_size=32)) == \
        ["data.seed 0 → 1", "data.batch_size 16 → 32"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "cliplab.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cliplab: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_resume_on_changed_shards_is_refused_unless_allowed(tmp_path, s3_server, mlflow_server, ray_cluster,
                                                           emoji_corpus):
    from cliplab.checkpoint import latest_checkpoint, load_trainer_state
    from cliplab.errors import TrainingError
    from cliplab.train import launch

    shards = tmp_path / "shards"
    shutil.copytree(emoji_corpus[0] / "train", shards)
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert len(names) >= 3
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "data.train": str(shards), "train.num_workers": 1, "train.max_steps": 2, "train.checkpoint_every": 100,
        "train.eval_every_epoch": False})
    first = launch.run_training(cfg, name="changing")
    assert first.error is None and first.metrics["step"] == 2
    saved = load_trainer_state(latest_checkpoint(Path(cfg.storage_path) / "changing"))["data_fingerprint"]
    assert [Path(s).name for s in saved["shards"]] == names and saved["config"]["seed"] == 0

    # a shard removed: `cliplab train --resume` refuses in the driver, naming it
    removed = shards / names[-1]
    shutil.move(removed, tmp_path / removed.name)
    resume = ("train", "--resume", "changing", "--storage-path", cfg.storage_path, "--set", "train.max_steps=4")
    line = _error_line(_cli(*resume))
    assert f"the training data changed since checkpoint {Path(cfg.storage_path).resolve()}/changing/checkpoint_" in line
    assert f"(step 2): 1 shard(s) removed ({removed})" in line and "--allow-data-change" in line, line

    # a shard added, and a plan key changed
    shutil.move(tmp_path / removed.name, removed)
    shutil.copyfile(shards / names[0], shards / "train-extra.tar")
    line = _error_line(_cli(*resume, "--set", "data.seed=7"))
    assert f"data.seed 0 → 7; 1 shard(s) added ({shards / 'train-extra.tar'})" in line, line

    # a restart (or a resumed sweep trial) checks in the worker: it stops without a Ray restart
    launch._INDEXES.clear()  # this process indexed the shards before the change
    prep = launch.preflight(cfg)
    trainer = launch.build_trainer(prep, name="changing", datasets=launch.build_datasets(prep),
                                   steps=launch.steps_per_epoch(cfg))
    with pytest.raises(TrainingError, match=r"stopped at step 2, without a restart: the training data changed since "
                                            r"checkpoint .*1 shard\(s\) added \(.*train-extra.tar\)"):
        launch.raise_if_stopped(trainer.fit(), "changing", cfg)

    # with the flag it goes on, from the saved position
    proc = _cli(*resume, "--allow-data-change")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = load_trainer_state(latest_checkpoint(Path(cfg.storage_path) / "changing"))
    assert final["step"] == 4 and any(s.endswith("train-extra.tar") for s in final["data_fingerprint"]["shards"])
