"""The Redis job store: job records, queue order, idempotency keys, cancel flags, attempts, heartbeats.

Layout (``{p}`` = EBCA_KEY_PREFIX):
- ``{p}:job:{id}``     hash, one JSON value per field of the :class:`~ebca_common.jobs.JobRecord` (so
                        progress and the cancel flag are one-field HSETs that race nothing else)
- ``{p}:queue``        sorted set of queued job ids by submission sequence (queue_position = rank)
- ``{p}:seq``          counter giving that sequence
- ``{p}:running``      set of running job ids
- ``{p}:idem:{key}``   JSON {fingerprint, job_id} of an Idempotency-Key
- ``{p}:workers``      sorted set worker id -> last heartbeat (unix seconds)
- ``{p}:stats``        hash status -> number of jobs that reached it (Prometheus counters)
- ``{p}:hist:{name}``  hash of histogram buckets, sum and count (job and step durations)
- ``{p}:models``       hash model id -> JSON defaults, published by the workers that serve it

State changes that race (cancel vs start, two deliveries of one job) run in WATCH/MULTI transactions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import TypeAdapter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from ebca_common.errors import Conflict, IdempotencyConflict, NotFound, RateLimited, Unavailable
from ebca_common.jobs import Job, JobError, JobRecord, JobResult, JobStatus, Progress, utcnow
from ebca_common.settings import Settings

#: Histogram buckets in seconds (jobs take seconds to minutes; steps take milliseconds to seconds).
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "job_duration_seconds": (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    "step_duration_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
}

#: One validator per record field: every value written to a job hash is checked against the record's
#: type first, so a partial update can never store what a whole-record read would refuse.
_FIELDS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(info.annotation) for name, info in JobRecord.model_fields.items()
}

BeginOutcome = Literal["run", "missing", "terminal", "duplicate", "exhausted", "canceled"]


@dataclass
class Begin:
    """What a worker should do with a delivery of a job."""

    outcome: BeginOutcome
    record: JobRecord | None = None


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn Redis connection failures into :class:`Unavailable` (the api answers 503 + Retry-After)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable(f"the job store is unreachable: {exc}") from exc


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.p = settings.key_prefix

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
            health_check_interval=30,
        )
        return cls(client, settings)

    # -- keys ------------------------------------------------------------------------------------
    def k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    def job_key(self, job_id: str) -> str:
        return self.k("job", job_id)

    # -- encoding ----------------------------------------------------------------------------------
    @staticmethod
    def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
        """Hash values for some fields of a record (a whole one: ``dict(record)``)."""
        encoded = {}
        for name, value in fields.items():
            adapter = _FIELDS[name]
            encoded[name] = adapter.dump_json(adapter.validate_python(value)).decode()
        return encoded

    @staticmethod
    def _decode(raw: Mapping[str, str]) -> JobRecord:
        return JobRecord.model_validate({name: json.loads(value) for name, value in raw.items()})

    @staticmethod
    def _decode_field(name: str, raw: str) -> Any:
        return _FIELDS[name].validate_json(raw)

    # -- reads ---------------------------------------------------------------------------------------
    def ping(self) -> bool:
        with redis_errors():
            return bool(self.r.ping())

    def record(self, job_id: str) -> JobRecord | None:
        """The full internal record (including lease, inputs, plan), or None."""
        with redis_errors():
            raw = self.r.hgetall(self.job_key(job_id))
        return self._decode(raw) if raw else None

    def require(self, job_id: str) -> JobRecord:
        record = self.record(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} not found")
        return record

    def queue_position(self, job_id: str) -> int | None:
        with redis_errors():
            rank = self.r.zrank(self.k("queue"), job_id)
        return None if rank is None else int(rank)

    def view(self, record: JobRecord) -> Job:
        """The public job document of a record."""
        position = self.queue_position(record.id) if record.status == JobStatus.QUEUED else None
        return record.view(position)

    def get(self, job_id: str) -> Job:
        return self.view(self.require(job_id))

    def queue_depth(self) -> int:
        with redis_errors():
            return int(self.r.zcard(self.k("queue")))

    def running_count(self) -> int:
        with redis_errors():
            return int(self.r.scard(self.k("running")))

    def job_count(self) -> int:
        """Number of job records (used by tests to prove a rejected request created nothing)."""
        with redis_errors():
            return sum(1 for _ in self.r.scan_iter(match=self.k("job", "*"), count=500))

    # -- creation --------------------------------------------------------------------------------------
    def create(
        self,
        *,
        kind: str,
        mode: str | None,
        request: dict[str, Any],
        total_steps: int,
        plan: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        job_id: str | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Create a queued job; return (job, created). ``idempotency`` is (key, body fingerprint).

        With an Idempotency-Key already used: the same fingerprint returns the existing job (created
        False), another fingerprint raises :class:`IdempotencyConflict`.
        """
        job_id = job_id or uuid.uuid4().hex
        idem_key = self.k("idem", idempotency[0]) if idempotency else None
        with redis_errors(), self.r.pipeline() as pipe:
            while True:
                try:
                    if idem_key:
                        pipe.watch(idem_key)
                        existing = pipe.get(idem_key)
                        replayed = self._replay(json.loads(existing), idempotency[1]) if existing else None  # type: ignore[index]
                        if replayed is not None:
                            pipe.unwatch()
                            return replayed, False
                    if self.r.zcard(self.k("queue")) >= self.settings.max_queue:
                        raise RateLimited(
                            f"the queue is full ({self.settings.max_queue} jobs); retry later",
                            retry_after=self.settings.retry_after_seconds,
                        )
                    seq = int(self.r.incr(self.k("seq")))
                    record = JobRecord(
                        id=job_id,
                        kind=kind,  # type: ignore[arg-type]
                        mode=mode,  # type: ignore[arg-type]
                        status=JobStatus.QUEUED,
                        progress=Progress(stage="queued", step=0, total=total_steps),
                        seq=seq,
                        created_at=utcnow(),
                        request=request,
                        plan=plan,
                        inputs=inputs or {},
                    )
                    pipe.multi()
                    if idem_key:
                        fingerprint = idempotency[1]  # type: ignore[index]
                        pipe.set(
                            idem_key,
                            json.dumps({"fingerprint": fingerprint, "job_id": job_id}),
                            ex=self.settings.idempotency_ttl_seconds,
                        )
                    pipe.hset(self.job_key(job_id), mapping=self._encode(dict(record)))
                    pipe.zadd(self.k("queue"), {job_id: seq})
                    pipe.hincrby(self.k("stats"), JobStatus.QUEUED.value, 1)
                    pipe.execute()
                    return self.view(record), True
                except WatchError:
                    continue

    def lookup_idempotent(self, key: str, fingerprint: str) -> Job | None:
        """The job an Idempotency-Key already made (same fingerprint), None if unused; 409 otherwise."""
        with redis_errors():
            raw = self.r.get(self.k("idem", key))
        return None if raw is None else self._replay(json.loads(raw), fingerprint)

    def _replay(self, existing: dict[str, Any], fingerprint: str) -> Job | None:
        """The job a used key made; None when that job record is gone (it expired before the key, with
        EBCA_JOB_TTL_SECONDS below EBCA_IDEMPOTENCY_TTL_SECONDS): the key is then free again rather
        than answering a POST with a 404."""
        record = self.record(existing["job_id"])
        if record is None:
            return None
        if existing.get("fingerprint") != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request body", field=None
            )
        return self.view(record)

    def discard(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Remove a job that was never handed to the queue (the broker refused it)."""
        with redis_errors(), self.r.pipeline() as pipe:
            pipe.delete(self.job_key(job_id))
            pipe.zrem(self.k("queue"), job_id)
            pipe.hincrby(self.k("stats"), JobStatus.QUEUED.value, -1)
            if idempotency_key:
                pipe.delete(self.k("idem", idempotency_key))
            pipe.execute()

    # -- cancel ----------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """Queued: canceled now. Running: flag it (the worker stops at the next step). Else 409."""
        key = self.job_key(job_id)
        with redis_errors(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "status")
                    if raw is None:
                        pipe.unwatch()
                        raise NotFound(f"job {job_id!r} not found")
                    status = self._decode_field("status", raw)
                    if status.terminal:
                        pipe.unwatch()
                        raise Conflict(f"job {job_id!r} already finished ({status.value}); nothing to cancel")
                    pipe.multi()
                    pipe.hset(key, mapping=self._encode({"cancel_requested": True}))
                    if status == JobStatus.QUEUED:
                        # Never started: canceled at once; its queue message is dropped on delivery.
                        self._finish_fields(pipe, job_id, JobStatus.CANCELED)
                    pipe.execute()
                    break
                except WatchError:
                    continue
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with redis_errors():
            raw = self.r.hget(self.job_key(job_id), "cancel_requested")
        return raw is not None and self._decode_field("cancel_requested", raw)

    # -- worker side ---------------------------------------------------------------------------------
    def begin(self, job_id: str, worker_id: str) -> Begin:
        """Claim a delivered job for ``worker_id`` (a worker process id): take its lease and count the
        attempt.

        A job found ``running`` was started before by a worker that did not finish it: if that worker
        is still alive this delivery is a duplicate (the broker's visibility timeout expired during a
        long job); otherwise the worker died, and after EBCA_MAX_ATTEMPTS starts the job fails with
        ``worker_lost`` instead of running again.
        """
        key = self.job_key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        pipe.unwatch()
                        return Begin("missing")
                    record = self._decode(raw)
                    if record.status.terminal:
                        pipe.unwatch()
                        return Begin("terminal", record)
                    if record.status == JobStatus.RUNNING:
                        previous = record.lease
                        if previous and previous != worker_id and self.worker_alive(previous):
                            pipe.unwatch()
                            return Begin("duplicate", record)
                        if record.cancel_requested:
                            pipe.multi()
                            self._finish_fields(pipe, job_id, JobStatus.CANCELED)
                            pipe.execute()
                            return Begin("canceled", record)
                        if record.attempts >= self.settings.max_attempts:
                            error = JobError(
                                code="worker_lost",
                                message=f"the worker running this job died {record.attempts} times "
                                f"(EBCA_MAX_ATTEMPTS={self.settings.max_attempts}); giving up",
                            )
                            pipe.multi()
                            self._finish_fields(pipe, job_id, JobStatus.FAILED, error=error)
                            pipe.execute()
                            return Begin("exhausted", record)
                    started = {
                        "status": JobStatus.RUNNING,
                        "attempts": record.attempts + 1,
                        "lease": worker_id,
                        "started_at": utcnow(),
                        "progress": Progress(stage="loading", step=0, total=record.progress.total),
                    }
                    pipe.multi()
                    pipe.hset(key, mapping=self._encode(started))
                    pipe.zrem(self.k("queue"), job_id)
                    pipe.sadd(self.k("running"), job_id)
                    if record.status == JobStatus.QUEUED:
                        pipe.hincrby(self.k("stats"), JobStatus.RUNNING.value, 1)
                    pipe.execute()
                    return Begin("run", record.model_copy(update=started))
                except WatchError:
                    continue

    def resolve_request(self, job_id: str, data: dict[str, Any], total: int, field: str = "request") -> None:
        """Record the request as it runs (the model's defaults filled in) and the job's step total.

        ``field`` is ``plan`` for a synthetic edit, whose ``request`` is the edit the client sent.
        """
        key = self.job_key(job_id)
        raw = self.r.hget(key, "progress")
        progress = self._decode_field("progress", raw) if raw else Progress(stage="loading")
        self.r.hset(
            key, mapping=self._encode({field: data, "progress": progress.model_copy(update={"total": total})})
        )

    def progress(self, job_id: str, stage: str, step: int, total: int) -> bool:
        """Record progress; return whether a cancel was requested (one round trip per step)."""
        key = self.job_key(job_id)
        progress = Progress(stage=stage, step=step, total=total)  # type: ignore[arg-type]
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=self._encode({"progress": progress}))
            pipe.hget(key, "cancel_requested")
            _, raw = pipe.execute()
        return raw is not None and self._decode_field("cancel_requested", raw)

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        progress: Progress | None = None,
    ) -> None:
        with self.r.pipeline() as pipe:
            self._finish_fields(pipe, job_id, status, result=result, error=error, progress=progress)
            pipe.execute()

    def _finish_fields(
        self,
        pipe: Any,
        job_id: str,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Queue the commands that end a job on ``pipe`` (which may be inside MULTI)."""
        fields: dict[str, Any] = {"status": status, "finished_at": utcnow(), "result": result, "error": error}
        if progress is not None:
            fields["progress"] = progress
        key = self.job_key(job_id)
        pipe.hset(key, mapping=self._encode(fields))
        pipe.zrem(self.k("queue"), job_id)
        pipe.srem(self.k("running"), job_id)
        pipe.hincrby(self.k("stats"), status.value, 1)
        pipe.expire(key, self.settings.job_ttl_seconds)

    # -- heartbeats ------------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str) -> None:
        now = time.time()
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(self.k("workers"), {worker_id: now})
            # Forget workers silent for far longer than the TTL so the set stays small.
            pipe.zremrangebyscore(self.k("workers"), 0, now - 100 * self.settings.heartbeat_ttl)
            pipe.execute()

    def worker_gone(self, worker_id: str) -> None:
        self.r.zrem(self.k("workers"), worker_id)

    def worker_alive(self, worker_id: str) -> bool:
        score = self.r.zscore(self.k("workers"), worker_id)
        return score is not None and time.time() - float(score) <= self.settings.heartbeat_ttl

    def live_workers(self) -> list[str]:
        with redis_errors():
            return list(
                self.r.zrangebyscore(self.k("workers"), time.time() - self.settings.heartbeat_ttl, "+inf")
            )

    # -- models ----------------------------------------------------------------------------------------
    def publish_model_defaults(self, defaults: dict[str, dict[str, Any]]) -> None:
        """A worker announces the defaults of the models it serves (GET /models lists them)."""
        if defaults:
            self.r.hset(self.k("models"), mapping={mid: json.dumps(d) for mid, d in defaults.items()})

    def model_defaults(self) -> dict[str, dict[str, Any]]:
        with redis_errors():
            raw = self.r.hgetall(self.k("models"))
        return {mid: json.loads(value) for mid, value in raw.items()}

    # -- metrics ---------------------------------------------------------------------------------------
    def observe(self, name: str, value: float) -> None:
        """Add one observation to a Redis-backed histogram (the api exports it on /metrics)."""
        key = self.k("hist", name)
        with self.r.pipeline(transaction=False) as pipe:
            for bound in HISTOGRAM_BUCKETS[name]:
                if value <= bound:
                    pipe.hincrby(key, repr(float(bound)), 1)
            pipe.hincrby(key, "+Inf", 1)
            pipe.hincrbyfloat(key, "sum", value)
            pipe.execute()

    def histogram(self, name: str) -> tuple[list[tuple[str, float]], float]:
        with redis_errors():
            raw = self.r.hgetall(self.k("hist", name))
        buckets = [(repr(float(b)), float(raw.get(repr(float(b)), 0))) for b in HISTOGRAM_BUCKETS[name]]
        buckets.append(("+Inf", float(raw.get("+Inf", 0))))
        return buckets, float(raw.get("sum", 0.0))

    def status_counts(self) -> dict[str, int]:
        with redis_errors():
            raw = self.r.hgetall(self.k("stats"))
        return {status.value: int(raw.get(status.value, 0)) for status in JobStatus}
