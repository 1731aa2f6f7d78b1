"""POST /generate and POST /edit: validate, store the uploads, queue the job (api/service.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.auth import CallerDep
from api.bodies import edit_body, idempotency_key, json_body
from api.deps import JobServiceDep, SettingsDep
from api.errors import ERRORS
from api.service import Submission
from ebca_common.jobs import Job

router = APIRouter(tags=["submit"])

IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
_SUBMIT_RESPONSES = {200: {"model": Job, "description": "Idempotent replay: the existing job."}, **ERRORS}


def submitted(submission: Submission) -> JSONResponse:
    """202 with the new job, or 200 with the existing one (idempotent replay); Location: its URL, and
    the RateLimit-* fields of the caller's submit bucket."""
    job = submission.job
    return JSONResponse(
        job.model_dump(mode="json"),
        status_code=202 if submission.created else 200,
        headers={"Location": job.url, **submission.headers},
    )


@router.post(
    "/generate",
    status_code=202,
    response_model=Job,
    responses=_SUBMIT_RESPONSES,
    summary="Queue a text-to-image job",
)
async def generate(
    request: Request, settings: SettingsDep, jobs: JobServiceDep, key: IdempotencyKey, caller: CallerDep
) -> JSONResponse:
    body = await json_body(request, settings)
    return submitted(await run_in_threadpool(jobs.generate, body, key, caller))


@router.post(
    "/edit",
    status_code=202,
    response_model=Job,
    responses=_SUBMIT_RESPONSES,
    summary="Queue an edit job (inpaint, real image, synthetic)",
)
async def edit(
    request: Request, settings: SettingsDep, jobs: JobServiceDep, key: IdempotencyKey, caller: CallerDep
) -> JSONResponse:
    body, uploads = await edit_body(request, settings)
    return submitted(await run_in_threadpool(jobs.edit, body, uploads, key, caller))
