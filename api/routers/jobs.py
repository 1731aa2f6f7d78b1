"""A job's record, its cancellation and its images."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api.deps import StorageDep, StoreDep
from api.errors import ERRORS
from ebca_common.errors import NotFound
from ebca_common.jobs import Job, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=Job, responses=ERRORS, summary="A job's state and result")
def get_job(job_id: str, store: StoreDep) -> JSONResponse:
    return JSONResponse(store.get(job_id).model_dump(mode="json"))


@router.delete("/{job_id}", status_code=202, response_model=Job, responses=ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, store: StoreDep) -> JSONResponse:
    return JSONResponse(store.cancel(job_id).model_dump(mode="json"), status_code=202)


@router.get(
    "/{job_id}/images/{index}",
    responses={
        200: {"description": "The image bytes (local store).", "content": {"image/png": {}}},
        307: {"description": "Redirect to a presigned URL (S3 store)."},
        **ERRORS,
    },
    summary="Download a result image",
)
def get_image(job_id: str, index: int, store: StoreDep, storage: StorageDep) -> Response:
    record = store.require(job_id)
    if record.status != JobStatus.SUCCEEDED or record.result is None:
        raise NotFound(f"job {job_id!r} is {record.status.value}; it has no images")
    images = record.result.images
    if not 0 <= index < len(images):
        raise NotFound(f"job {job_id!r} has {len(images)} image(s); no image {index}")
    image = images[index]
    url = storage.presigned_url(image.key)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return Response(storage.get(image.key), media_type=image.content_type)
