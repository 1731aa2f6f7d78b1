"""Leases and the sweep: when a running job still belongs to its worker, when a job must end instead
of running (again), and the crash-recovery pass that settles lapsed leases, overdue jobs and lost broker
messages (docs/DEPLOY.md, "Crash recovery")."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ebca_common.jobs import JobError, JobRecord, JobStatus
from ebca_common.queueing import queued_job_ids
from ebca_common.store_base import StoreBase

log = logging.getLogger("ebca.store")

#: What the sweep did with one job.
SettleOutcome = Literal["kept", "gone", "requeued", "exhausted", "canceled", "timeout"]

#: Seconds between two scans of the broker for lost messages (by any worker: a Redis lock).
BROKER_SCAN_SECONDS = 5.0
#: Oldest entries of the job index checked per sweep for records that expired (EBCA_JOB_TTL_SECONDS).
INDEX_TRIM_BATCH = 100
#: Seconds between two such trims (by any sweep: a Redis lock).
INDEX_TRIM_SECONDS = 60.0


@dataclass(frozen=True)
class _End:
    """How a job that must not run (again) ends."""

    outcome: Literal["exhausted", "canceled", "timeout"]
    status: JobStatus
    error: JobError | None = None


class LeaseRules(StoreBase):
    """The lease rules (shared by a worker taking a delivery and the sweep) and the sweep itself."""

    def lease_live(self, record: JobRecord, now: float | None = None) -> bool:
        """Whether a running job's lease holds: its worker beat within EBCA_HEARTBEAT_TTL and still lists
        the job among those it runs (a restarted process with a reused pid, or one that gave the job up
        after a store outage, does not)."""
        if record.lease is None:
            return False
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zscore(self.k("workers"), record.lease)
            pipe.sismember(self.k("holds", record.lease), record.id)
            beat, holds = pipe.execute()
        now = time.time() if now is None else now
        return beat is not None and now - float(beat) <= self.settings.heartbeat_ttl and bool(holds)

    def _must_end(self, record: JobRecord, now: float) -> _End | None:
        """Whether a job that no live worker holds must end instead of running (again): the one rule for
        a worker taking a delivery and for the sweep. Past its deadline: failed ``timeout``. Lost by its
        worker (it was running): canceled if a cancel was pending, failed ``worker_lost`` once it has
        been started EBCA_MAX_ATTEMPTS times. None: it may run."""
        if record.past_deadline(now):
            return _End("timeout", JobStatus.FAILED, record.timeout_error())
        if record.status == JobStatus.RUNNING:
            if record.cancel_requested:
                return _End("canceled", JobStatus.CANCELED)
            if record.attempts >= self.settings.max_attempts:
                error = JobError(
                    code="worker_lost",
                    message=f"the worker running this job died {record.attempts} times "
                    f"(EBCA_MAX_ATTEMPTS={self.settings.max_attempts}); giving up",
                )
                return _End("exhausted", JobStatus.FAILED, error)
        return None

    def _end(self, record: JobRecord, end: _End) -> Callable[[Any], None]:
        return lambda pipe: self._finish_fields(pipe, record, end.status, error=end.error)

    # -- the sweep -------------------------------------------------------------------------------------
    def settle(self, job_id: str, now: float | None = None) -> SettleOutcome:
        """The sweep's decision for one running or overdue job, made atomically (two sweeps of two
        workers never both act on a job: the second sees what the first wrote).

        Running under a live lease: kept, unless it is past its deadline by more than EBCA_HEARTBEAT_TTL
        (its worker should have stopped it at the next step; it ends ``timeout`` and the worker finds its
        lease gone). Running without one: ended by :meth:`_must_end`, else requeued. Queued past its
        deadline: ended ``timeout`` without starting.
        """
        now = time.time() if now is None else now

        def decide(record: JobRecord | None) -> tuple[SettleOutcome, Callable[[Any], None] | None]:
            if record is None or record.status.terminal:
                return "gone", lambda pipe: self._unindex(pipe, job_id, record.owner_id if record else None)
            if record.status == JobStatus.RUNNING and self.lease_live(record, now):
                if not record.past_deadline(now - self.settings.heartbeat_ttl):
                    return "kept", None
                end: _End | None = _End("timeout", JobStatus.FAILED, record.timeout_error())
            else:
                end = self._must_end(record, now)
            if end is not None:
                return end.outcome, self._end(record, end)
            if record.status == JobStatus.QUEUED:
                return "kept", None
            return "requeued", lambda pipe: self._requeue_fields(pipe, record, now)

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def sweep(self, publish: Callable[[str], None]) -> dict[str, list[str]]:
        """One pass of crash recovery; returns the job ids acted on, by what was done.

        1. Every running job and every job past its deadline is settled (:meth:`settle`); a requeued
           job gets a new message from ``publish``. Its old message, whenever the broker restores it,
           finds the job running elsewhere or finished and is dropped (:meth:`begin`).
        2. Queued jobs whose message was due more than EBCA_REPUBLISH_GRACE_SECONDS ago are looked up
           in the broker (at most every BROKER_SCAN_SECONDS, by one worker); those without a message
           (lost with a Redis that restarted without its data, or a crash between record and publish)
           are published again. A spare message costs one dropped delivery; a lost one, a lost job.
        """
        now = time.time()
        report: dict[str, list[str]] = {}
        due = set(self.r.smembers(self.k("running")))
        due.update(self.r.zrangebyscore(self.k("deadlines"), "-inf", now))
        for job_id in sorted(due):
            outcome = self.settle(job_id, now)
            if outcome == "kept":
                continue
            report.setdefault(outcome, []).append(job_id)
            if outcome == "requeued":
                self._publish(publish, job_id)
        stale = self.r.zrangebyscore(self.k("published"), "-inf", now - self.settings.republish_grace_seconds)
        if stale and self.r.set(self.k("sweep", "broker"), "1", nx=True, px=int(BROKER_SCAN_SECONDS * 1000)):
            present = queued_job_ids(self.r, self.settings.queue)
            for job_id in stale:
                if self.r.zscore(self.k("queue"), job_id) is None:
                    self.r.zrem(self.k("published"), job_id)  # started or finished meanwhile
                    continue
                if job_id not in present:
                    report.setdefault("republished", []).append(job_id)
                    self._publish(publish, job_id)
                self.r.zadd(self.k("published"), {job_id: time.time()}, xx=True)
        if self.r.set(self.k("sweep", "trim"), "1", nx=True, px=int(INDEX_TRIM_SECONDS * 1000)):
            self._trim_index()
        return report

    def _trim_index(self) -> None:
        """Drop the job-index entries (GET /jobs) of the oldest records that have expired."""
        oldest = [str(m) for m in self.r.zrange(self.k("jobs"), 0, INDEX_TRIM_BATCH - 1)]
        with self.r.pipeline(transaction=False) as pipe:
            for member in oldest:
                pipe.exists(self.job_key(member.rsplit("/", 1)[-1]))
            present = pipe.execute()
        gone = [member for member, exists in zip(oldest, present, strict=True) if not exists]
        if not gone:
            return
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zrem(self.k("jobs"), *gone)
            for member in gone:
                owner, job_id = member.rsplit("/", 1)
                pipe.zrem(self.k("owned", owner), job_id)
                pipe.srem(self.k("active", owner), job_id)
            pipe.execute()

    @staticmethod
    def _publish(publish: Callable[[str], None], job_id: str) -> None:
        try:
            publish(job_id)
        except Exception as exc:  # the broker is away: the job is queued; the lost-message scan retries
            log.warning("job %s: could not publish its message: %s", job_id, exc)
