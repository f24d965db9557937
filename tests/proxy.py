"""A TCP proxy the tests control: cut a worker's broker connection, then let it back.

Shared by the integration tests (``tests/integration/test_connection_loss.py``)
and the soak (``tests/soak``, its connection cuts).

`TcpProxy` listens on a free loopback port and forwards every connection to
an upstream ``host:port`` (a real broker), one thread per direction.
`TcpProxy.cut` closes every forwarded connection on both sides at once (the
broker sees its client go away, the client sees its socket closed) and
refuses new ones until `TcpProxy.restore`.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream`` until `cut` (see the module docstring)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                # A cut while the upstream connection was being made covers it too.
                refuse = self._cut or self._closed
                if not refuse:
                    self._sockets.update((client, upstream))
            if refuse:
                client.close()
                upstream.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def connections(self) -> int:
        """How many sockets (two per forwarded connection) are open now."""
        with self._lock:
            return len(self._sockets)

    def cut(self) -> None:
        """Close every forwarded connection now and refuse new ones until `restore`."""
        with self._lock:
            self._cut = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._drop(sock)

    def restore(self) -> None:
        """Accept and forward connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and close everything."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._thread.join(5)
