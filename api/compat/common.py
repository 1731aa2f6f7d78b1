"""What the OpenAI and AUTOMATIC1111 adapters share: submitting through the one job service, waiting
for the job synchronously, renaming our field names back to theirs, reading result images.

The adapters are translators only. A request becomes the body of ``POST /generate`` or ``POST /edit``
and goes through :class:`api.service.JobService` (validation by the shared request models, quotas,
idempotency, the queue), exactly as our own routes do; the adapter then waits for the job within its
deadline and renders the result in its client's shape (docs/COMPAT.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.deps import Services
from api.service import Submission, Upload
from ebca_common.errors import Conflict, NotFound, ServiceError, ValidationFailed
from ebca_common.jobs import JobRecord, JobStatus, unix_time
from ebca_common.keys import Caller

#: Polling of the job record while a client waits: fast at first (a small job is done in well under a
#: second on the built-in model), then at most this often (one Redis HGETALL per poll).
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.05
#: After the job's deadline the sweep fails it within a few seconds; the adapter waits this long more
#: for that record before it gives up and cancels the job itself.
DEADLINE_GRACE_SECONDS = 10.0


class JobTimedOut(ServiceError):
    """The job was not done by its deadline (the adapter answers the client now)."""

    status_code = 504
    code = "timeout"


class JobFailed(ServiceError):
    """The job failed on the worker for a reason that is not the client's."""

    status_code = 500
    code = "job_failed"


class JobCanceled(ServiceError):
    """The job was canceled (DELETE /jobs/{id}, or the A1111 interrupt) before it finished."""

    status_code = 409
    code = "canceled"


@dataclass
class Finished:
    """A succeeded job and its images' bytes, in index order."""

    record: JobRecord
    images: list[bytes]

    @property
    def seeds(self) -> list[int]:
        assert self.record.result is not None
        return [image.seed for image in self.record.result.images]


def rename_field(exc: ValidationFailed, names: Mapping[str, str]) -> ValidationFailed:
    """``exc`` with its field named as the adapter's client calls it: the first segment of the dotted
    path is looked up in ``names`` (ours -> theirs: num_images -> n), the message's leading
    ``field:`` follows."""
    match = re.match(r"[A-Za-z_]+", exc.field or "")
    if match is None or match.group(0) not in names:
        return exc
    assert exc.field is not None
    field = names[match.group(0)] + exc.field[match.end() :]  # edits[0].alpha -> ebca.edits[0].alpha
    message = exc.message
    if message.startswith(f"{exc.field}:"):
        message = f"{field}:{message[len(exc.field) + 1 :]}"
    return ValidationFailed(message, field=field)


async def submit_generate(
    services: Services, body: dict[str, Any], caller: Caller, names: Mapping[str, str]
) -> Submission:
    """``body`` (a POST /generate body) through the job service; 422s name the adapter's fields."""
    try:
        return await run_in_threadpool(services.jobs.generate, body, None, caller)
    except ValidationFailed as exc:
        raise rename_field(exc, names) from None


async def submit_inpaint(
    services: Services,
    body: dict[str, Any],
    uploads: dict[str, Upload],
    caller: Caller,
    names: Mapping[str, str],
) -> Submission:
    """``body`` (a POST /edit body, mode inpaint) with its uploads through the job service."""
    try:
        return await run_in_threadpool(services.jobs.edit, body, uploads, None, caller)
    except ValidationFailed as exc:
        raise rename_field(exc, names) from None


async def wait_for(request: Request, services: Services, job_id: str) -> JobRecord:
    """The job once it is final. A client that disconnects meanwhile cancels it; past its deadline
    (plus the sweep's grace) the job is canceled and the client gets a timeout."""
    store = services.store
    interval = POLL_FIRST_SECONDS
    # A task that ends when the client goes away. It awaits the next ASGI message (after the body,
    # only http.disconnect comes); Request.is_disconnected() cannot see it through the app's
    # BaseHTTPMiddleware, whose receive always loses to the immediate cancel that method uses.
    gone = asyncio.create_task(_disconnect(request))
    try:
        while True:
            record = await run_in_threadpool(store.record, job_id)
            if record is None:  # expired or removed: nothing left to wait for
                raise NotFound(f"job {job_id!r} is gone")
            if record.status.terminal:
                return record
            if gone.done():
                await _cancel(services, job_id)
                raise JobCanceled(f"the client went away; job {job_id} was canceled")
            deadline = unix_time(record.deadline_at) if record.deadline_at else None
            if deadline is not None and time.time() > deadline + DEADLINE_GRACE_SECONDS:
                await _cancel(services, job_id)
                raise JobTimedOut(f"job {job_id} was not done by its deadline {record.deadline_at}")
            await asyncio.wait({gone}, timeout=interval)  # the poll interval, cut short by a disconnect
            interval = min(POLL_MAX_SECONDS, interval * 2)
    finally:
        gone.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel(services: Services, job_id: str) -> None:
    with contextlib.suppress(Conflict, NotFound):  # it finished (or went) meanwhile
        await run_in_threadpool(services.store.cancel, job_id)


async def finish(request: Request, services: Services, job_id: str, names: Mapping[str, str]) -> Finished:
    """Wait for the job and read its images; a failed or canceled job raises the matching error."""
    record = await wait_for(request, services, job_id)
    if record.status == JobStatus.CANCELED:
        raise JobCanceled(f"job {job_id} was canceled")
    if record.status == JobStatus.FAILED or record.result is None:
        raise job_error(record, names)
    keys = [image.key for image in record.result.images]
    images = await run_in_threadpool(lambda: [services.storage.get(key) for key in keys])
    return Finished(record, images)


def job_error(record: JobRecord, names: Mapping[str, str]) -> ServiceError:
    """The error a failed job answers: the worker's invalid_input is the client's 422 (its field
    renamed), a timeout a 504, anything else a 500 with the job's message."""
    error = record.error
    if error is None:
        return JobFailed(f"job {record.id} ended {record.status.value} without a result")
    if error.code == "invalid_input":
        return rename_field(ValidationFailed(error.message, field=error.field), names)
    if error.code == "timeout":
        return JobTimedOut(error.message)
    return JobFailed(f"job {record.id} failed ({error.code}): {error.message}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
