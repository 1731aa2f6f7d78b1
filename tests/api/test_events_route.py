"""GET /jobs/{id}/events in process (TestClient) on the real Redis: the event-stream format, the first
event, Last-Event-ID, queue positions, keep-alives, ownership. A background thread plays the worker
through the job store; the TestClient returns once the stream has ended (at the terminal event)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from testkeys import TestKeys

from api.main import create_app
from ebca_client._sse import ServerSentEvent, SSEParser
from ebca_common.jobs import JobStatus
from ebca_common.settings import Settings
from ebca_common.store import JobStore

ALICE = TestKeys.header(TestKeys.alice)


class NoQueue:
    def publish(self, job_id: str) -> None:
        pass


@pytest.fixture
def settings(store_settings: Settings) -> Settings:
    return store_settings.model_copy(update={"events_keepalive_seconds": 0.3})


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    # One TestClient context: one event loop for the asyncio Redis client of every request.
    with TestClient(create_app(settings, store=store, publisher=NoQueue()), headers=ALICE) as c:
        yield c


def submit(client: TestClient) -> str:
    response = client.post("/generate", json={"prompt": "a cat", "steps": 3})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def parse(text: str) -> tuple[list[ServerSentEvent], list[str]]:
    """The events of a stream (the SDK's parser) and its comment lines."""
    parser = SSEParser()
    found = [e for line in text.split("\n") if (e := parser.feed(line)) is not None]
    return found, [line for line in text.split("\n") if line.startswith(":")]


def later(delay: float, *actions: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        for action in actions:
            action()
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_job(store: JobStore, job_id: str, steps: int = 3) -> list[Callable[[], Any]]:
    store.heartbeat("w:1")
    actions: list[Callable[[], Any]] = [lambda: store.begin(job_id, "w:1")]
    actions += [lambda s=s: store.progress(job_id, "w:1", "denoising", s, steps) for s in range(1, steps + 1)]
    actions.append(lambda: store.finish(job_id, JobStatus.SUCCEEDED, lease="w:1", result={"images": []}))
    return actions


def test_a_job_from_queued_to_succeeded(client: TestClient, store: JobStore) -> None:
    job_id = submit(client)
    thread = later(1.0, *run_job(store, job_id))  # after the stream has opened
    response = client.get(f"/jobs/{job_id}/events")
    thread.join()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    found, comments = parse(response.text)
    statuses = [e.event for e in found]
    assert statuses[:2] == ["queued", "running"] and statuses[-1] == "succeeded"
    assert set(statuses[1:-1]) == {"running"}
    first = json.loads(found[0].data)
    assert first["queue_position"] == 0 and first["job_id"] == job_id and first["status"] == "queued"
    # Loading, the first step, ..., the last (the store's tests pin which steps the throttle drops).
    steps = [json.loads(e.data)["progress"]["step"] for e in found[1:-1]]
    assert steps[:2] == [0, 1] and steps[-1] == 3 and steps == sorted(steps)
    assert json.loads(found[-1].data)["result"] == {"images": []}
    ids = [tuple(map(int, e.id.split("-"))) for e in found[1:]]  # type: ignore[union-attr]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ": keep-alive" in comments  # the job sat queued for longer than the keep-alive period
    # Every data line is one JSON object in the shape of docs/API.md.
    assert set(first) == {"job_id", "status", "at", "progress", "queue_position"}


def test_a_finished_job_streams_its_state_and_ends(client: TestClient, store: JobStore) -> None:
    job_id = submit(client)
    store.cancel(job_id)
    response = client.get(f"/jobs/{job_id}/events")
    found, _ = parse(response.text)
    assert [e.event for e in found] == ["canceled"]
    # Its id is the stream's last one: a reconnect from it has nothing more to wait for.
    assert found[0].id == store.r.xrevrange(store.events_key(job_id), count=1)[0][0]
    assert response.text.startswith(f"id: {found[0].id}\nevent: canceled\ndata: {{")


def test_last_event_id_resumes_after_that_event(client: TestClient, store: JobStore) -> None:
    job_id = submit(client)
    for action in run_job(store, job_id):
        action()
    whole, _ = parse(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "0-0"}).text)
    assert [e.event for e in whole[:2]] == ["queued", "running"] and whole[-1].event == "succeeded"
    rest, _ = parse(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": whole[1].id}).text)  # type: ignore[dict-item]
    assert [e.id for e in rest] == [e.id for e in whole[2:]]


@pytest.mark.parametrize("bad", ["abc", "1-2-3", "-1", "1" * 30 + "-0"])
def test_a_malformed_last_event_id_is_a_422_naming_the_header(client: TestClient, bad: str) -> None:
    job_id = submit(client)
    response = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "Last-Event-ID"


def test_another_keys_job_is_a_404(client: TestClient) -> None:
    job_id = submit(client)
    response = client.get(f"/jobs/{job_id}/events", headers=TestKeys.header(TestKeys.bob))
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get("/jobs/" + "0" * 32 + "/events").status_code == 404


def test_the_queue_position_is_sent_when_it_moves(client: TestClient, store: JobStore) -> None:
    ahead, job_id = submit(client), submit(client)
    store.heartbeat("w:1")
    thread = later(
        1.0,  # after the stream has opened and sent the first position
        lambda: store.begin(ahead, "w:1"),  # the job ahead starts: this one is next in line
        lambda: time.sleep(1.5),  # longer than a position tick
        *run_job(store, job_id),
    )
    found, _ = parse(client.get(f"/jobs/{job_id}/events").text)
    thread.join()
    queued = [json.loads(e.data)["queue_position"] for e in found if e.event == "queued"]
    assert queued == [1, 0]
    assert found[-1].event == "succeeded"
