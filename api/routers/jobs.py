"""The caller's jobs: the list, one job's record, its cancellation and its images.

Every route loads a job through :data:`api.auth.OwnedJob`: a job of another API key is a 404, the
same answer as for one that does not exist (docs/API.md, "API keys and ownership").
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from api.auth import CallerDep, OwnedJob
from api.deps import SettingsDep, StorageDep, StoreDep
from api.errors import ERRORS
from ebca_common.errors import Forbidden, NotFound, ValidationFailed
from ebca_common.jobs import Job, JobRecord, JobStatus
from ebca_common.settings import Settings
from ebca_common.storage import Storage

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: Result images never change once stored (a job id and index name one image for good), but belong to
#: one key: caches may keep them for a year, shared caches not at all.
IMMUTABLE = "private, max-age=31536000, immutable"


class JobPage(BaseModel):
    jobs: list[Job] = Field(..., description="Jobs, newest first.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


@router.get("", response_model=JobPage, responses=ERRORS, summary="The caller's jobs, newest first")
def list_jobs(
    caller: CallerDep,
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=20, description="From the previous page.")] = None,
    owner: Annotated[
        str | None, Query(max_length=100, description="Admin keys: only this key's jobs (default: all).")
    ] = None,
) -> JSONResponse:
    if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
        raise ValidationFailed("cursor: not a cursor of this list (pass next_cursor as is)", field="cursor")
    if caller.is_admin:
        scope = owner  # None: every job
    elif owner is not None and owner != caller.owner:
        raise Forbidden("owner: only an admin key may list another key's jobs")
    else:
        scope = caller.owner
    jobs, after = store.list_jobs(
        scope, status=status, before=None if cursor is None else int(cursor), limit=limit
    )
    page = JobPage(jobs=jobs, next_cursor=None if after is None else str(after))
    return JSONResponse(page.model_dump(mode="json"))


@router.get("/{job_id}", response_model=Job, responses=ERRORS, summary="A job's state and result")
def get_job(record: OwnedJob, store: StoreDep) -> JSONResponse:
    return JSONResponse(store.view(record).model_dump(mode="json"))


@router.delete("/{job_id}", status_code=202, response_model=Job, responses=ERRORS, summary="Cancel a job")
def cancel_job(record: OwnedJob, store: StoreDep) -> JSONResponse:
    return JSONResponse(store.cancel(record.id).model_dump(mode="json"), status_code=202)


@router.get(
    "/{job_id}/images/{index}",
    responses={
        200: {"description": "The image bytes (local store).", "content": {"image/png": {}}},
        307: {"description": "Redirect to a presigned URL (S3 store)."},
        **ERRORS,
    },
    summary="Download a result image",
)
def get_image(record: OwnedJob, index: int, storage: StorageDep, settings: SettingsDep) -> Response:
    return image_response(record, index, storage, settings)


def image_response(record: JobRecord, index: int, storage: Storage, settings: Settings) -> Response:
    """Image ``index`` of a job: its bytes (local store) or a redirect to a presigned URL (S3). Also
    what the signed image URLs of the OpenAI adapter answer (api/compat/openai.py)."""
    if record.status != JobStatus.SUCCEEDED or record.result is None:
        raise NotFound(f"job {record.id!r} is {record.status.value}; it has no images")
    images = record.result.images
    if not 0 <= index < len(images):
        raise NotFound(f"job {record.id!r} has {len(images)} image(s); no image {index}")
    image = images[index]
    url = storage.presigned_url(image.key)
    if url is not None:
        # The presigned URL expires: a cached redirect must not outlive it.
        ttl = max(0, settings.presign_seconds // 2)
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": f"private, max-age={ttl}"})
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": IMMUTABLE}
    return Response(storage.get(image.key), media_type=image.content_type, headers=headers)
