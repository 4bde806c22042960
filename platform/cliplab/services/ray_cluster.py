"""A local Ray head node (``ray start --head --block``) with its dashboard, on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from cliplab.errors import ServiceError
from cliplab.ray_connect import API_SERVER_ENV
from cliplab.services.base import Service, free_ports, port_open, venv_binary


class RayService(Service):
    """A Ray cluster of one node. Stopping it stops only this instance's processes."""

    name = "Ray head"

    def __init__(self, root: Path, port: int | None = None, dashboard_port: int | None = None,
                 num_cpus: int | None = None) -> None:
        super().__init__(root, port)
        self.dashboard_port = dashboard_port or free_ports(1, avoid=(self.port,))[0]
        self.num_cpus = num_cpus or os.cpu_count() or 1
        # Ray's unix socket paths must stay short: keep its temp dir under /tmp
        self.temp_dir = Path(tempfile.gettempdir()) / f"cliplab-ray-{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        flags = ("object-manager-port", "node-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        picked = free_ports(len(flags), avoid=(self.port, self.dashboard_port))
        ports = {f"--{flag}": str(port) for flag, port in zip(flags, picked, strict=True)}
        return [venv_binary("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.temp_dir),
                "--disable-usage-stats", *[x for kv in ports.items() for x in kv]]

    def start(self) -> RayService:
        ensure_auth_token()
        super().start()
        return self

    def environment(self) -> dict[str, str]:
        # API_SERVER_ENV: every process of this cluster finds its own dashboard for Ray's state API
        # (cliplab.ray_connect explains why); not in env(), so a driver that joins another
        # cluster later does not carry it
        return {**super().environment(), "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                "RAY_USAGE_STATS_ENABLED": "0", API_SERVER_ENV: self.dashboard_url}

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=1) as resp:
                return resp.status in (200, 401, 403)
        except urllib.error.HTTPError as err:
            return err.code in (401, 403)  # up, behind token auth
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        super().stop(timeout_s)
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def auth_token_available() -> bool:
    """Whether Ray can find a token: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
    ``~/.ray/auth_token`` (the places Ray's own loader looks, in its order)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidate = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    return candidate.is_file() and bool(candidate.read_text().strip())


def ensure_auth_token() -> None:
    """Local clusters use token auth, and ``ray start`` (unlike ``ray.init``) refuses to create the
    token, so a fresh machine has none: generate one with Ray's own ``ray get-auth-token --generate``
    (saved to ``~/.ray/auth_token``, where drivers and ``ray job`` read it). The token never reaches
    our logs: the command's output is discarded."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or auth_token_available():
        return
    result = subprocess.run([venv_binary("ray"), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    if result.returncode != 0 or not auth_token_available():
        raise ServiceError("could not create a Ray auth token with `ray get-auth-token --generate`: "
                           f"{result.stderr.strip()[-300:]}; create one yourself or set RAY_AUTH_TOKEN")
