"""Live job events (GET /jobs/{id}/events) against uvicorn and a real worker: a job's stream from
submission to succeeded (order, ids, queue position while other jobs run, progress steps), resuming
with Last-Event-ID, and two api processes serving the same job's stream."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import submit
from testkeys import TestKeys

from ebca_client import Client
from ebca_client._sse import ServerSentEvent, SSEParser

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TERMINAL = {"succeeded", "failed", "canceled"}
#: Long enough that the jobs behind it are seen waiting in line (the tiny model on CPU).
BUSY = {"prompt": "a red circle", "steps": 200, "seed": 1, "width": 32, "height": 32}
SHORT = {"prompt": "a blue square", "steps": 12, "seed": 2, "width": 32, "height": 32}


def read_stream(
    url: str, job_id: str, last_id: str | None = None, timeout: float = 120
) -> tuple[list[ServerSentEvent], list[str]]:
    """Every event of one connection until the terminal one (or the server ends it), and the comments."""
    headers = TestKeys.header(TestKeys.alice) | ({"Last-Event-ID": last_id} if last_id else {})
    parser, found, comments = SSEParser(), [], []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            event = parser.feed(line)
            if event is not None:
                found.append(event)
                if event.event in TERMINAL:
                    break
    return found, comments


def data(event: ServerSentEvent) -> dict[str, Any]:
    return json.loads(event.data)


def in_background(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def result(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(timeout=180)
    assert not thread.is_alive(), "the stream did not end"
    if "error" in out:
        raise out["error"]
    return out["value"]


def stream_id(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@pytest.fixture(scope="module")
def streamed(events_stack: Stack) -> dict[str, Any]:
    """Three jobs on the one worker: the first runs, the two others wait; the third's stream is read
    from its submission to its end."""
    first = submit(events_stack, BUSY)
    events_stack.wait_job(first, until=lambda job: job["status"] == "running", timeout=60)
    submit(events_stack, BUSY)  # the second job: enough for a position tick to see the third one next
    third = submit(events_stack, SHORT)
    thread, out = in_background(read_stream, events_stack.api_url, third)
    found, comments = result(thread, out)
    return {"job_id": third, "events": found, "comments": comments}


def test_the_stream_follows_a_job_from_queued_to_succeeded(streamed: dict[str, Any]) -> None:
    found: list[ServerSentEvent] = streamed["events"]
    statuses = [e.event for e in found]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    first_running = statuses.index("running")
    assert set(statuses[:first_running]) == {"queued"} and set(statuses[first_running:-1]) == {"running"}
    assert all(data(e)["job_id"] == streamed["job_id"] for e in found)
    # The queue position while the other two jobs run: second in line, then next, then it starts.
    positions = [data(e).get("queue_position") for e in found[:first_running]]
    assert positions == [1, 0]
    # Progress: loading first, then denoising steps that only grow, up to the last one.
    running = [data(e)["progress"] for e in found[first_running:-1]]
    assert running[0]["stage"] == "loading"
    steps = [p["step"] for p in running if p["stage"] == "denoising"]
    assert steps and steps == sorted(steps) and steps[-1] == running[-1]["total"] == SHORT["steps"]
    final = data(found[-1])
    assert final["status"] == "succeeded" and len(final["result"]["images"]) == 1
    # Ids never go back; each stored event has its own (a position update repeats the last one).
    ids = [stream_id(e.id) for e in found]  # type: ignore[arg-type]
    assert ids == sorted(ids) and len(set(ids[first_running:])) == len(ids) - first_running
    assert ": keep-alive" in streamed["comments"]  # it waited in line for longer than the keep-alive


def test_last_event_id_resumes_with_what_was_missed(events_stack: Stack, streamed: dict[str, Any]) -> None:
    job_id = streamed["job_id"]
    everything, _ = read_stream(events_stack.api_url, job_id, last_id="0-0")
    assert everything[0].event == "queued" and everything[-1].event == "succeeded"
    stored = [e for e in streamed["events"] if e.event == "running"]
    cut = stored[1].id
    rest, _ = read_stream(events_stack.api_url, job_id, last_id=cut)
    assert [e.id for e in rest] == [e.id for e in everything if stream_id(e.id) > stream_id(cut)]  # type: ignore[arg-type]
    assert rest[-1].event == "succeeded"
    # Without Last-Event-ID a finished job's stream is its state now, then the end.
    now, _ = read_stream(events_stack.api_url, job_id)
    assert [e.event for e in now] == ["succeeded"] and now[0].id == everything[-1].id


def test_two_api_processes_serve_the_same_jobs_stream(events_stack: Stack) -> None:
    proc, second_url = events_stack.launch_api(name="api-replica")
    try:
        job_id = submit(events_stack, SHORT)
        thread, out = in_background(read_stream, events_stack.api_url, job_id, "0-0")
        # The SDK follows the same job through the other replica.
        with Client(second_url, api_key=TestKeys.alice) as client:
            via_sdk = list(client.get_job(job_id).events(timeout=120))
        via_first, _ = result(thread, out)
    finally:
        proc.stop()
    assert via_sdk[-1].status == "succeeded" and via_first[-1].event == "succeeded"
    # Both replicas read the one Redis stream: the events they sent after connecting are the same.
    first_ids = [e.id for e in via_first]
    sdk_ids = [e.id for e in via_sdk]
    assert sdk_ids[-1] == first_ids[-1]
    shared = [i for i in sdk_ids[1:] if i in first_ids]
    assert shared == sdk_ids[1:]  # every stored event the SDK saw, the other replica sent too
    assert via_sdk[0].id is not None
