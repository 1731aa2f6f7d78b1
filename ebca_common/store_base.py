"""The job store's foundation: Redis keys, record encoding, WATCH/MULTI transactions, the writes that end
or requeue a job, and the worker registry, model defaults and metrics (the key layout is described in
:mod:`ebca_common.store`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Self

import redis
from pydantic import TypeAdapter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from ebca_common.errors import NotFound, Unavailable
from ebca_common.jobs import (
    JobError,
    JobRecord,
    JobResult,
    JobStatus,
    Progress,
    WebhookEvent,
    event_data,
    iso_utc,
)
from ebca_common.settings import Settings

#: Histogram buckets (durations in seconds: jobs take seconds to minutes, steps milliseconds to seconds).
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "job_duration_seconds": (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    "step_duration_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    # Not seconds: the image rows of each batch a worker ran, and each batch's images per second.
    "batch_images": (1, 2, 4, 8, 16, 32, 64),
    "batch_images_per_second": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100),
}

#: One validator per record field: every value written to a job hash is checked against the record's
#: type first, so a partial update can never store what a whole-record read would refuse.
_FIELDS: dict[str, TypeAdapter[Any]] = {
    name: TypeAdapter(info.annotation) for name, info in JobRecord.model_fields.items()
}


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn Redis connection failures into :class:`Unavailable` (the api answers 503 + Retry-After)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable(f"the job store is unreachable: {exc}") from exc


class StoreBase:
    """Keys, encoding and the primitives every part of the job store shares."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.p = settings.key_prefix
        #: How long traces of a silent worker (heartbeat, holds, draining mark) are kept.
        self._worker_retention = int(100 * settings.heartbeat_ttl) + 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
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

    def events_key(self, job_id: str) -> str:
        """The job's live events: a Redis stream whose entry ids are the SSE event ids."""
        return self.k("events", job_id)

    # -- events and webhook deliveries (queued inside the transaction that changes the record) ---------
    def _emit(
        self,
        pipe: Any,
        record: JobRecord,
        status: JobStatus,
        progress: Progress,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        hook: WebhookEvent | None = None,
    ) -> None:
        """Append the event of ``record``'s new state to its stream and queue the webhook delivery
        ``hook`` if the job asked for it. Called inside the MULTI that writes the state, so an event is
        never lost, never out of order with the record, and never told of a change that did not happen."""
        now = time.time()
        data = event_data(record.id, status, progress, result, error, now)
        pipe.xadd(self.events_key(record.id), {"status": status.value, "data": json.dumps(data)},
                  maxlen=self.settings.events_maxlen, approximate=True)  # fmt: skip
        if hook is not None and record.webhook is not None and hook in record.webhook.events:
            msg_id, msg = self.webhook_message(record.id, hook, data, now)
            pipe.hset(self.k("webhooks", "msgs"), msg_id, msg)
            pipe.zadd(self.k("webhooks", "due"), {msg_id: now})
            pipe.hincrby(self.job_key(record.id), "webhook_pending", 1)

    @staticmethod
    def webhook_message(job_id: str, hook: WebhookEvent, data: dict[str, Any], now: float) -> tuple[str, str]:
        """A pending delivery: its webhook-id (the same on every retry) and what the dispatcher keeps
        of it (the body is fixed now, so every retry sends the same bytes)."""
        msg_id = "msg_" + uuid.uuid4().hex
        body = json.dumps({"type": hook, "timestamp": iso_utc(now), "data": data}, separators=(",", ":"))
        return msg_id, json.dumps({"job_id": job_id, "body": body, "created": now, "attempts": 0})

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
    def decode(raw: Mapping[str, str]) -> JobRecord:
        """The record of a job hash as read (HGETALL), e.g. by another Redis client."""
        return JobRecord.model_validate({name: json.loads(value) for name, value in raw.items()})

    _decode = decode

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

    # -- transactions --------------------------------------------------------------------------------
    def _transact(
        self, job_id: str, decide: Callable[[JobRecord | None], tuple[Any, Callable[[Any], None] | None]]
    ) -> Any:
        """Read the record under WATCH, let ``decide`` choose (answer, writes), apply the writes in MULTI.

        ``decide`` returns what to answer and a function queueing the writes on the pipeline (None: write
        nothing). A concurrent change of the job's hash (another worker, the sweep, a cancel) aborts the
        transaction and ``decide`` runs again on the new record, so each decision is made exactly once.
        """
        key = self.job_key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    answer, write = decide(self._decode(raw) if raw else None)
                    if write is None:
                        pipe.unwatch()
                        return answer
                    pipe.multi()
                    write(pipe)
                    pipe.execute()
                    return answer
                except WatchError:
                    continue

    def _unindex(self, pipe: Any, job_id: str, owner: str | None) -> None:
        """Remove a job from every index of unfinished jobs (``owner``: the job's, None when unknown)."""
        pipe.zrem(self.k("queue"), job_id)
        pipe.srem(self.k("running"), job_id)
        pipe.zrem(self.k("deadlines"), job_id)
        pipe.zrem(self.k("published"), job_id)
        if owner is not None:
            pipe.srem(self.k("active", owner), job_id)

    def _finish_fields(
        self,
        pipe: Any,
        record: JobRecord,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Queue the commands that end a job on ``pipe`` (inside MULTI)."""
        fields: dict[str, Any] = {"status": status, "finished_at": iso_utc(time.time()), "result": result,
                                  "error": error}  # fmt: skip
        if progress is not None:
            fields["progress"] = progress
        key = self.job_key(record.id)
        pipe.hset(key, mapping=self._encode(fields))
        self._unindex(pipe, record.id, record.owner_id)
        pipe.hincrby(self.k("stats"), status.value, 1)
        self._emit(pipe, record, status, progress or record.progress, result=result, error=error,
                   hook="completed")  # fmt: skip
        pipe.expire(key, self.settings.job_ttl_seconds)
        pipe.expire(self.events_key(record.id), self.settings.job_ttl_seconds)

    def _requeue_fields(self, pipe: Any, record: JobRecord, now: float) -> None:
        """Queue the commands that put a started job back in line: at its old queue position (its
        submission sequence), attempts kept; the caller publishes a new message."""
        queued = {
            "status": JobStatus.QUEUED,
            "progress": Progress(stage="queued", total=record.progress.total),
        }
        pipe.hset(self.job_key(record.id), mapping=self._encode(queued))
        self._emit(pipe, record, JobStatus.QUEUED, queued["progress"])
        pipe.srem(self.k("running"), record.id)
        pipe.zadd(self.k("queue"), {record.id: record.seq})
        pipe.zadd(self.k("published"), {record.id: now})

    # -- heartbeats ------------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, holding: Callable[[], Collection[str]] = tuple) -> None:
        """Beat for ``worker_id`` and report the jobs it runs now (``holding()``, read in the process).

        The holdings key is watched: a :meth:`begin` of this process that lands between reading
        ``holding()`` and writing makes the beat run again, so a beat can never erase a fresh lease
        (the process lists a job before it calls begin).
        """
        holds = self.k("holds", worker_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(holds)
                    jobs = sorted(holding())
                    now = time.time()
                    pipe.multi()
                    pipe.zadd(self.k("workers"), {worker_id: now})
                    # Forget workers silent for far longer than the TTL so the set stays small.
                    pipe.zremrangebyscore(self.k("workers"), 0, now - self._worker_retention)
                    pipe.delete(holds)
                    if jobs:
                        pipe.sadd(holds, *jobs)
                        pipe.expire(holds, self._worker_retention)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def worker_gone(self, worker_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.zrem(self.k("workers"), worker_id)
            pipe.delete(self.k("holds", worker_id))
            pipe.execute()

    def worker_alive(self, worker_id: str) -> bool:
        score = self.r.zscore(self.k("workers"), worker_id)
        return score is not None and time.time() - float(score) <= self.settings.heartbeat_ttl

    def live_workers(self) -> list[str]:
        with redis_errors():
            return list(
                self.r.zrangebyscore(self.k("workers"), time.time() - self.settings.heartbeat_ttl, "+inf")
            )

    def mark_draining(self, worker_id: str) -> None:
        """Say that a worker process is shutting down (its prefork children hand their jobs back)."""
        self.r.set(self.k("draining", worker_id), "1", ex=self._worker_retention)

    def draining(self, worker_id: str) -> bool:
        return bool(self.r.exists(self.k("draining", worker_id)))

    # -- models ----------------------------------------------------------------------------------------
    def publish_model_defaults(self, defaults: dict[str, dict[str, Any]]) -> None:
        """A worker announces the defaults of the models it serves (GET /models lists them)."""
        if defaults:
            self.r.hset(self.k("models"), mapping={mid: json.dumps(d) for mid, d in defaults.items()})

    def model_defaults(self) -> dict[str, dict[str, Any]]:
        with redis_errors():
            raw = self.r.hgetall(self.k("models"))
        return {model_id: json.loads(value) for model_id, value in raw.items()}

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
