"""A webhook receiver on loopback for tests: a ``ThreadingHTTPServer`` that records every POST (headers,
raw body, arrival time) and answers with the next status of ``plan`` (200 once it is used up)."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def documented_verify() -> Callable[[bytes, dict[str, str], str], Any]:
    """The ``verify`` function that docs/API.md shows under "Verifying a delivery", as written there."""
    text = API_DOC.read_text()
    section = text[text.index("Verifying a delivery") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "docs/API.md lost its verification example"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), str(API_DOC), "exec"), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


@dataclass
class Delivery:
    path: str
    #: Names in lower case.
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    def __init__(self, plan: list[int] | None = None) -> None:
        self.plan: deque[int] = deque(plan or [])
        self.seen: list[Delivery] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.seen.append(Delivery(self.path, dict(self.headers.items()), body, time.time()))
                    status = receiver.plan.popleft() if receiver.plan else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self.seen)
