"""Faults caused the way a cluster causes them, for the fault-tolerance tests.

:class:`Forwarder` is a TCP forwarder on 127.0.0.1 in front of a real server (the session's S3 test
server, its MLflow server). ``stop()`` closes the listening socket and every open connection, as a
gateway restart or a network partition does; ``start()`` listens again on the same port, so a
client configured with the forwarder's address sees the service go away and come back.
"""
from __future__ import annotations

import socket
import threading
from typing import Optional


class Forwarder:
    """``127.0.0.1:<port>`` → ``target``; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, target_host: str, target_port: int, port: int = 0):
        self.target = (target_host, int(target_port))
        self.port = int(port)
        self._listener: Optional[socket.socket] = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def to_url(cls, url: str) -> "Forwarder":
        """A started forwarder in front of the server at ``http://host:port``."""
        hostport = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        host, port = hostport.rsplit(":", 1)
        return cls(host, int(port)).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Forwarder":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut every open one (the clients see resets)."""
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not sock:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> "Forwarder":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
