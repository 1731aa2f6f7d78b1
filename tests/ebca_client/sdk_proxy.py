"""A loopback TCP proxy that loses answers: for the first ``drop`` connections it forwards the request
to the API, reads the API's complete response, and then closes the client's connection without sending
a byte of it, exactly what a connection dropped after the server processed the request looks like."""

from __future__ import annotations

import socket
import threading


def _read_http_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (what the API and httpx send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DroppingProxy:
    def __init__(self, upstream_port: int, drop: int = 1) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.drop = drop
        self.dropped_requests: list[bytes] = []
        self.swallowed_responses: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            dropping = len(self.dropped_requests) < self.drop
            if dropping:
                self.dropped_requests.append(b"")  # reserve the slot before reading
                slot = len(self.dropped_requests) - 1
        upstream = socket.create_connection(self.upstream)
        if not dropping:
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
            _pump(client, upstream)
            return
        request = _read_http_message(client)
        self.dropped_requests[slot] = request
        upstream.sendall(request)
        self.swallowed_responses.append(_read_http_message(upstream))
        upstream.close()
        # RST instead of FIN: the client sees its connection torn down mid-exchange.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()

    def close(self) -> None:
        self._listener.close()
