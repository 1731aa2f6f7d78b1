"""Leases, the sweep, deadlines and lost messages, against the real Redis (a key prefix of each test's
own). The integration tests (tests/integration/test_recovery.py) show the same with real workers."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import pytest

from ebca_common.jobs import JobStatus, unix_time
from ebca_common.queueing import CeleryPublisher, broker_lists, queued_job_ids
from ebca_common.settings import Settings
from ebca_common.store import JobStore


@pytest.fixture
def settings(store_settings: Settings) -> Settings:
    # The broker queue under the test's key prefix too, so that its messages are cleaned up with it.
    return store_settings.model_copy(update={"queue": f"{store_settings.key_prefix}:broker"})


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


class Published(list[str]):
    """A publisher that records the job ids it was given."""

    def __call__(self, job_id: str) -> None:
        self.append(job_id)


def new_job(store: JobStore, **kw: Any) -> str:
    job, _ = store.create(kind="generate", mode=None, request={"prompt": "x"}, total_steps=5, **kw)
    return job.id


def started(store: JobStore, worker: str, **kw: Any) -> str:
    """A job begun by ``worker``, which beats and holds it."""
    job_id = new_job(store, **kw)
    store.heartbeat(worker, lambda: {job_id})
    assert store.begin(job_id, worker).outcome == "run"
    return job_id


def silence(store: JobStore, worker: str) -> None:
    """``worker`` was last heard of a minute ago (it was killed)."""
    store.r.zadd(store.k("workers"), {worker: time.time() - 60})


def test_a_lapsed_lease_puts_the_job_back_in_line_once(store: JobStore) -> None:
    job_id = started(store, "w:1")
    later = new_job(store)
    published = Published()
    assert store.sweep(published) == {}  # w:1 beats and holds the job: nothing to do
    silence(store, "w:1")
    assert store.sweep(published) == {"requeued": [job_id]}
    job = store.get(job_id)
    # Queued again at its old place, ahead of the job submitted after it, with its attempt counted.
    assert (job.status, job.queue_position, job.attempts, job.progress.stage) == ("queued", 0, 1, "queued")
    assert store.get(later).queue_position == 1
    assert published == [job_id]
    assert store.sweep(published) == {} and published == [job_id]  # a second pass does nothing
    # The old message, restored by the broker later, and the new one: one runs, the other is dropped.
    store.heartbeat("w:2", lambda: {job_id})
    assert store.begin(job_id, "w:2").outcome == "run"
    assert store.begin(job_id, "w:3").outcome == "duplicate"
    assert store.get(job_id).attempts == 2
    assert store.status_counts()["running"] == 1  # jobs that reached running: this one, once


def test_concurrent_sweeps_resurrect_a_job_exactly_once(settings: Settings) -> None:
    stores = [JobStore.from_settings(settings) for _ in range(8)]
    job_ids = [started(stores[0], f"w:{i}") for i in range(5)]
    for i in range(5):
        silence(stores[0], f"w:{i}")
    published = Published()
    barrier = threading.Barrier(len(stores))

    def sweep(store: JobStore) -> None:
        barrier.wait()
        store.sweep(published)

    threads = [threading.Thread(target=sweep, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(published) == sorted(job_ids)  # one new message per job, whichever sweep won it
    assert all(stores[0].get(j).status == JobStatus.QUEUED for j in job_ids)


def test_a_live_worker_that_no_longer_holds_the_job_loses_it(store: JobStore) -> None:
    """A process that beats but does not report the job (it gave the job up after a store outage, or
    it is a new process whose pid is the dead one's) does not keep the lease."""
    job_id = started(store, "w:1")
    store.heartbeat("w:1")  # beating, holding nothing
    assert store.sweep(Published()) == {"requeued": [job_id]}


def test_a_beat_never_erases_a_lease_taken_meanwhile(store: JobStore) -> None:
    """The heartbeat reads the process's holdings, then writes them; a begin() landing in between
    (the process lists the job first, then begins it) makes the beat run again instead of erasing it."""
    job_id = new_job(store)
    holding: set[str] = set()
    reads = []

    def racing_holdings() -> set[str]:
        reads.append(set(holding))
        if len(reads) == 1:  # the first read sees nothing yet; the job then starts before the write
            holding.add(job_id)
            assert store.begin(job_id, "w:1").outcome == "run"
            return set()
        return set(holding)

    store.heartbeat("w:1", racing_holdings)
    assert len(reads) == 2
    assert store.lease_live(store.require(job_id))


def test_the_attempt_limit_and_a_pending_cancel_end_a_lost_job(settings: Settings) -> None:
    store = JobStore.from_settings(settings.model_copy(update={"max_attempts": 1}))
    exhausted = started(store, "w:1")
    canceled = started(store, "w:2")
    store.cancel(canceled)
    silence(store, "w:1")
    silence(store, "w:2")
    published = Published()
    assert store.sweep(published) == {"exhausted": [exhausted], "canceled": [canceled]}
    assert published == []
    job = store.get(exhausted)
    assert job.status == JobStatus.FAILED and job.error.code == "worker_lost"
    assert store.get(canceled).status == JobStatus.CANCELED


def test_deadlines(store: JobStore) -> None:
    queued = new_job(store, timeout_seconds=5)
    running = started(store, "w:1", timeout_seconds=5)
    fresh = new_job(store, timeout_seconds=600)
    record = store.require(queued)
    assert unix_time(record.deadline_at) - unix_time(record.created_at) == pytest.approx(5, abs=0.002)
    assert store.get(queued).deadline_at == record.deadline_at  # shown by GET /jobs/{id}
    deadline = unix_time(record.deadline_at)
    published = Published()
    # Past the deadline: the queued job ends without starting; the running one is left to its live
    # worker (which stops at its next step) for one heartbeat TTL more.
    assert store.sweep(published) == {}
    ttl = store.settings.heartbeat_ttl
    assert store.settle(queued, now=deadline + 0.1) == "timeout"
    store.r.zadd(store.k("workers"), {"w:1": deadline})  # w:1 beats (score = the time of its beat)
    assert store.settle(running, now=deadline + 0.1) == "kept"
    store.r.zadd(store.k("workers"), {"w:1": deadline + ttl})  # still beating, but not stopping it
    assert store.settle(running, now=deadline + ttl + 0.1) == "timeout"
    assert store.settle(fresh, now=deadline + 0.1) == "kept"
    for job_id, attempts in ((queued, 0), (running, 1)):
        job = store.get(job_id)
        assert (job.status, job.error.code, job.attempts) == (JobStatus.FAILED, "timeout", attempts)
    assert store.get(queued).started_at is None and "still queued" in store.get(queued).error.message
    # Its worker's next step finds the job no longer its own; a late delivery does nothing.
    assert store.progress(running, "w:1", "denoising", 2, 5) == "lost"
    assert store.begin(queued, "w:2").outcome == "terminal"
    assert published == []


def test_a_delivery_past_the_deadline_fails_the_job_without_starting_it(store: JobStore) -> None:
    job_id = new_job(store, timeout_seconds=1)
    # Delivered after its deadline (before any sweep saw it): the record's deadline is what counts.
    store.r.hset(store.job_key(job_id), mapping=store._encode({"deadline_at": "2000-01-01T00:00:00.000Z"}))
    assert store.begin(job_id, "w:1").outcome == "timeout"
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.error.code == "timeout" and job.attempts == 0


def test_progress_and_finish_only_for_the_lease_holder(store: JobStore) -> None:
    job_id = started(store, "w:1")
    assert store.progress(job_id, "w:1", "denoising", 1, 5) == "run"
    assert store.progress(job_id, "w:2", "denoising", 4, 5) == "lost"
    assert store.finish(job_id, JobStatus.SUCCEEDED, lease="w:2", result={"images": []}) is False
    assert store.release(job_id, "w:2") is False
    record = store.require(job_id)
    assert record.status == JobStatus.RUNNING and record.progress.step == 1
    store.cancel(job_id)
    assert store.progress(job_id, "w:1", "denoising", 2, 5) == "cancel"
    assert store.finish(job_id, JobStatus.CANCELED, lease="w:1") is True
    assert store.progress(job_id, "w:1", "denoising", 3, 5) == "lost"


def test_queued_job_ids_reads_the_broker(settings: Settings, store: JobStore) -> None:
    publisher = CeleryPublisher(settings)
    ids = [new_job(store) for _ in range(3)]
    for job_id in ids:
        publisher.publish(job_id)
    assert queued_job_ids(store.r, settings.queue) == set(ids)
    # A message a worker took and has not acknowledged yet is still the job's (kombu's unacked hash).
    key, message = store.r.brpop(broker_lists(settings.queue), timeout=1)
    taken = _args(message)[0]
    tag = f"{settings.key_prefix}-tag"
    store.r.hset("unacked", tag, json.dumps([json.loads(message), "", settings.queue]))
    try:
        assert queued_job_ids(store.r, settings.queue) == set(ids)
        store.r.delete(*broker_lists(settings.queue))
        assert queued_job_ids(store.r, settings.queue) == {taken}
    finally:
        store.r.hdel("unacked", tag)


def test_jobs_put_back_in_line_are_delivered_before_new_ones(settings: Settings, store: JobStore) -> None:
    publisher = CeleryPublisher(settings)
    new, recovered = new_job(store), new_job(store)
    publisher.publish(new)
    publisher.publish(recovered, front=True)
    # A worker pops the priority lists in this order (kombu's BRPOP over them, first non-empty wins).
    order = [_args(store.r.brpop(broker_lists(settings.queue), timeout=1)[1])[0] for _ in range(2)]
    assert order == [recovered, new]


def test_a_queued_job_whose_message_is_gone_is_published_again(settings: Settings, store: JobStore) -> None:
    publisher = CeleryPublisher(settings)
    kept, lost, recent = new_job(store), new_job(store), new_job(store)
    for job_id in (kept, lost, recent):
        publisher.publish(job_id)
    # The broker lost one message (a Redis restart without its data; a crash before the publish).
    key = next(k for k in broker_lists(settings.queue) if store.r.llen(k))
    message = next(m for m in store.r.lrange(key, 0, -1) if lost in _args(m))
    store.r.lrem(key, 1, message)
    published = Published()
    assert store.sweep(published) == {} and published == []  # within the grace: nothing yet
    past = time.time() - settings.republish_grace_seconds - 1
    store.r.zadd(store.k("published"), {kept: past, lost: past})
    assert store.sweep(published) == {"republished": [lost]} and published == [lost]
    # Each job is looked up once per grace: the next pass does not publish it again.
    store.r.delete(store.k("sweep", "broker"))
    assert store.sweep(published) == {} and published == [lost]


def _args(message: str) -> list[Any]:
    """The task arguments of a broker message (Celery protocol 2, base64 body)."""
    return json.loads(base64.b64decode(json.loads(message)["body"]))[0]
