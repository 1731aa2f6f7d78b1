"""The Redis job store: job records, queue order, idempotency keys, cancel flags, leases, deadlines.

Layout (``{p}`` = EBCA_KEY_PREFIX):
- ``{p}:job:{id}``     hash, one JSON value per field of the :class:`~ebca_common.jobs.JobRecord` (so
                        progress and the cancel flag are one-field HSETs that race nothing else)
- ``{p}:queue``        sorted set of queued job ids by submission sequence (queue_position = rank)
- ``{p}:seq``          counter giving that sequence
- ``{p}:running``      set of running job ids
- ``{p}:deadlines``    sorted set job id -> deadline (unix seconds) of jobs not yet finished
- ``{p}:published``    sorted set job id -> when its broker message was last published or seen (queued jobs)
- ``{p}:idem:{owner}:{key}`` JSON {fingerprint, job_id} of an Idempotency-Key (scoped per API key)
- ``{p}:jobs``         sorted set ``{owner}/{id}`` by submission sequence: every job record (GET /jobs)
- ``{p}:owned:{owner}`` sorted set of the job ids of one API key by submission sequence
- ``{p}:active:{owner}`` set of that key's queued and running job ids (its active-jobs quota)
- ``{p}:workers``      sorted set worker id -> last heartbeat (unix seconds)
- ``{p}:holds:{worker}`` set of the job ids that worker process reports running (its heartbeat rewrites it)
- ``{p}:draining:{worker}`` present while that worker process is shutting down
- ``{p}:stats``        hash status -> number of jobs that reached it (Prometheus counters)
- ``{p}:hist:{name}``  hash of histogram buckets, sum and count (job and step durations)
- ``{p}:models``       hash model id -> JSON defaults, published by the workers that serve it
- ``{p}:events:{id}``  stream of the job's live events (fields ``status``, ``data`` JSON; the entry id
                        is the SSE id), appended in the transaction of each state change, capped at
                        EBCA_EVENTS_MAXLEN and expiring with the finished record
- ``{p}:webhooks:msgs`` hash webhook-id -> pending delivery (job id, fixed body, created, attempts)
- ``{p}:webhooks:due``  sorted set webhook-id -> when the delivery is next due (api/webhooks.py)
- ``{p}:webhooks:throttle:{id}`` present for a second after a progress delivery of the job was queued
- ``{p}:webhooks:secret`` the service secret of webhook signatures when EBCA_WEBHOOK_SECRET is unset

State changes that race (cancel vs start, two deliveries of one job, two sweeps) run in WATCH/MULTI
transactions on the job's hash; per-step progress is a Lua script that writes only for the lease holder.

Leases (docs/DEPLOY.md, "Crash recovery"): a running job belongs to the worker process named by its
``lease`` while that process's heartbeat is younger than EBCA_HEARTBEAT_TTL and it lists the job in its
``holds``. :meth:`JobStore.sweep` puts jobs whose lease has lapsed back in line, ends jobs past their
deadline and re-publishes queued jobs whose broker message is gone; the broker only delivers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis
from redis.exceptions import WatchError

from ebca_common.errors import Conflict, IdempotencyConflict, NotFound, RateLimited
from ebca_common.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    JobStatus,
    Progress,
    WebhookSpec,
    event_data,
    iso_utc,
)
from ebca_common.keys import ANONYMOUS
from ebca_common.settings import Settings
from ebca_common.store_base import HISTOGRAM_BUCKETS, StoreBase, redis_errors
from ebca_common.store_leases import BROKER_SCAN_SECONDS, LeaseRules, SettleOutcome

__all__ = [
    "BROKER_SCAN_SECONDS",
    "HISTOGRAM_BUCKETS",
    "Begin",
    "JobStore",
    "SettleOutcome",
    "StepVerdict",
    "StoreBase",
    "redis_errors",
]

BeginOutcome = Literal[
    "run", "missing", "terminal", "duplicate", "exhausted", "canceled", "timeout", "not_queued"
]
#: What a worker should do after reporting a step: go on, stop for a cancel, or stop because the job is
#: no longer its own (the sweep gave it to another worker, or ended it).
StepVerdict = Literal["run", "cancel", "lost"]

#: Index entries GET /jobs reads for one page at most (a rare status among many jobs: the client
#: follows the cursor).
LIST_SCAN_LIMIT = 1000

#: Progress of a running job, written only while the caller holds its lease (one round trip per step),
#: with its live event: at most one per EVENT_INTERVAL_MS, except the first of a stage and the last step
#: (compared with the previous event's stream id, which is Redis time), and with a progress webhook
#: delivery at most once per WEBHOOK_PROGRESS_MS when the job asked for those.
#: KEYS: the job hash, its event stream, its webhook throttle key, the delivery hash, the due set.
#: ARGV: encoded "running", encoded lease, encoded progress, encoded true, event data, stage, step,
#: total, events maxlen, delivery id, delivery, now (unix seconds).
_PROGRESS_SCRIPT = """
local v = redis.call('HMGET', KEYS[1], 'status', 'lease', 'cancel_requested', 'progress', 'webhook')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] then return 'lost' end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
local emit = true
if v[4] and tonumber(ARGV[7]) < tonumber(ARGV[8]) and cjson.decode(v[4]).stage == ARGV[6] then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if last then
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if now_ms - tonumber(string.match(last[1], '^(%d+)')) < EVENT_INTERVAL_MS then emit = false end
  end
