"""`cliplab dashboard` over a sweep kept on S3 (the KubeRay manifests' storage): TensorBoard serves
every trial's scalars from a live local mirror of the sweep's event files, on a real SeaweedFS."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest


def _upload_events(s3, local: Path, prefix: str) -> None:
    for path in local.rglob("events.out.tfevents*"):
        s3.upload_file(str(path), "cliplab", f"{prefix}/{path.relative_to(local).as_posix()}")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_for(check, what: str, seconds: float = 60):
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as err:  # TensorBoard still starting
            last = err
        time.sleep(0.5)
    raise AssertionError(f"{what} within {seconds} s; last: {last}")


def _losses(url: str, run: str) -> list[tuple[int, float]]:
    query = urllib.parse.urlencode({"run": run, "tag": "train/loss"})
    return [(step, round(value, 6)) for _, step, value in _get(f"{url}/data/plugin/scalars/scalars?{query}")]


@pytest.mark.s3
def test_dashboard_mirrors_a_sweep_on_s3_and_follows_it_live(tmp_path, s3_server):
    from torch.utils.tensorboard import SummaryWriter

    s3 = s3_server.client()
    local = tmp_path / "written"
    writers = {name: SummaryWriter(str(local / name)) for name in ("trial_a", "trial_b")}
    for i, writer in enumerate(writers.values()):
        writer.add_scalar("train/loss", 1.0 + i, 1)
        writer.add_scalar("train/lr", 0.1, 1)
        writer.flush()
    s3.put_object(Bucket="cliplab", Key="dash/sweep-x/trial_a/checkpoint_000000/model.pt", Body=b"x" * 1000)
    _upload_events(s3, local, "dash/sweep-x")

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, **s3_server.env(), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "cliplab.cli.main", "dashboard", "sweep-x", "--storage-path",
                             "s3://cliplab/dash", "--refresh", "1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert "mirroring s3://cliplab/dash/sweep-x every 1 s" in first, first + proc.stderr.read()
        url = re.search(r"http://127\.0\.0\.1:\d+", first).group(0)
        def tags(*needed):
            served = _get(f"{url}/data/plugin/scalars/tags")
            return served if set(needed) <= set(served) else None

        runs = _wait_for(lambda: tags("trial_a", "trial_b"), "both trials served")
        assert set(runs["trial_a"]) == {"train/loss", "train/lr"}
        assert _losses(url, "trial_a") == [(1, 1.0)] and _losses(url, "trial_b") == [(1, 2.0)]
        mirrored = [p for p in scratch.glob("cliplab-dashboard-*/**/*") if p.is_file()]
        assert mirrored and all(p.name.startswith("events.out.tfevents") for p in mirrored), mirrored  # no checkpoint

        # the sweep goes on: trial_a's event file grows, trial_c appears
        writers["trial_a"].add_scalar("train/loss", 0.5, 2)
        writers["trial_a"].flush()
        writers["trial_c"] = SummaryWriter(str(local / "trial_c"))
        writers["trial_c"].add_scalar("train/loss", 3.0, 1)
        writers["trial_c"].flush()
        _upload_events(s3, local, "dash/sweep-x")
        _wait_for(lambda: _losses(url, "trial_a") == [(1, 1.0), (2, 0.5)], "trial_a's new step served")
        _wait_for(lambda: tags("trial_c"), "trial_c served")
        assert _losses(url, "trial_c") == [(1, 3.0)]
    finally:
        for writer in writers.values():
            writer.close()
        os.kill(proc.pid, signal.SIGTERM)  # as `kill` would: TensorBoard stops, the mirror is removed
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0
    assert not list(scratch.glob("cliplab-dashboard-*")), "the local mirror was left behind"


@pytest.mark.s3
@pytest.mark.parametrize("case", ["missing sweep", "wrong keys"])
def test_dashboard_on_s3_fails_fast_with_a_clear_line(tmp_path, s3_server, case):
    env = {**os.environ, **s3_server.env()}
    if case == "wrong keys":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "dashboard", "nope", "--storage-path",
                           "s3://cliplab/dash", "--port", "0"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert time.monotonic() - started < 20
    assert proc.returncode == 2, proc.stdout + proc.stderr
    expected = "no sweep at s3://cliplab/dash/nope" if case == "missing sweep" else "rejected the credentials"
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sync_appends_what_grew_rewrites_what_shrank_and_skips_other_files(tmp_path):
    from pyarrow import fs

    from cliplab.tune.dashboard import sync_event_files

    remote, local = tmp_path / "remote", tmp_path / "mirror"
    event = remote / "trial_a" / "events.out.tfevents.1.host"
    event.parent.mkdir(parents=True)
    event.write_bytes(b"first")
    (remote / "trial_a" / "result.json").write_text("{}")
    filesystem = fs.LocalFileSystem()
    assert sync_event_files(filesystem, str(remote), local) == 1
    copy = local / "trial_a" / "events.out.tfevents.1.host"
    assert copy.read_bytes() == b"first" and not (local / "trial_a" / "result.json").exists()
    inode = copy.stat().st_ino
    assert sync_event_files(filesystem, str(remote), local) == 0  # nothing new: nothing read

    with open(event, "ab") as f:
        f.write(b"+second")
    copy.write_bytes(b"FIRST")  # only the new bytes are fetched: the old ones stay as they were
    assert sync_event_files(filesystem, str(remote), local) == 1
    assert copy.read_bytes() == b"FIRST+second" and copy.stat().st_ino == inode  # same file: readers follow

    event.write_bytes(b"new")  # rewritten shorter: copied again, in place
    assert sync_event_files(filesystem, str(remote), local) == 1
    assert copy.read_bytes() == b"new" and copy.stat().st_ino == inode


def test_a_local_folder_wins_over_an_s3_storage_path(tmp_path):
    from cliplab.tune.dashboard import locate_sweep

    folder = tmp_path / "my-sweep"
    folder.mkdir()
    location = locate_sweep(str(folder), "s3://bucket/runs")
    assert not location.remote and location.uri == str(folder.resolve())
    assert locate_sweep("my-sweep", str(tmp_path)).uri == str(folder.resolve())
