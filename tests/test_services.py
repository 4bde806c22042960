"""Embedded services: start, health, stop, and a second instance beside the first."""

import json
import os
import subprocess
import sys

import boto3
import pytest
from botocore.exceptions import ClientError

from cliplab.errors import ServiceError
from cliplab.services import MlflowService, RayService, S3Service
from cliplab.services.base import port_open


def _pids_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.s3
def test_s3_two_instances_credentials_and_clean_stop(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env().items():  # the first server's keys in the caller's environment
        monkeypatch.setenv(key, value)
    with S3Service(tmp_path / "second", buckets=("other",), access_key="k2", secret_key="s2") as second:
        assert second.port != s3_server.port and second.healthy() and s3_server.healthy()
        client = second.client()
        client.put_object(Bucket="other", Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket="other", Key="a/b.txt")["Body"].read() == b"hello"
        wrong = boto3.client("s3", endpoint_url=second.endpoint, aws_access_key_id="k2",
                             aws_secret_access_key="wrong", region_name="us-east-1")
        with pytest.raises(ClientError):
            wrong.list_buckets()
        other = boto3.client("s3", endpoint_url=second.endpoint, aws_access_key_id=s3_server.access_key,
                             aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
        with pytest.raises(ClientError):  # weed mini accepts the keys it finds in its environment
            other.list_buckets()
        pid, port = second.proc.pid, second.port
    assert not _pids_alive(pid)
    assert not port_open(port)
    assert s3_server.healthy()  # the first instance is untouched


@pytest.mark.mlflow
def test_mlflow_logs_and_a_second_instance_keeps_its_own_store(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("services-test")
    run = client.create_run(exp).info.run_id
    client.log_metric(run, "m", 1.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run, "m")] == [(3, 1.5)]

    root = tmp_path / "second"
    with MlflowService(root) as second:
        assert second.port != mlflow_server.port
        assert MlflowClient(second.uri).get_experiment_by_name("services-test") is None
        MlflowClient(second.uri).create_experiment("persisted")
        pid = second.proc.pid
    assert not _pids_alive(pid) and not second.healthy()
    with MlflowService(root) as again:  # restarting on the same directory keeps the store
        assert MlflowClient(again.uri).get_experiment_by_name("persisted") is not None


@pytest.mark.ray
def test_ray_head_runs_a_task_from_another_process_and_stops(tmp_path):
    with RayService(tmp_path / "ray", num_cpus=1) as svc:
        code = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 6 * 7).remote()))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **svc.env()})
        assert proc.stdout.strip().endswith("42"), proc.stderr[-2000:]
        pid, port = svc.proc.pid, svc.port
    assert not _pids_alive(pid) and not port_open(port)


@pytest.mark.s3
def test_an_s3_server_that_cannot_store_objects_fails_at_start_with_the_reason(tmp_path):
    """SeaweedFS answers listings before it can store anything (with no free volume it never can);
    start() stores, reads back and deletes a probe object, and stops the server when that fails."""

    class ReadOnly(S3Service):  # its only identity may read and list but not write
        def command(self):
            cmd = super().command()
            config = self.root / "s3-identities.json"
            identities = json.loads(config.read_text())
            identities["identities"][0]["actions"] = ["Read", "List"]
            config.write_text(json.dumps(identities))
            return cmd

    server = ReadOnly(tmp_path / "ro")
    try:
        with pytest.raises(ServiceError, match=r"cannot store objects in bucket 'cliplab': .*AccessDenied.*MiB free"):
            server.start()
        assert server.proc is None and not port_open(server.port)
    finally:
        server.stop()  # only matters when the test fails: no weed left running


def test_the_s3_start_error_says_how_much_disk_to_free(tmp_path, monkeypatch):
    """Measured with a loop-mounted 100 GiB ext4: 900 MiB free gives SeaweedFS no volume (under
    1% of the disk), 1,300 MiB gives ten. The note names the shortfall, and only when there is one."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    server = S3Service(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(100 * 2**30, 0, 900 * 2**20))
    assert server._disk_note().endswith("has 900 MiB free; SeaweedFS stores nothing with less than 1% of the disk "
                                        "(1,024 MiB) free and needs 128 MiB per volume: free at least 252 MiB, "
                                        "or start it on another disk.")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(100 * 2**30, 0, 1300 * 2**20))
    assert server._disk_note().endswith("has 1,300 MiB free.")


def test_free_ports_are_distinct_and_avoid_the_given_ones():
    from cliplab.services.base import free_ports

    taken = free_ports(1)[0]
    ports = free_ports(40, avoid=(taken,))
    assert len(ports) == len(set(ports)) == 40 and taken not in ports


def test_port_in_use_is_a_clear_error(s3_server, tmp_path):
    with pytest.raises(ServiceError, match=f"port {s3_server.port} on 127.0.0.1 is already in use"):
        MlflowService(tmp_path, port=s3_server.port).start()


def test_a_service_that_dies_at_start_is_a_clear_error_after_retries(tmp_path):
    from cliplab.services import Service

    class Dies(Service):
        name = "dying service"

        def command(self):
            return [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]

        def healthy(self):
            return False

    svc = Dies(tmp_path)
    with pytest.raises(ServiceError, match=r"dying service exited with code 3 while starting: boom: bad flag"):
        svc.start()
    assert svc.proc is None
    assert (tmp_path / "service.log").read_text().count("boom") == 3  # auto port: tried 3 times


def test_a_machine_without_a_ray_token_gets_one_before_ray_start(tmp_path, monkeypatch):
    """`ray start --head` refuses to run under token auth without a token (a fresh machine has none);
    the service creates it where Ray's drivers and job CLI look, and keeps an existing one."""
    from cliplab.services.ray_cluster import auth_token_available, ensure_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert not auth_token_available()
    ensure_auth_token()
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32 and auth_token_available()
    ensure_auth_token()  # idempotent: the same token, not a new one
    assert (tmp_path / ".ray" / "auth_token").read_text().strip() == token
