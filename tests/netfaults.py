"""A TCP proxy that cuts chosen requests: a real network fault in front of a real server."""

from __future__ import annotations

import re
import socket
import threading


class _Listener:
    """A TCP listener on 127.0.0.1 (a free port) whose accepted connections go to ``_handle``, each
    on its own thread; ``close`` stops accepting. The faults below differ only in ``_handle``."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_both(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


class CuttingProxy(_Listener):
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; a connection whose client bytes match
    the regular expression ``cut`` (e.g. ``rb"PUT /bucket/prefix"``) is closed right after those
    bytes are forwarded, so the server never gets the rest of the request and the client sees
    the connection drop."""

    def __init__(self, upstream_port: int, cut: bytes) -> None:
        self.upstream_port, self.cut, self.cuts = upstream_port, cut, 0
        super().__init__()

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if from_client and re.search(self.cut, data):
                    self.cuts += 1
                    break
        except OSError:
            pass
        _close_both(src, dst)


def _forward(src: socket.socket, dst: socket.socket, replace: tuple[bytes, bytes] | None = None) -> None:
    """Copy bytes one way until either side closes, then close both (``replace``: old, new bytes)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data.replace(*replace) if replace else data)
    except OSError:
        pass
    _close_both(src, dst)


class StallingServer(_Listener):
    """Accepts TCP connections on 127.0.0.1 and never answers: reads and discards what the client
    sends and keeps the socket open, like a hung endpoint behind a live load balancer."""

    def __init__(self) -> None:
        self.accepted = 0
        self._held: list[socket.socket] = []
        super().__init__()

    def _handle(self, client: socket.socket) -> None:
        self.accepted += 1
        self._held.append(client)
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        super().close()
        for s in self._held:
            s.close()


class FailingHttpProxy(_Listener):
    """Forwards 127.0.0.1:``port`` to an HTTP server on ``upstream_port``, except while ``failing``
    is set: then each request is read in full and answered ``status`` with ``body`` (MLflow's JSON
    error shape by default) and the connection is closed. ``answered`` counts those answers."""

    def __init__(self, upstream_port: int, status: int = 503, body: bytes | None = None,
                 content_type: str = "application/json") -> None:
        self.upstream_port, self.status = upstream_port, status
        self.body = body if body is not None else \
            b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "(sqlite3.OperationalError) database is locked"}'
        self.content_type = content_type
        self.failing = threading.Event()
        self.failing.set()
        self.answered = 0
        super().__init__()

    def _handle(self, client: socket.socket) -> None:
        if not self.failing.is_set():
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=_forward, args=(upstream, client), daemon=True).start()
            # the Host header names the upstream (mlflow server refuses unknown hosts: DNS rebinding)
            _forward(client, upstream, (f"Host: 127.0.0.1:{self.port}\r\n".encode(),
                                        f"Host: 127.0.0.1:{self.upstream_port}\r\n".encode()))
            return
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            while length and len(body) < int(length[1]):
                chunk = client.recv(65536)
                if not chunk:
                    break
                body += chunk
            reason = {400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error",
                      502: "Bad Gateway", 503: "Service Unavailable", 507: "Insufficient Storage"}.get(self.status, "Error")
            client.sendall(f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: {self.content_type}\r\n"
                           f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n".encode() + self.body)
            self.answered += 1
        except OSError:
            pass
        finally:
            client.close()
