"""An in-process fake of the documented REST API for ``httpx.MockTransport`` unit tests.

It implements just enough of docs/API.md (keyed submits, job reads, cancel, image download) for the
client's retry, polling and download logic (it has no live events: a server older than them, so
``wait`` polls it), plus fault injection: each entry of ``faults`` is
consumed by one incoming request.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Fault:
    """``status``: answer this status without processing; ``drop_before``: the connection fails before
    the server sees the request; ``drop_after``: the server processes it, then the response is lost."""

    kind: str
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeAPI:
    faults: deque[Fault] = field(default_factory=deque)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    # Per job: records to hand out on successive GETs (the last one repeats).
    timelines: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    seen: list[httpx.Request] = field(default_factory=list)
    image: bytes = field(default_factory=png_bytes)
    corrupt_digest: bool = False
    # When set, every request must carry ``Authorization: Bearer <required_key>`` (else 401).
    required_key: str | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def async_transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.seen.append(request)
        fault = self.faults.popleft() if self.faults else None
        if fault and fault.kind == "drop_before":
            raise httpx.ConnectError("connection refused", request=request)
        if fault and fault.kind == "status":
            body = {"error": {"code": "unavailable", "message": "try later"}}
            return httpx.Response(fault.status, json=body, headers=fault.headers)
        if (
            self.required_key is not None
            and request.headers.get("authorization") != f"Bearer {self.required_key}"
        ):
            return self.error(401, "unauthorized", "missing or unknown API key")
        response = self.route(request)
        if fault and fault.kind == "drop_after":
            raise httpx.RemoteProtocolError("server disconnected without sending a response", request=request)
        return response

    # -- routes ----------------------------------------------------------------------------------------

    def route(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts[0] in ("generate", "edit"):
            return self.submit(request, parts[0])
        if parts[0] == "jobs" and len(parts) >= 2:
            job = self.jobs.get(parts[1])
            if job is None:
                return self.error(404, "not_found", f"no job {parts[1]}")
            if request.method == "DELETE":
                return self.cancel(job)
            if len(parts) == 4 and parts[2] == "images":
                return httpx.Response(200, content=self.image, headers={"content-type": "image/png"})
            if len(parts) > 2:  # e.g. /jobs/{id}/events: this fake is a server without live events
                return self.error(404, "not_found", "no route")
            timeline = self.timelines.get(job["id"])
            if timeline:
                job.update(timeline.popleft() if len(timeline) > 1 else timeline[0])
            return httpx.Response(200, json=job)
        if parts[0] == "models":
            return httpx.Response(200, json={"models": [{"id": "shapes", "default": True}]})
        return self.error(404, "not_found", "no route")

    def error(self, status: int, code: str, message: str, field_: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"code": code, "message": message}
        if field_:
            body["field"] = field_
        return httpx.Response(status, json={"error": body})

    def submit(self, request: httpx.Request, endpoint: str) -> httpx.Response:
        key = request.headers.get("idempotency-key")
        if key and key in self.keys:
            return httpx.Response(200, json=self.jobs[self.keys[key]])
        ctype = request.headers.get("content-type", "")
        body = json.loads(request.content) if ctype.startswith("application/json") else {"multipart": True}
        if body.get("prompt") == "":
            return self.error(422, "validation_error", "prompt must not be empty", "prompt")
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = {
            "id": job_id,
            "url": f"/jobs/{job_id}",
            "kind": endpoint,
            "mode": body.get("mode"),
            "status": "queued",
            "progress": {"stage": "queued", "step": 0, "total": 4},
            "queue_position": 0,
            "attempts": 0,
            "cancel_requested": False,
            "created_at": "2026-11-29T06:00:00Z",
            "request": body,
            "result": None,
            "error": None,
        }
        if key:
            self.keys[key] = job_id
        return httpx.Response(202, json=self.jobs[job_id])

    def cancel(self, job: dict[str, Any]) -> httpx.Response:
        if job["status"] in ("succeeded", "failed", "canceled"):
            return self.error(409, "conflict", f"job {job['id']} is already {job['status']}")
        job.update(status="canceled", queue_position=None)
        self.timelines.pop(job["id"], None)
        return httpx.Response(202, json=job)

    # -- helpers for tests -------------------------------------------------------------------------------

    def succeeded(self, job_id: str, images: int = 1) -> dict[str, Any]:
        digest = hashlib.sha256(self.image).hexdigest()
        if self.corrupt_digest:
            digest = "0" * 64
        return {
            "status": "succeeded",
            "queue_position": None,
            "progress": {"stage": "done", "step": 4, "total": 4},
            "result": {
                "images": [
                    {
                        "index": i,
                        "url": f"/jobs/{job_id}/images/{i}",
                        "seed": 7 + i,
                        "width": 8,
                        "height": 8,
                        "content_type": "image/png",
                        "sha256": digest,
                    }
                    for i in range(images)
                ]
            },
        }

    def script(self, job_id: str, *records: dict[str, Any]) -> None:
        self.timelines[job_id] = deque(records)

    def requests_to(self, method: str, path_prefix: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.method == method and r.url.path.startswith(path_prefix)]


def serve_cli_from(fake: FakeAPI, monkeypatch: Any, retry: Any) -> None:
    """Point the ``ebca`` command's ``Client`` at ``fake`` (the URL and key it is given still count)."""
    from ebca_client import Client, cli

    monkeypatch.setattr(
        cli,
        "Client",
        lambda url=None, api_key=None: Client(
            url or "http://api.test", api_key=api_key, retry=retry, transport=fake.transport()
        ),
    )
