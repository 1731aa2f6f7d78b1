"""GET /jobs/{id}/events: a job's live events as ``text/event-stream`` (docs/API.md, "Live events").

The events are the job's Redis stream (``{p}:events:{id}``, written by the job store in the same
transaction as each state change), read with XREAD BLOCK on an asyncio Redis connection: every api
replica serves every job, a stream costs no thread, and a slow or vanished client only delays its own
connection, never a worker (which only appends to the stream). While the job is queued the reader
recomputes its queue position every POSITION_TICK_SECONDS and sends a ``queued`` event when it moved
(other jobs starting or ending change it without an event of this job).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from api.auth import OwnedJob
from api.errors import ERRORS
from ebca_common.errors import ValidationFailed
from ebca_common.jobs import JobRecord, JobStatus
from ebca_common.settings import Settings
from ebca_common.store import JobStore

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: How often a queued job's position is recomputed (and how long one XREAD blocks at most).
POSITION_TICK_SECONDS = 1.0
#: A Redis stream id, what Last-Event-ID must be.
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
#: Events read per XREAD.
BATCH = 100


def async_redis(settings: Settings) -> aioredis.Redis:
    """The api's asyncio Redis client for event streams (its socket timeout outlasts a blocking read)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=settings.redis_timeout_seconds,
        socket_timeout=settings.redis_timeout_seconds + POSITION_TICK_SECONDS,
        health_check_interval=30,
    )


def frame(event_id: str, status: str, data: dict[str, Any]) -> str:
    """One event: ``id`` the stream id, ``event`` the job status, ``data`` the JSON on one line."""
    return f"id: {event_id}\nevent: {status}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


KEEP_ALIVE = ": keep-alive\n\n"


class EventStream:
    """The events of one job for one client, from after ``last_id`` (None: the job's state now first)."""

    def __init__(self, r: aioredis.Redis, store: JobStore, settings: Settings, job_id: str) -> None:
        self.r = r
        self.store = store
        self.job_id = job_id
        self.key = store.events_key(job_id)
        self.job_key = store.job_key(job_id)
        self.queue_key = store.k("queue")
        self.keepalive = settings.events_keepalive_seconds
        self.tick = min(POSITION_TICK_SECONDS, self.keepalive)
        self.position: int | None = None
        self.queued = False

    async def _state(self) -> tuple[str | None, JobRecord | None, int | None]:
        """The last event id, the record and its queue position, read at one instant (MULTI)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xrevrange(self.key, count=1)
            pipe.hgetall(self.job_key)
            pipe.zrank(self.queue_key, self.job_id)
            tail, raw, rank = await pipe.execute()
        record = self.store.decode(raw) if raw else None
        return (tail[0][0] if tail else None), record, rank

    def _snapshot(self, event_id: str, record: JobRecord, rank: int | None) -> str:
        data = record.event_data(time.time())
        self.queued = record.status == JobStatus.QUEUED
        if self.queued and rank is not None:
            data["queue_position"] = self.position = int(rank)
        return frame(event_id, record.status.value, data)

    async def events(self, last_id: str | None) -> AsyncIterator[str]:
        if last_id is None:
            tail, record, rank = await self._state()
            if record is None:
                return
            last_id = tail or "0-0"
            yield self._snapshot(last_id, record, rank)
            if record.status.terminal:
                return
        idle_since = time.monotonic()
        closing = False
        while True:
            # Block only while the job is live; once its record says it ended, one last look.
            block = None if closing else int(self.tick * 1000)
            reply = await self.r.xread({self.key: last_id}, count=BATCH, block=block)
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    status = JobStatus(fields["status"])
                    data = json.loads(fields["data"])
                    self.queued = status == JobStatus.QUEUED
                    if self.queued:
                        rank = await self.r.zrank(self.queue_key, self.job_id)
                        if rank is not None:
                            data["queue_position"] = self.position = int(rank)
                    yield frame(entry_id, status.value, data)
                    if status.terminal:
                        return
                    idle_since = time.monotonic()
            if reply:
                continue
            _tail, record, rank = await self._state()
            if record is None:  # expired or removed: nothing more will come
                return
            if record.status.terminal:
                if closing:  # its terminal event is gone from the stream (trimmed): the record's state
                    yield self._snapshot(last_id, record, rank)
                    return
                closing = True
                continue
            if record.status == JobStatus.QUEUED and rank is not None and rank != self.position:
                yield self._snapshot(last_id, record, rank)
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.keepalive:
                yield KEEP_ALIVE
                idle_since = time.monotonic()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The job's events (text/event-stream).", "content": {"text/event-stream": {}}},
        **ERRORS,
    },
    summary="A job's live events (server-sent events)",
)
async def job_events(
    record: OwnedJob,
    request: Request,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this event id (what the stream sent)."),
    ] = None,
) -> StreamingResponse:
    """Without Last-Event-ID the first event is the job's state now; the stream ends after the
    terminal event, with keep-alive comments while idle."""
    if last_event_id is not None:
        last_event_id = last_event_id.strip()
        if not EVENT_ID.fullmatch(last_event_id):
            raise ValidationFailed(
                "Last-Event-ID: not an event id of this stream (send the id: of the last event seen)",
                field="Last-Event-ID",
            )
    services = request.app.state.services
    stream = EventStream(services.aredis, services.store, services.settings, record.id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream.events(last_event_id), media_type="text/event-stream", headers=headers)