end
if emit then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'status', 'running', 'data', ARGV[5])
  if v[5] and v[5] ~= 'null' then
    for _, name in ipairs(cjson.decode(v[5]).events) do
      if name == 'progress' and redis.call('SET', KEYS[3], '1', 'NX', 'PX', WEBHOOK_PROGRESS_MS) then
        redis.call('HSET', KEYS[4], ARGV[10], ARGV[11])
        redis.call('ZADD', KEYS[5], ARGV[12], ARGV[10])
        redis.call('HINCRBY', KEYS[1], 'webhook_pending', 1)
      end
    end
  end
end
if v[3] == ARGV[4] then return 'cancel' end
return 'run'
"""
#: Live progress events per job: at most 4 a second (SSE clients render them; more is noise).
EVENT_INTERVAL_MS = 250
#: Progress webhook deliveries per job: at most one a second (each is an HTTP request to the receiver).
WEBHOOK_PROGRESS_MS = 1000
_PROGRESS_SCRIPT = _PROGRESS_SCRIPT.replace("EVENT_INTERVAL_MS", str(EVENT_INTERVAL_MS)).replace(
    "WEBHOOK_PROGRESS_MS", str(WEBHOOK_PROGRESS_MS)
)


@dataclass
class Begin:
    """What a worker should do with a delivery of a job."""

    outcome: BeginOutcome
    record: JobRecord | None = None


class JobStore(LeaseRules):
    """Job records: reads, creation with idempotency, cancel, and the worker-side lifecycle."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        self._progress_script = client.register_script(_PROGRESS_SCRIPT)

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

    def list_jobs(
        self, owner: str | None, *, status: JobStatus | None, before: int | None, limit: int
    ) -> tuple[list[Job], int | None]:
        """Jobs newest first (``owner``'s, or every job when None), optionally of one status, with a
        submission sequence below ``before``; returns the page and the cursor of the next one (None at
        the end). Entries whose record expired are dropped from the index on the way."""
        key = self.k("jobs") if owner is None else self.k("owned", owner)
        top = "+inf" if before is None else f"({before}"
        page: list[Job] = []
        # Records are read in batches; a status filter may skip many, so a page may take a few batches
        # (bounded: a cursor comes back after SCAN_LIMIT entries even if the page is not full).
        scanned = 0
        while len(page) < limit and scanned < LIST_SCAN_LIMIT:
            with redis_errors():
                batch = self.r.zrevrangebyscore(key, top, "-inf", start=0, num=limit, withscores=True)
            if not batch:
                return page, None
            members = [str(m) for m, _ in batch]
            ids = [m.rsplit("/", 1)[-1] for m in members]
            with redis_errors(), self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.job_key(job_id))
                raws = pipe.execute()
            gone = [m for m, raw in zip(members, raws, strict=True) if not raw]
            if gone:
                with redis_errors():
                    self.r.zrem(key, *gone)
            for (_member, score), raw in zip(batch, raws, strict=True):
                scanned += 1
                top = f"({int(score)}"
                if not raw:
                    continue
                record = self._decode(raw)
                if status is None or record.status == status:
                    page.append(self.view(record))
                if len(page) == limit:
                    break
        return page, int(top[1:])

    def active_jobs(self, owner: str) -> int:
        """How many of ``owner``'s jobs are queued or running, after dropping ids that are no longer
        (a submission that failed after its quota was reserved)."""
        key = self.k("active", owner)
        with redis_errors():
            ids = sorted(self.r.smembers(key))
            if not ids:
                return 0
            with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(self.job_key(job_id), "status")
                statuses = pipe.execute()
            stale = [
                job_id
                for job_id, raw in zip(ids, statuses, strict=True)
                if raw is None or self._decode_field("status", raw).terminal
            ]
            if stale:
                self.r.srem(key, *stale)
        return len(ids) - len(stale)

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
        timeout_seconds: int | None = None,
        owner: str = ANONYMOUS,
        webhook: WebhookSpec | None = None,
    ) -> tuple[Job, bool]:
        """Create a queued job owned by the API key ``owner``; return (job, created). ``idempotency``
        is (key, body fingerprint), scoped to ``owner``; ``timeout_seconds`` sets ``deadline_at``.

        With an Idempotency-Key already used: the same fingerprint returns the existing job (created
        False), another fingerprint raises :class:`IdempotencyConflict`.
        """
        job_id = job_id or uuid.uuid4().hex
        idem_key = self.k("idem", owner, idempotency[0]) if idempotency else None
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
                    now = time.time()
                    deadline = None if timeout_seconds is None else now + timeout_seconds
                    record = JobRecord(
                        id=job_id,
                        kind=kind,  # type: ignore[arg-type]
                        mode=mode,  # type: ignore[arg-type]
                        status=JobStatus.QUEUED,
                        progress=Progress(stage="queued", step=0, total=total_steps),
                        seq=seq,
                        created_at=iso_utc(now),
                        deadline_at=None if deadline is None else iso_utc(deadline),
                        request=request,
                        plan=plan,
                        inputs=inputs or {},
                        owner=owner,
                        webhook=webhook,
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
                    pipe.zadd(self.k("jobs"), {f"{owner}/{job_id}": seq})
                    pipe.zadd(self.k("owned", owner), {job_id: seq})
                    pipe.sadd(self.k("active", owner), job_id)
                    # Its message is due from now: the sweep looks for it in the broker after the grace.
                    pipe.zadd(self.k("published"), {job_id: now})
                    if deadline is not None:
                        pipe.zadd(self.k("deadlines"), {job_id: deadline})
                    pipe.hincrby(self.k("stats"), JobStatus.QUEUED.value, 1)
                    self._emit(pipe, record, JobStatus.QUEUED, record.progress)
                    pipe.execute()
                    return self.view(record), True
                except WatchError:
                    continue

    def mark_published(self, job_id: str) -> None:
        """The job's message was just published (restarts its grace before the broker is searched)."""
        with redis_errors():
            self.r.zadd(self.k("published"), {job_id: time.time()}, xx=True)

    def lookup_idempotent(self, key: str, fingerprint: str, owner: str = ANONYMOUS) -> Job | None:
        """The job an Idempotency-Key of ``owner`` already made (same fingerprint), None if unused; 409
        otherwise."""
        with redis_errors():
            raw = self.r.get(self.k("idem", owner, key))
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

    def discard(self, job_id: str, idempotency_key: str | None = None, owner: str = ANONYMOUS) -> None:
        """Remove a job that was never handed to the queue (the broker refused it)."""
        with redis_errors(), self.r.pipeline() as pipe:
            pipe.delete(self.job_key(job_id), self.events_key(job_id))
            self._unindex(pipe, job_id, owner)
            pipe.zrem(self.k("jobs"), f"{owner}/{job_id}")
            pipe.zrem(self.k("owned", owner), job_id)
            pipe.hincrby(self.k("stats"), JobStatus.QUEUED.value, -1)
            if idempotency_key:
                pipe.delete(self.k("idem", owner, idempotency_key))
            pipe.execute()

    # -- cancel ----------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """Queued: canceled now. Running: flag it (the worker stops at the next step). Else 409."""

        def decide(record: JobRecord | None) -> tuple[None, Callable[[Any], None]]:
            if record is None:
                raise NotFound(f"job {job_id!r} not found")
            if record.status.terminal:
                raise Conflict(f"job {job_id!r} already finished ({record.status.value}); nothing to cancel")

            def write(pipe: Any) -> None:
                pipe.hset(self.job_key(job_id), mapping=self._encode({"cancel_requested": True}))
                if record.status == JobStatus.QUEUED:
                    # Never started: canceled at once; its queue message is dropped on delivery.
                    self._finish_fields(pipe, record, JobStatus.CANCELED)

            return None, write

        with redis_errors():
            self._transact(job_id, decide)
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with redis_errors():
            raw = self.r.hget(self.job_key(job_id), "cancel_requested")
        return raw is not None and self._decode_field("cancel_requested", raw)

    # -- worker side ---------------------------------------------------------------------------------
    def queued_records(self, limit: int) -> list[JobRecord]:
        """The first ``limit`` queued jobs in queue order (a worker looking for jobs to batch with)."""
        with redis_errors():
            ids = self.r.zrange(self.k("queue"), 0, limit - 1)
            with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.job_key(job_id))
                raws = pipe.execute()
        return [self._decode(raw) for raw in raws if raw]

    def begin(self, job_id: str, worker_id: str, *, queued_only: bool = False) -> Begin:
        """Claim a delivered job for ``worker_id`` (a worker process id): take its lease, count the attempt.

        The one path for every delivery. A job running under another worker's live lease makes this a
        duplicate, dropped by the caller: the broker restored a message (visibility timeout, a Redis
        restart) or the sweep re-published a job that has started since; the holder finishes it, and if
        it dies the sweep puts the job back in line. A job that must not run (:meth:`_must_end`) ends
        here. The caller must already list ``job_id`` in the holdings its heartbeat reports.

        ``queued_only``: a worker claiming a queued job for its batch (not a delivery): any job that is
        not queued any more is ``not_queued`` and left alone. The claim is the same transaction, so a
        delivery of the claimed job to another worker finds it running here and drops it.
        """

        def decide(record: JobRecord | None) -> tuple[Begin, Callable[[Any], None] | None]:
            if record is None:
                return Begin("missing"), None
            if record.status.terminal:
                return Begin("terminal", record), None
            if queued_only and record.status != JobStatus.QUEUED:
                return Begin("not_queued", record), None
            now = time.time()
            if (
                record.status == JobStatus.RUNNING
                and record.lease != worker_id
                and self.lease_live(record, now)
            ):
                return Begin("duplicate", record), None
            end = self._must_end(record, now)
            if end is not None:
                return Begin(end.outcome, record), self._end(record, end)
            started = {
                "status": JobStatus.RUNNING,
                "attempts": record.attempts + 1,
                "lease": worker_id,
                "started_at": iso_utc(now),
                "progress": Progress(stage="loading", total=record.progress.total),
            }

            def write(pipe: Any) -> None:
                pipe.hset(self.job_key(job_id), mapping=self._encode(started))
                self._emit(pipe, record, JobStatus.RUNNING, started["progress"], hook="start")
                pipe.zrem(self.k("queue"), job_id)
                pipe.zrem(self.k("published"), job_id)
                pipe.sadd(self.k("running"), job_id)
                # The lease holds from this moment, before this process's next heartbeat reports it.
                pipe.sadd(self.k("holds", worker_id), job_id)
                pipe.expire(self.k("holds", worker_id), self._worker_retention)
                if record.attempts == 0:  # jobs that reached running: a recovered job counts once
                    pipe.hincrby(self.k("stats"), JobStatus.RUNNING.value, 1)

            return Begin("run", record.model_copy(update=started)), write

        return self._transact(job_id, decide)

    def resolve_request(self, job_id: str, data: dict[str, Any], total: int, field: str = "request") -> None:
        """Record the request as it runs (the model's defaults filled in) and the job's step total.

        ``field`` is ``plan`` for a synthetic edit, whose ``request`` is the edit the client sent.
        """
        key = self.job_key(job_id)
        raw = self.r.hget(key, "progress")
        current = self._decode_field("progress", raw) if raw else Progress(stage="loading")
        progress = current.model_copy(update={"total": total})
        self.r.hset(key, mapping=self._encode({field: data, "progress": progress}))

    def progress(self, job_id: str, lease: str, stage: str, step: int, total: int) -> StepVerdict:
        """Record progress if ``lease`` still holds the job; say whether to go on (one round trip)."""
        return self.progress_many(lease, [(job_id, stage, step, total)])[0]

    def progress_many(self, lease: str, entries: list[tuple[str, str, int, int]]) -> list[StepVerdict]:
        """:meth:`progress` of the jobs of one batch, ``(job_id, stage, step, total)`` each, in one round
        trip; a verdict per job."""
        if not entries:
            return []
        with self.r.pipeline(transaction=False) as pipe:
            for job_id, stage, step, total in entries:
                keys, args = self._progress_call(job_id, lease, stage, step, total)
                self._progress_script(keys=keys, args=args, client=pipe)
            return list(pipe.execute())

    def _progress_call(
        self, job_id: str, lease: str, stage: str, step: int, total: int
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the progress script for one job (record, event, webhook)."""
        progress = Progress(stage=stage, step=step, total=total)  # type: ignore[arg-type]
        encoded = self._encode(
            {"status": JobStatus.RUNNING, "lease": lease, "progress": progress, "cancel_requested": True}
        )
        now = time.time()
        data = event_data(job_id, JobStatus.RUNNING, progress, None, None, now)
        # Built on every call, kept only when the script decides a delivery is due (it knows the hook).
        msg_id, msg = self.webhook_message(job_id, "progress", data, now)
        keys = [self.job_key(job_id), self.events_key(job_id), self.k("webhooks", "throttle", job_id),
                self.k("webhooks", "msgs"), self.k("webhooks", "due")]  # fmt: skip
        args = [encoded["status"], encoded["lease"], encoded["progress"], encoded["cancel_requested"],
                json.dumps(data), stage, step, total, self.settings.events_maxlen, msg_id, msg,
                now]  # fmt: skip
        return keys, args

    def _held_by(self, lease: str, record: JobRecord | None) -> bool:
        return record is not None and record.status == JobStatus.RUNNING and record.lease == lease

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        lease: str,
        result: JobResult | None = None,
        error: JobError | None = None,
        progress: Progress | None = None,
    ) -> bool:
        """End a running job held by ``lease``; False, writing nothing, when that worker lost it."""

        def decide(record: JobRecord | None) -> tuple[bool, Callable[[Any], None] | None]:
            if not self._held_by(lease, record):
                return False, None
            assert record is not None
            return True, lambda pipe: self._finish_fields(
                pipe, record, status, result=result, error=error, progress=progress
            )

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def release(self, job_id: str, lease: str) -> bool:
        """Hand a running job held by ``lease`` back to the queue (its worker is stopping); the caller
        requeues its message. False when that worker no longer held it."""

        def decide(record: JobRecord | None) -> tuple[bool, Callable[[Any], None] | None]:
            if not self._held_by(lease, record):
                return False, None
            assert record is not None
            return True, lambda pipe: self._requeue_fields(pipe, record, time.time())

        return self._transact(job_id, decide)  # type: ignore[no-any-return]
