"""Typed request and response models of the REST contract (docs/API.md).

Request models hold types only, not the server's ranges: the API is the one authority on what is
valid, and its 422 answers (surfaced as ``APIError`` with the field) are more precise than a second
copy of the rules here could stay. The submit bodies are strict about JSON types as the API is (an
integer field takes an int, not ``"5"`` or ``True``), so a wrong type fails before anything is sent.
Response models ignore unknown fields so that a newer server does not break an older client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        # Fields left None take the server's defaults (docs/API.md), so the client never copies them.
        return self.model_dump(mode="json", exclude_none=True)


class ScheduleSpec(_Request):
    """Time schedule of the energy terms (docs/EBCA.md, "Step-size schedules")."""

    kind: Literal["constant", "step", "reverse_step", "linear", "exp"] = "reverse_step"
    tau: float | None = None
    ratio: float | None = None


class EnergySpec(_Request):
    """Bayesian context update on the main prompt: ``gamma_attn``, ``gamma_norm``, token weights."""

    gamma_attn: float = 0.0
    gamma_norm: float = 0.0
    schedule: ScheduleSpec | None = None
    token_weights: dict[str, float] = Field(default_factory=dict)


class EditSpec(_Request):
    """One CACAO editorial prompt. ``alpha``, ``alpha_tau`` and ``gamma_attn`` left None take the model's
    edit defaults for the editing mode and direction (GET /models lists them)."""

    prompt: str
    alpha: float | None = None
    direction: Literal["and", "not"] = "and"
    alpha_tau: float | None = None
    gamma_attn: float | None = None
    gamma_norm: float = 0.0
    gamma_tau: float | None = None


class InversionSpec(_Request):
    regularize: bool = False


class ImageRef(_Request):
    """An image stored by an earlier job, used as an input instead of uploading bytes.

    By default the job's output image ``index``; with ``input`` ("image" or "mask") the file that was
    uploaded with that job (what stored edit requests and reproduction settings refer to).
    """

    job_id: str
    index: int = 0
    input: Literal["image", "mask"] | None = None


# ---------------------------------------------------------------------------------------------------
# Submit bodies (POST /generate, POST /edit). A nested spec is either the typed model, sent with its
# defaults, or a plain mapping, sent as given (the server fills what it leaves out, and a field newer
# than this client passes through). Listed first, the mapping branch takes every dict as it is.

_Energy = Annotated[dict[str, Any] | EnergySpec, Field(union_mode="left_to_right")]
_Edit = Annotated[dict[str, Any] | EditSpec, Field(union_mode="left_to_right")]
_Inversion = Annotated[dict[str, Any] | InversionSpec, Field(union_mode="left_to_right")]


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value


def _edit_list(value: Any) -> Any:
    """One edit or a sequence of them; a bare string is ``{"prompt": ...}`` with the server's options."""
    if value is None:
        return None
    if isinstance(value, (str, Mapping, EditSpec)):
        value = [value]
    if isinstance(value, Sequence):
        return [{"prompt": v} if isinstance(v, str) else _plain(v) for v in value]
    return value


class _SubmitRequest(_Request):
    model_config = ConfigDict(strict=True)

    #: Where the service POSTs signed notices of the job (docs/API.md, "Webhooks"), and which:
    #: a subset of start, progress, completed (null: all three).
    webhook: str | None = None
    webhook_events: list[str] | None = None

    @field_validator("energy", "inversion", mode="before", check_fields=False)
    @classmethod
    def _mapping_as_dict(cls, value: Any) -> Any:
        return _plain(value)

    @field_validator("edits", mode="before", check_fields=False)
    @classmethod
    def _edits(cls, value: Any) -> Any:
        return _edit_list(value)


class _Sampling(_SubmitRequest):
    """Fields every image-making request shares."""

    model: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    num_images: int | None = None
    seed: int | None = None
    output_format: str | None = None
    energy: _Energy | None = None


