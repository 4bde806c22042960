"""A checkpoint on a local (or NFS) storage_path counts only when every file arrived whole: the
worker is SIGKILLed while Ray copies a large file of the checkpoint, and the torn folder is never
taken for complete, by cliplab's latest-checkpoint logic nor by Ray Train's resume."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

PAD = 1 << 30  # a 1 GiB model.pt: the copy takes long enough to be cut


def _train_fn(config):
    """Checkpoint at step 1 (small), then at step 2 with a huge model.pt, through cliplab's
    checkpoint_upload_fn; a thread SIGKILLs this worker once that model.pt is half copied."""
    import json
    import os
    import signal
    import tempfile
    import threading
    import time
    from pathlib import Path

    import ray.train

    from cliplab.checkpoint import MARKER
    from cliplab.train.persist import persist_checkpoint as _persist_checkpoint

    resumed = ray.train.get_checkpoint()
    if config.get("resume_only"):  # the second fit: what did Ray Train resume from?
        if resumed is None:
            return -1
        with resumed.as_directory() as d:
            return json.loads((Path(d) / MARKER).read_text())["step"]
    run = Path(config["run_dir"])

    def kill_mid_copy():
        while True:
            for f in run.glob("checkpoint_*/model.pt"):
                if (1 << 20) < f.stat().st_size < config["pad"]:
                    Path(config["killed"]).write_text(str(f.stat().st_size))
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    for step, size in ((1, 10), (2, config["pad"])):
        if step == 2:
            snapshot = run / "checkpoint_manager_snapshot.json"  # Ray Train registered step 1: it can resume it
            while not (snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text()):
                time.sleep(0.1)
            threading.Thread(target=kill_mid_copy, daemon=True).start()
        with tempfile.TemporaryDirectory() as tmp:
            with open(Path(tmp) / "model.pt", "wb") as f:
                f.truncate(size)  # sparse here, written in full by the copy
            (Path(tmp) / "trainer.pt").write_bytes(b"state")
            (Path(tmp) / MARKER).write_text(json.dumps({"step": step, "epoch": 0}))
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_fn=_persist_checkpoint)
    return None


def _trainer(storage: Path, config: dict):
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tests folder is not on the workers' path

    return TorchTrainer(_train_fn, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                        run_config=RunConfig(name="torn", storage_path=str(storage),
                                             failure_config=FailureConfig(max_failures=0)))


def test_a_worker_killed_mid_copy_leaves_no_checkpoint_that_passes_for_complete(tmp_path, ray_cluster):
    from ray.train import TrainingFailedError

    from cliplab.checkpoint import MARKER, latest_checkpoint, latest_in_storage

    storage = tmp_path / "runs"
    run = storage / "torn"
    config = {"run_dir": str(run), "pad": PAD, "killed": str(tmp_path / "killed")}
    with pytest.raises(TrainingFailedError):
        _trainer(storage, config).fit()
    assert (tmp_path / "killed").is_file(), "the copy ended before the worker could be killed"
    folders = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    torn = [p for p in folders if (p / "model.pt").is_file() and (p / "model.pt").stat().st_size != 10]
    assert len(torn) == 1 and (torn[0] / "model.pt").stat().st_size < PAD  # cut mid-copy ...
    assert not (torn[0] / MARKER).exists()  # ... and not marked complete
    complete = latest_checkpoint(run)
    assert complete is not None and json.loads((complete / MARKER).read_text())["step"] == 1
    assert latest_in_storage(str(run))[1] == str(complete)  # what `cliplab train --resume` and eval pick
    # Ray Train's own resume of the run picks the step-1 checkpoint too
    assert _trainer(storage, {**config, "resume_only": True}).fit().return_value == 1
    for p in folders:  # 1 GiB: do not leave it behind
        (p / "model.pt").unlink(missing_ok=True)
