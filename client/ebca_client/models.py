"""Typed request and response models of the REST contract (docs/API.md).

Request models hold types only, not the server's ranges: the API is the one authority on what is
valid, and its 422 answers (surfaced as ``APIError`` with the field) are more precise than a second
copy of the rules here could stay. Response models ignore unknown fields so that a newer server does
not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
        return self.model_dump(mode="json", exclude_none=True)


class ScheduleSpec(_Request):
    """Time schedule of the energy terms (EBCA_SPEC.md, schedules)."""

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
    """One CACAO editorial prompt."""

    prompt: str
    alpha: float = 1.0
    direction: Literal["and", "not"] = "and"
    alpha_tau: float = 0.0
    gamma_attn: float = 0.0
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


class JobInfo(_Response):
    """One job record as returned by ``GET /jobs/{id}`` (and by the submit and cancel calls)."""

    id: str
    url: str | None = None
    kind: str | None = None
    mode: str | None = None
    status: str
    progress: Progress = Field(default_factory=Progress)
    queue_position: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: dict[str, Any] | None = None
    result: JobResult | None = None
    error: JobErrorInfo | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def images(self) -> list[ImageResult]:
        return list(self.result.images) if self.result else []


class ModelInfo(_Response):
    id: str
    default: bool = False
    #: What null request fields become for this model (steps, guidance_scale, scheduler, width, height).
    defaults: dict[str, Any] = Field(default_factory=dict)


class ModelList(_Response):
    models: list[ModelInfo] = Field(default_factory=list)