class GenerateRequest(_Sampling):
    """``POST /generate``."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    edits: list[_Edit] | None = None


class InpaintRequest(_Sampling):
    """``POST /edit`` with ``mode: inpaint``; uploads travel as file parts, references in the body."""

    mode: Literal["inpaint"] = "inpaint"
    prompt: str
    negative_prompt: str | None = None
    scheduler: str | None = None
    image_ref: ImageRef | None = None
    mask_ref: ImageRef | None = None


class RealEditRequest(_Sampling):
    """``POST /edit`` with ``mode: real``."""

    mode: Literal["real"] = "real"
    source_prompt: str
    edits: list[_Edit] = Field(default_factory=list)
    image_ref: ImageRef | None = None
    inversion: _Inversion | None = None


class SyntheticEditRequest(_SubmitRequest):
    """``POST /edit`` with ``mode: synthetic``."""

    mode: Literal["synthetic"] = "synthetic"
    source_job_id: str
    edits: list[_Edit] = Field(default_factory=list)
    output_format: str | None = None


# ---------------------------------------------------------------------------------------------------
# Responses


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Progress(_Response):
    stage: str = "queued"
    step: int = 0
    total: int = 0


class ImageResult(_Response):
    index: int
    url: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    content_type: str = "image/png"
    sha256: str | None = None
    settings: dict[str, Any] | None = None

    @property
    def extension(self) -> str:
        subtype = self.content_type.split("/", 1)[-1].split(";", 1)[0].strip().lower()
        return {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(subtype, subtype or "bin")


class JobResult(_Response):
    images: list[ImageResult] = Field(default_factory=list)


class JobErrorInfo(_Response):
    code: str
    message: str


class _JobState(_Response):
    """What a job record and a live event both tell: the status and what goes with it."""

    status: str
    progress: Progress = Field(default_factory=Progress)
    queue_position: int | None = None
    result: JobResult | None = None
    error: JobErrorInfo | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(_JobState):
    """One live event of a job (``GET /jobs/{id}/events``; docs/API.md): its status with the progress,
    queue position, result or error that came with it. ``id`` is the event's SSE id, the position a
    reconnecting stream resumes after."""

    id: str | None = None
    job_id: str
    at: datetime | None = None


class JobInfo(_JobState):
    """One job record as returned by ``GET /jobs/{id}`` (and by the submit and cancel calls)."""

    id: str
    url: str | None = None
    kind: str | None = None
    mode: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: created_at + the request's timeout_seconds; a job not done by then fails with code timeout.
    deadline_at: datetime | None = None
    request: dict[str, Any] | None = None

    @property
    def images(self) -> list[ImageResult]:
        return list(self.result.images) if self.result else []

    def with_event(self, event: JobEvent) -> JobInfo:
        """This record as the event describes the job now (the fields an event carries)."""
        update: dict[str, Any] = {
            "status": event.status,
            "progress": event.progress,
            "queue_position": event.queue_position,
        }
        if event.result is not None:
            update["result"] = event.result
        if event.error is not None:
            update["error"] = event.error
        return self.model_copy(update=update)


class ModelInfo(_Response):
    id: str
    default: bool = False
    #: What null request fields become for this model (steps, guidance_scale, scheduler, width, height).
    defaults: dict[str, Any] = Field(default_factory=dict)


class ModelList(_Response):
    models: list[ModelInfo] = Field(default_factory=list)


class JobPage(_Response):
    """One page of ``GET /jobs``: the caller's jobs, newest first."""

    jobs: list[JobInfo] = Field(default_factory=list)
    #: Pass to ``jobs(cursor=...)`` for the next page; None at the end.
    next_cursor: str | None = None


class KeyLimits(_Response):
    """A key's quotas (None: unlimited)."""

    rate_per_minute: float | None = None
    burst: int | None = None
    max_active_jobs: int | None = None
    max_images_per_day: int | None = None


class KeyInfo(_Response):
    """An API key as ``GET /keys`` shows it (never the key itself)."""

    id: str
    name: str
    role: str
    source: str | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)
    created_at: datetime | None = None
    revoked: bool = False


class NewKey(KeyInfo):
    """``POST /keys``: the new key, shown this once."""

    key: str


class CallerInfo(_Response):
    """``GET /keys/me``: the calling key (id None when the server runs with EBCA_AUTH=off)."""

    id: str | None = None
    name: str
    role: str
    limits: KeyLimits = Field(default_factory=KeyLimits)
    auth: str = "required"
