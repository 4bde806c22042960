"""A subprocess-backed local service: start, wait for health, stop cleanly.

Services bind 127.0.0.1 only, run in their own process group (so stopping them stops their
children too) and write their output to ``ROOT/service.log``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cliplab.errors import ServiceError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, none of them in ``avoid`` (ports already
    promised to the same service). Every socket stays bound until all are picked, so the kernel
    cannot hand out one port twice, as ``n`` calls of :func:`free_port` may."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n + len(avoid))]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [p for p in (s.getsockname()[1] for s in socks) if p not in avoid][:n]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def venv_binary(name: str) -> str:
    """``name`` next to this Python (the venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"'{name}' not found next to {sys.executable} or on PATH; run `make setup`")
    return found


class Service:
    """Subclasses set ``name`` and implement :meth:`command` and :meth:`healthy`."""

    name = "service"
    start_timeout_s = 60.0

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self._auto_port = not port
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    # to override -----------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def popen_options(self) -> dict:
        """Extra ``subprocess.Popen`` arguments for the service's process (``user=``, ``group=``)."""
        return {}

    def check_ready(self) -> None:
        """Called once the service is healthy: raise :class:`ServiceError` if it answers but
        cannot do its job (the service is then stopped)."""

    # lifecycle ---------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.root / "service.log"

    def start(self) -> Service:
        """Launch and wait until healthy. A service on an automatically picked port is retried on
        a fresh port when it dies at once (another process may have taken the port meanwhile)."""
        if self.proc is not None:
            return self
        if port_open(self.port):
            raise ServiceError(f"{self.name}: port {self.port} on 127.0.0.1 is already in use; "
                               "pick another with --port (0 = any free port)")
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(3 if self._auto_port else 1):
            if attempt:
                self.port = free_port()
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
            self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                         cwd=self.root, env=self.environment(), start_new_session=True,
                                         **self.popen_options())
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    self.stop()  # reap any children it left
                    break
                if self.healthy():
                    try:
                        self.check_ready()
                    except BaseException:
                        self.stop()
                        raise
                    return self
                time.sleep(0.25)
            else:
                self.stop()
                raise ServiceError(f"{self.name} did not become healthy within {self.start_timeout_s:.0f} s: "
                                   f"{self._last_log_line()} (log: {self.log_path})")
        raise ServiceError(f"{self.name} exited with code {code} while starting: "
                           f"{self._last_log_line()} (log: {self.log_path})")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``, and wait until
        every process of the group is gone. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
            except ProcessLookupError:
                break
            proc.poll()
            time.sleep(0.1)
        self._cleanup()

    def _cleanup(self) -> None:
        self.proc = None
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "empty log"

    def wait(self) -> None:
        """Block until Ctrl-C or until the service exits; then stop it."""
        try:
            while self.proc is not None and self.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
