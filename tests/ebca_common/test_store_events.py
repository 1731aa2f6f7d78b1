"""The job store's live events (Redis streams) and queued webhook deliveries, against the real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from ebca_common.jobs import JobStatus, WebhookSpec
from ebca_common.settings import Settings
from ebca_common.store import EVENT_INTERVAL_MS, JobStore


@pytest.fixture
def store(store_settings: Settings) -> JobStore:
    return JobStore.from_settings(store_settings)


def new_job(store: JobStore, webhook: WebhookSpec | None = None) -> str:
    job, _ = store.create(kind="generate", mode=None, request={"prompt": "x"}, total_steps=6, webhook=webhook)
    return job.id


def events(store: JobStore, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [(i, f["status"], json.loads(f["data"])) for i, f in store.r.xrange(store.events_key(job_id))]


def stream_id(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_every_state_change_appends_one_event_in_order(store: JobStore) -> None:
    job_id = new_job(store)
    store.heartbeat("w:1")
    assert store.begin(job_id, "w:1").outcome == "run"
    assert store.release(job_id, "w:1")  # a graceful hand-back: queued again
    assert store.begin(job_id, "w:1").outcome == "run"
    assert store.finish(job_id, JobStatus.SUCCEEDED, lease="w:1", result={"images": []})
    got = events(store, job_id)
    assert [s for _, s, _ in got] == ["queued", "running", "queued", "running", "succeeded"]
    ids = [stream_id(i) for i, _, _ in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    last = got[-1][2]
    assert last["job_id"] == job_id and last["result"] == {"images": []}
    assert got[1][2]["progress"] == {"stage": "loading", "step": 0, "total": 6}
    # The stream expires with the finished record.
    ttl = store.r.ttl(store.events_key(job_id))
    assert 0 < ttl <= store.settings.job_ttl_seconds
    assert abs(ttl - store.r.ttl(store.job_key(job_id))) <= 1


def test_cancel_of_a_queued_job_is_its_terminal_event(store: JobStore) -> None:
    job_id = new_job(store)
    store.cancel(job_id)
    assert [s for _, s, _ in events(store, job_id)] == ["queued", "canceled"]


def test_progress_events_are_throttled_but_keep_stage_changes_and_the_last_step(store: JobStore) -> None:
    job_id = new_job(store)
    store.heartbeat("w:1")
    store.begin(job_id, "w:1")
    start = time.monotonic()
    for step in range(1, 7):  # six steps in far less than EVENT_INTERVAL_MS
        assert store.progress(job_id, "w:1", "denoising", step, 6) == "run"
    assert store.progress(job_id, "w:1", "decoding", 6, 6) == "run"
    assert time.monotonic() - start < EVENT_INTERVAL_MS / 1000, "the test ran too slowly to show the throttle"
    running = [d["progress"] for _, s, d in events(store, job_id) if s == "running"]
    # begin (loading), the first denoising step (a new stage), the last step, the new stage decoding.
    assert running == [
        {"stage": "loading", "step": 0, "total": 6},
        {"stage": "denoising", "step": 1, "total": 6},
        {"stage": "denoising", "step": 6, "total": 6},
        {"stage": "decoding", "step": 6, "total": 6},
    ]
    # The record has every step (the throttle is on events only).
    assert store.get(job_id).progress.stage == "decoding"


def test_progress_after_the_throttle_interval_is_an_event_again(store: JobStore) -> None:
    job_id = new_job(store)
    store.heartbeat("w:1")
    store.begin(job_id, "w:1")
    store.progress(job_id, "w:1", "denoising", 1, 6)
    store.progress(job_id, "w:1", "denoising", 2, 6)
    time.sleep(EVENT_INTERVAL_MS / 1000 + 0.05)
    store.progress(job_id, "w:1", "denoising", 3, 6)
    steps = [d["progress"]["step"] for _, s, d in events(store, job_id) if s == "running"]
    assert steps == [0, 1, 3]


def test_a_worker_that_lost_the_job_writes_no_event(store: JobStore) -> None:
    job_id = new_job(store)
    store.heartbeat("w:1")
    store.begin(job_id, "w:1")
    assert store.progress(job_id, "w:2", "denoising", 1, 6) == "lost"
    assert not store.finish(job_id, JobStatus.SUCCEEDED, lease="w:2", result={"images": []})
    assert [s for _, s, _ in events(store, job_id)] == ["queued", "running"]


def pending(store: JobStore) -> list[dict[str, Any]]:
    ids = store.r.zrange(store.k("webhooks", "due"), 0, -1)
    return [json.loads(store.r.hget(store.k("webhooks", "msgs"), i)) | {"id": i} for i in ids]


def test_webhook_deliveries_are_queued_with_the_events_asked_for(store: JobStore) -> None:
    hook = WebhookSpec(url="https://hooks.example/x", events=["start", "completed"])
    job_id = new_job(store, hook)
    store.heartbeat("w:1")
    store.begin(job_id, "w:1")
    store.progress(job_id, "w:1", "denoising", 1, 6)  # not asked for
    store.finish(job_id, JobStatus.SUCCEEDED, lease="w:1", result={"images": []})
    queued = pending(store)
    bodies = [json.loads(m["body"]) for m in queued]
    assert [b["type"] for b in bodies] == ["start", "completed"]
    assert bodies[1]["data"]["status"] == "succeeded" and bodies[1]["data"]["job_id"] == job_id
    assert all(m["id"].startswith("msg_") and m["attempts"] == 0 for m in queued)
    job = store.get(job_id)
    assert job.webhook is not None and job.webhook.deliveries.pending == 2
    assert job.webhook.url == hook.url and job.webhook.events == ["start", "completed"]
    # The webhook is the job's, not the request's.
    assert "webhook" not in job.request


def test_progress_deliveries_are_at_most_one_a_second(store: JobStore) -> None:
    hook = WebhookSpec(url="https://hooks.example/x", events=["progress"])
    job_id = new_job(store, hook)
    store.heartbeat("w:1")
    store.begin(job_id, "w:1")
    store.progress(job_id, "w:1", "denoising", 1, 6)
    time.sleep(EVENT_INTERVAL_MS / 1000 + 0.05)  # a second event, still within the webhook's second
    store.progress(job_id, "w:1", "denoising", 2, 6)
    assert len([s for _, s, _ in events(store, job_id) if s == "running"]) == 3
    assert [json.loads(m["body"])["data"]["progress"]["step"] for m in pending(store)] == [1]
    time.sleep(1.05)
    store.progress(job_id, "w:1", "denoising", 3, 6)
    assert [json.loads(m["body"])["data"]["progress"]["step"] for m in pending(store)] == [1, 3]
    assert store.get(job_id).webhook.deliveries.pending == 2  # type: ignore[union-attr]


def test_discard_removes_the_events(store: JobStore) -> None:
    job_id = new_job(store)
    store.discard(job_id)
    assert not store.r.exists(store.events_key(job_id))
