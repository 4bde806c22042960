"""A local ``mlflow server``: sqlite backend (or any SQLAlchemy URI, e.g. Postgres), local artifact
store served by the server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from cliplab.services.base import Service, venv_binary


class MlflowService(Service):
    """Runs and models persist under ``root`` (``mlflow.db`` and ``artifacts/``).

    ``artifacts_destination`` (``s3://bucket/prefix``) puts artifacts on S3 instead; the server
    reaches it with the AWS_* variables and ``MLFLOW_S3_ENDPOINT_URL`` of its environment
    (``env`` adds to it). Clients still upload and download through the server.

    ``backend_store_uri`` (``postgresql://user:password@host:port/db``, e.g. a
    :class:`~cliplab.services.postgres.PostgresService`'s ``uri``) replaces the sqlite file; it
    reaches the server as ``MLFLOW_BACKEND_STORE_URI``, so its password is not on the command line.
    """

    name = "MLflow server"

    def __init__(self, root: Path, port: int | None = None, *, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None, backend_store_uri: str | None = None) -> None:
        super().__init__(root, port)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination or str(self.root / "artifacts")
        self.extra_env = dict(env or {})

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        backend = [] if self.backend_store_uri else ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        return [venv_binary("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), *backend,
                "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                "--workers", "1", "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}"]

    def environment(self) -> dict[str, str]:
        # no job runner: its huey consumer processes slow the start and ignore SIGTERM
        return {**super().environment(), "MLFLOW_TELEMETRY_DISABLED": "1", "MLFLOW_DISABLE_TELEMETRY": "1",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.extra_env,
                **({"MLFLOW_BACKEND_STORE_URI": self.backend_store_uri} if self.backend_store_uri else {})}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 3.0) -> None:
        super().stop(timeout_s)  # its job-runner children ignore SIGTERM for a long while

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}
