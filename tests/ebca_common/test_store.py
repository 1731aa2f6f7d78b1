"""The Redis job store against the real Redis (a key prefix of each test's own)."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from ebca_common.errors import Conflict, IdempotencyConflict, NotFound, RateLimited
from ebca_common.jobs import JobError, JobRecord, JobStatus
from ebca_common.settings import Settings
from ebca_common.store import JobStore


@pytest.fixture
def store(store_settings: Settings) -> JobStore:
    return JobStore.from_settings(store_settings)


def new_job(store: JobStore, **kw) -> str:
    job, created = store.create(kind="generate", mode=None, request={"prompt": "x"}, total_steps=5, **kw)
    assert created
    return job.id


def test_queue_positions_follow_submission_order(store: JobStore) -> None:
    ids = [new_job(store) for _ in range(3)]
    assert [store.get(i).queue_position for i in ids] == [0, 1, 2]
    store.cancel(ids[0])
    assert store.get(ids[0]).queue_position is None and store.get(ids[0]).status == JobStatus.CANCELED
    assert [store.get(i).queue_position for i in ids[1:]] == [0, 1]
    assert store.begin(ids[1], "w:1").outcome == "run"
    assert store.get(ids[2]).queue_position == 0
    assert store.queue_depth() == 1 and store.running_count() == 1


def test_idempotency(store: JobStore) -> None:
    first, created = store.create(
        kind="generate", mode=None, request={}, total_steps=1, idempotency=("k", "fp1")
    )
    again, created_again = store.create(
        kind="generate", mode=None, request={}, total_steps=1, idempotency=("k", "fp1")
    )
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(kind="generate", mode=None, request={}, total_steps=1, idempotency=("k", "fp2"))
    assert store.lookup_idempotent("k", "fp1").id == first.id
    assert store.lookup_idempotent("other", "fp1") is None
    store.discard(first.id, "k")  # the broker refused it: the key is free again
    assert store.lookup_idempotent("k", "fp1") is None
    with pytest.raises(NotFound):
        store.get(first.id)


def test_queue_limit(store_settings: Settings) -> None:
    store = JobStore.from_settings(store_settings.model_copy(update={"max_queue": 2}))
    new_job(store)
    new_job(store)
    with pytest.raises(RateLimited) as info:
        new_job(store)
    assert info.value.retry_after == store_settings.retry_after_seconds
    assert store.job_count() == 2


def test_cancel_rules(store: JobStore) -> None:
    job_id = new_job(store)
    assert store.begin(job_id, "w:1").outcome == "run"
    running = store.cancel(job_id)
    assert running.status == JobStatus.RUNNING and running.cancel_requested
    assert store.progress(job_id, "w:1", "denoising", 1, 5) == "cancel"  # seen at the worker's next step
    assert store.finish(job_id, JobStatus.CANCELED, lease="w:1")
    with pytest.raises(Conflict):
        store.cancel(job_id)
    with pytest.raises(NotFound):
        store.cancel("nope")
    assert store.begin(job_id, "w:2").outcome == "terminal"  # a late redelivery does nothing


def test_begin_counts_attempts_and_detects_lost_workers(store_settings: Settings) -> None:
    store = JobStore.from_settings(store_settings.model_copy(update={"max_attempts": 2}))
    job_id = new_job(store)
    store.heartbeat("w:1")
    assert store.begin(job_id, "w:1").record.attempts == 1
    # Redelivered while w:1 still beats: a duplicate, not a crash.
    assert store.begin(job_id, "w:2").outcome == "duplicate"
    # w:1 stops beating (killed): the next delivery is attempt 2.
    store.r.zadd(store.k("workers"), {"w:1": time.time() - 60})
    assert not store.worker_alive("w:1")
    second = store.begin(job_id, "w:2")
    assert second.outcome == "run" and second.record.attempts == 2
    # w:2 dies too; the attempt limit is reached, so the job fails instead of running a third time.
    assert store.begin(job_id, "w:3").outcome == "exhausted"
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.error.code == "worker_lost" and job.attempts == 2


def test_cancel_requested_while_worker_died_ends_canceled(store: JobStore) -> None:
    job_id = new_job(store)
    store.begin(job_id, "w:dead")
    store.cancel(job_id)
    assert store.begin(job_id, "w:2").outcome == "canceled"
    assert store.get(job_id).status == JobStatus.CANCELED


def test_histograms_and_counts(store: JobStore) -> None:
    for value in (0.02, 0.3, 7.0):
        store.observe("step_duration_seconds", value)
    buckets, total = store.histogram("step_duration_seconds")
    as_dict = dict(buckets)
    assert as_dict["0.025"] == 1 and as_dict["0.5"] == 2 and as_dict["10.0"] == 3 and as_dict["+Inf"] == 3
    assert total == pytest.approx(7.32)
    job_id = new_job(store)
    store.begin(job_id, "w")
    store.finish(job_id, JobStatus.SUCCEEDED, lease="w", result={"images": []})
    assert store.status_counts() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "canceled": 0}


def test_live_workers(store: JobStore) -> None:
    store.heartbeat("a:1")
    store.r.zadd(store.k("workers"), {"b:2": time.time() - 30})
    assert store.live_workers() == ["a:1"]
    store.worker_gone("a:1")
    assert store.live_workers() == []


def test_the_record_round_trips_through_the_hash(store: JobStore) -> None:
    job_id = new_job(store, inputs={"image": "jobs/x/inputs/image.png"})
    record = store.require(job_id)
    assert isinstance(record, JobRecord)
    assert (record.status, record.seq, record.attempts, record.lease, record.owner) == (
        JobStatus.QUEUED, 1, 0, None, "anonymous",
    )  # fmt: skip
    assert record.inputs == {"image": "jobs/x/inputs/image.png"} and record.deadline_at is None
    claimed = store.begin(job_id, "host:42").record
    # The hash holds one JSON value per record field; the worker's id is the lease, not the owner.
    raw = store.r.hgetall(store.job_key(job_id))
    assert set(raw) == set(JobRecord.model_fields)
    assert json.loads(raw["lease"]) == "host:42" and json.loads(raw["owner"]) == "anonymous"
    assert store.require(job_id) == claimed
    store.finish(
        job_id, JobStatus.FAILED, lease="host:42", error=JobError(code="internal_error", message="boom")
    )
    done = store.require(job_id)
    assert done.status.terminal and done.error == JobError(code="internal_error", message="boom")
    assert store.get(job_id) == done.view(None)


def test_partial_writes_are_checked_against_the_record_type(store: JobStore) -> None:
    job_id = new_job(store)
    with pytest.raises(ValidationError):
        store.progress(job_id, "w:1", "sleeping", 1, 5)  # not a Stage
    with pytest.raises(KeyError):
        store._encode({"no_such_field": 1})
    assert store.require(job_id).progress.stage == "queued"  # nothing was written


def test_terminal_is_one_property_of_the_status() -> None:
    assert {s for s in JobStatus if s.terminal} == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
