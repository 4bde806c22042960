"""A TCP proxy that cuts chosen requests: a real network fault in front of a real server."""

from __future__ import annotations

import re
import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; a connection whose client bytes match
    the regular expression ``cut`` (e.g. ``rb"PUT /bucket/prefix"``) is closed right after those
    bytes are forwarded, so the server never gets the rest of the request and the client sees
    the connection drop."""

    def __init__(self, upstream_port: int, cut: bytes) -> None:
        self.upstream_port, self.cut, self.cuts = upstream_port, cut, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if from_client and re.search(self.cut, data):
                    self.cuts += 1
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
