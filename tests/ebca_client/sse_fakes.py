"""An in-process fake of the API's live events (docs/API.md, GET /jobs/{id}/events) on a real socket.

A ``ThreadingHTTPServer`` on loopback plays one scripted connection per events request (status,
headers, then chunks written with pauses, then close, or hold the connection open), so the client's
real transport meets real read timeouts, dropped connections and partial events. ``GET /jobs/{id}``
answers from ``records`` (successive GETs take the next one; the last one repeats).
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JOB_ID = "0123456789abcdef0123456789abcdef"


def event(
    status: str,
    event_id: str | None,
    *,
    step: int = 0,
    total: int = 3,
    stage: str | None = None,
    queue_position: int | None = None,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    job_id: str = JOB_ID,
    newline: str = "\n",
) -> str:
    """One event as the contract spells it (``id:``, ``event:`` = the status, ``data:`` JSON)."""
    data: dict[str, Any] = {
        "job_id": job_id,
        "status": status,
        "at": "2026-11-29T06:00:00Z",
        "progress": {"stage": stage or {"queued": "queued", "running": "denoising"}.get(status, "done"),
                     "step": step, "total": total},
    }  # fmt: skip
    if queue_position is not None:
        data["queue_position"] = queue_position
    if result is not None:
        data["result"] = result
    if error is not None:
        data["error"] = error
    lines = ([f"id: {event_id}"] if event_id is not None else []) + [
        f"event: {status}",
        f"data: {json.dumps(data)}",
    ]
    return newline.join(lines) + newline + newline


def record(status: str, **fields: Any) -> dict[str, Any]:
    """A job record as GET /jobs/{id} answers it."""
    base: dict[str, Any] = {
        "id": JOB_ID,
        "url": f"/jobs/{JOB_ID}",
        "kind": "generate",
        "status": status,
        "progress": {"stage": "queued", "step": 0, "total": 3},
        "queue_position": 0 if status == "queued" else None,
    }
    base.update(fields)
    return base


RESULT = {"images": [{"index": 0, "url": f"/jobs/{JOB_ID}/images/0", "seed": 7, "width": 8, "height": 8}]}


@dataclass
class Connection:
    """One answer to an events request. ``chunks`` are written in order; a float in their place is a
    pause in seconds. ``hold``: keep the connection open after the chunks until the client leaves.
    ``drop``: close the socket without answering at all."""

    chunks: list[str | float] = field(default_factory=list)
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    hold: bool = False
    drop: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    at: float


class EventServer:
    def __init__(self) -> None:
        self.connections: deque[Connection] = deque()
        self.records: deque[dict[str, Any]] = deque([record("queued")])
        self.stream_requests: list[Seen] = []
        self.job_requests: list[Seen] = []
        # Held connections that the client closed (the server noticed the end of its side).
        self.closed_by_client = 0
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                if self.path == f"/jobs/{JOB_ID}/events":
                    server.stream_requests.append(seen)
                    server.play(
                        self, server.connections.popleft() if server.connections else Connection(drop=True)
                    )
                elif self.path == f"/jobs/{JOB_ID}":
                    server.job_requests.append(seen)
                    rec = server.records.popleft() if len(server.records) > 1 else server.records[0]
                    self.answer(200, json.dumps(rec).encode(), "application/json")
                else:
                    body = json.dumps({"error": {"code": "not_found", "message": f"no job at {self.path}"}})
                    self.answer(404, body.encode(), "application/json")

            def answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def play(self, handler: BaseHTTPRequestHandler, conn: Connection) -> None:
        if conn.drop:
            handler.close_connection = True
            return
        handler.send_response(conn.status)
        handler.send_header("Content-Type", conn.content_type)
        handler.send_header("Cache-Control", "no-cache")
        for name, value in conn.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            for chunk in conn.chunks:
                if isinstance(chunk, float):
                    if self._stopping.wait(chunk):
                        return
                    continue
                handler.wfile.write(chunk.encode())
                handler.wfile.flush()
            while conn.hold and not self._stopping.is_set():
                readable, _, _ = select.select([handler.connection], [], [], 0.05)
                if readable and not handler.connection.recv(1):
                    self.closed_by_client += 1
                    return
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up while chunks were still being written (a client that stops reading
            # after the first event may close before the second chunk goes out).
            self.closed_by_client += 1
            return

    def script(self, *connections: Connection) -> None:
        self.connections.extend(connections)

    def close(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
