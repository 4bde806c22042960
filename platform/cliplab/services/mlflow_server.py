"""A local ``mlflow server``: sqlite backend, local artifact store served by the server."""

from __future__ import annotations

import urllib.request

from cliplab.services.base import Service, venv_binary


class MlflowService(Service):
    """Runs and models persist under ``root`` (``mlflow.db`` and ``artifacts/``)."""

    name = "MLflow server"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [venv_binary("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
                "--workers", "1", "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}"]

    def environment(self) -> dict[str, str]:
        # no job runner: its huey consumer processes slow the start and ignore SIGTERM
        return {**super().environment(), "MLFLOW_TELEMETRY_DISABLED": "1", "MLFLOW_DISABLE_TELEMETRY": "1",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

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
