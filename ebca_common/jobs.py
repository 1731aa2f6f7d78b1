"""Job states, the job record the store keeps and the job document the api returns (docs/API.md, "Jobs").

:class:`JobRecord` is the one shape of a job inside the service: the api writes it, the worker reads and
updates it, and :meth:`JobRecord.view` derives the public :class:`Job` from it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from ebca_common.keys import ANONYMOUS


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """A final status: the job never changes again (the one definition; every check uses it)."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


Stage = Literal["queued", "loading", "inverting", "denoising", "decoding", "uploading", "done"]
JobKind = Literal["generate", "edit"]
EditMode = Literal["inpaint", "real", "synthetic"]
#: Stable failure codes of a job (docs/API.md, "error").
JobErrorCode = Literal[
    "model_not_found", "out_of_memory", "invalid_input", "worker_lost", "timeout", "internal_error"
]
#: What a webhook may be told (docs/API.md, "Webhooks"): the job started running (each attempt),
#: made progress (at most once a second), or reached its final status.
WebhookEvent = Literal["start", "progress", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("start", "progress", "completed")


def iso_utc(timestamp: float) -> str:
    """A unix time as ISO 8601 UTC with a Z, to the millisecond (every timestamp of a job)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow() -> str:
    return iso_utc(time.time())


def unix_time(iso: str) -> float:
    """The unix time of an :func:`iso_utc` timestamp."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Progress(BaseModel):
    stage: Stage = Field(..., description="What the job is doing now.")
    step: int = Field(0, ge=0, description="Denoising steps done.")
    total: int = Field(0, ge=0, description="Denoising steps in all.")


class ImageResult(BaseModel):
    index: int = Field(..., description="Position of the image in the job (image i used seed + i).")
    url: str = Field(..., description="Where to download it: /jobs/{id}/images/{n}.")
    seed: int = Field(..., description="The seed of this image.")
    width: int = Field(..., description="Width in pixels.")
    height: int = Field(..., description="Height in pixels.")
    content_type: str = Field(..., description="MIME type: image/png, image/jpeg or image/webp.")
    sha256: str = Field(..., description="Hex digest of the stored bytes.")
    key: str = Field(..., description="Storage key of the image (jobs/{id}/{n}.{ext}).")
    settings_endpoint: str = Field(
        ..., description="The endpoint that `settings` is a body for (/generate or /edit)."
    )
    settings: dict[str, Any] = Field(
        ..., description="A complete request body (num_images 1, this image's seed) that reproduces it."
    )


class JobResult(BaseModel):
    images: list[ImageResult] = Field(..., description="The result images, in index order.")


class JobError(BaseModel):
    code: JobErrorCode = Field(..., description="Stable failure code.")
    message: str = Field(..., description="What went wrong, for humans.")
    field: str | None = Field(None, description="The request field at fault (invalid_input), if one is.")


class WebhookSpec(BaseModel):
    """Where a job's webhook deliveries go and which events it asked for (validated by the request
    models, ebca_common/specs.py)."""

    url: str = Field(..., description="The receiver's URL.")
    events: list[WebhookEvent] = Field(..., description="The events delivered: start, progress, completed.")


class WebhookDeliveries(BaseModel):
    delivered: int = Field(0, description="Deliveries the receiver accepted (a 2xx answer).")
    pending: int = Field(0, description="Deliveries queued or being retried.")
    failed: int = Field(0, description="Deliveries given up after EBCA_WEBHOOK_RETRY_SECONDS of retries.")
    last_error: str | None = Field(None, description="Why the latest failed attempt failed.")


class WebhookState(WebhookSpec):
    """A job's webhook and how its deliveries went (GET /jobs/{id})."""

    deliveries: WebhookDeliveries = Field(..., description="Delivery counts.")


class Job(BaseModel):
    """The public view of a job."""

    id: str = Field(..., description="Job id.")
    url: str = Field(..., description="This document's path: /jobs/{id}.")
    kind: JobKind = Field(..., description="generate (POST /generate) or edit (POST /edit).")
    mode: EditMode | None = Field(None, description="The edit mode; null for generate jobs.")
    status: JobStatus = Field(..., description="queued, running, succeeded, failed or canceled.")
    progress: Progress = Field(..., description="Stage and denoising step of the current attempt.")
    queue_position: int | None = Field(None, description="0 = next to run; null unless queued.")
    owner: str | None = Field(None, description="The id of the API key that created the job.")
    attempts: int = Field(0, description="How many times a worker started this job.")
    cancel_requested: bool = Field(False, description="A cancel was asked for; it stops at the next step.")
    created_at: str = Field(..., description="When the api accepted the job (ISO 8601, UTC).")
    started_at: str | None = Field(None, description="When the latest attempt started on a worker.")
    finished_at: str | None = Field(None, description="When the job reached its final status.")
    deadline_at: str | None = Field(
        None, description="created_at + timeout_seconds: a job not done by then fails with code timeout."
    )
    request: dict[str, Any] = Field(..., description="The validated request, defaults filled in.")
    result: JobResult | None = Field(None, description="The images, once succeeded.")
    error: JobError | None = Field(None, description="Why it failed, once failed.")
    webhook: WebhookState | None = Field(None, description="The request's webhook and its deliveries.")


class JobRecord(BaseModel):
    """A job as the store keeps it: the public fields plus what only the service needs.

    Stored as a Redis hash with one JSON value per field (ebca_common/store.py), so that the frequent
    one-field writes (progress every step, the cancel flag) are single atomic HSETs that never rewrite
    or race the rest of the record.
    """

    id: str
    kind: JobKind
    mode: EditMode | None = None
    status: JobStatus
    progress: Progress
    #: Submission sequence: the job's score in the queue (queue_position = rank).
    seq: int
    attempts: int = 0
    cancel_requested: bool = False
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    #: The validated request, defaults filled in (what GET /jobs/{id} shows).
    request: dict[str, Any]
    #: What the worker runs when it differs from ``request`` (a synthetic edit: its source's generate
    #: request with the edits); None otherwise.
    plan: dict[str, Any] | None = None
    #: Uploaded inputs: name ("image", "mask") -> storage key.
    inputs: dict[str, str] = Field(default_factory=dict)
    result: JobResult | None = None
    error: JobError | None = None
    #: The id of the API key that created the job ("anonymous" while EBCA_AUTH=off); None only on
    #: records made before API keys existed (they count as the anonymous user's).
    owner: str | None = None
    #: The worker process (``host:pid``) running or last running the job; it holds the job while its
    #: heartbeat in ``{p}:workers`` is fresh.
    lease: str | None = None
    #: created_at + the request's timeout_seconds (ISO 8601 UTC); None for records made before deadlines.
    deadline_at: str | None = None
    #: The request's webhook (taken out of ``request``: it is no part of what reproduces an image).
    webhook: WebhookSpec | None = None
    # Delivery counters: plain JSON integers, so the dispatcher bumps them with HINCRBY.
    webhook_delivered: int = 0
    webhook_pending: int = 0
    webhook_failed: int = 0
    webhook_last_error: str | None = None

    @property
    def owner_id(self) -> str:
        return self.owner or ANONYMOUS

    def past_deadline(self, now: float) -> bool:
        """Whether the job's time is up at unix time ``now`` (the one deadline rule: store and worker)."""
        return self.deadline_at is not None and now >= unix_time(self.deadline_at)

    def timeout_error(self) -> JobError:
        seconds = self.request.get("timeout_seconds")
        where = "running" if self.status == JobStatus.RUNNING else "still queued"
        return JobError(
            code="timeout",
            message=f"the job was {where} at its deadline {self.deadline_at} (timeout_seconds={seconds})",
        )

    def view(self, queue_position: int | None) -> Job:
        """The public document of this job (``queue_position`` from the queue, for a queued job)."""
        return Job(
            id=self.id,
            url=f"/jobs/{self.id}",
            kind=self.kind,
            mode=self.mode,
            status=self.status,
            progress=self.progress,
            queue_position=queue_position if self.status == JobStatus.QUEUED else None,
            owner=self.owner_id,
            attempts=self.attempts,
            cancel_requested=self.cancel_requested,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            deadline_at=self.deadline_at,
            request=self.request,
            result=self.result,
            error=self.error,
            webhook=self._webhook_state(),
        )

    def _webhook_state(self) -> WebhookState | None:
        if self.webhook is None:
            return None
        counts = WebhookDeliveries(
            delivered=self.webhook_delivered,
            pending=self.webhook_pending,
            failed=self.webhook_failed,
            last_error=self.webhook_last_error,
        )
        return WebhookState(url=self.webhook.url, events=self.webhook.events, deliveries=counts)

    def event_data(self, at: float) -> dict[str, Any]:
        """The payload of a live event (and a webhook's ``data``) for this record as it is now
        (docs/API.md, "Live events"); the reader adds ``queue_position`` for a queued job."""
        return event_data(self.id, self.status, self.progress, self.result, self.error, at)


def event_data(
    job_id: str,
    status: JobStatus,
    progress: Progress,
    result: JobResult | None,
    error: JobError | None,
    at: float,
) -> dict[str, Any]:
    """One job event's JSON: ``{job_id, status, at, progress, result?, error?}`` (the one shape)."""
    # model_validate: callers may pass the plain dicts the store's writers accept.
    data: dict[str, Any] = {
        "job_id": job_id,
        "status": JobStatus(status).value,
        "at": iso_utc(at),
        "progress": Progress.model_validate(progress).model_dump(mode="json"),
    }
    if result is not None:
        data["result"] = JobResult.model_validate(result).model_dump(mode="json")
    if error is not None:
        data["error"] = JobError.model_validate(error).model_dump(mode="json")
    return data
