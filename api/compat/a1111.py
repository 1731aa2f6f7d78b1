"""The AUTOMATIC1111 web UI API under ``/sdapi/v1``: ``txt2img``, ``img2img`` (inpainting with a mask),
``sd-models``, ``samplers``, ``options`` (read), ``scripts``, ``progress`` and ``interrupt``.

A request becomes a body of our ``POST /generate`` or ``POST /edit`` (mode inpaint) and goes through
the one job service; the shared request models validate it, and their 422s name the A1111 field
(``cfg_scale``, ``sampler_name``, ``ebca.energy.gamma_attn``). EBCA settings travel in an extra object
``ebca`` (``energy``, ``edits``). docs/COMPAT.md lists what is mapped, ignored and refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import CallerDep, current_caller
from api.bodies import json_body
from api.compat.common import Finished, b64, finish, png_bytes, submit_generate, submit_inpaint
from api.deps import Services, ServicesDep, StoreDep
from api.service import Upload
from ebca_common.errors import Conflict, ServiceError, ValidationFailed
from ebca_common.images import decode_image
from ebca_common.jobs import JobStatus, unix_time
from ebca_common.specs import SCHEDULERS, parse_model

# Out of /openapi.json: this is A1111's API (docs/COMPAT.md says what is mapped).
router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(current_caller)], include_in_schema=False)

#: A1111 sampler names -> our schedulers (our own names are accepted as well).
SAMPLERS: dict[str, str] = {
    "Euler a": "euler_ancestral",
    "Euler": "euler",
    "LMS": "lms",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "DPM++ 2M": "dpm_solver",
}
_SAMPLER_OF = {**{s: s for s in SCHEDULERS}, **{name.lower(): ours for name, ours in SAMPLERS.items()}}
_A1111_NAME = {ours: name for name, ours in SAMPLERS.items()}
#: Our field names -> the A1111 request's.
FIELD_NAMES = {
    "num_images": "batch_size",
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "energy": "ebca.energy",
    "edits": "ebca.edits",
    "model": "override_settings.sd_model_checkpoint",
    "image": "init_images[0]",
}
#: A1111 features EBCA Serve does not have: accepted only at the value that leaves them off (what
#: A1111 clients send by default), refused otherwise with a 422 naming the field.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "enable_hr": (False, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "styles": ([], None),
    "subseed_strength": (0, 0.0, None),
    "script_name": (None, ""),
    "script_args": ([], None),
    "alwayson_scripts": ({}, None),
}


def render_error(exc: ServiceError) -> JSONResponse:
    """A service error as A1111's API answers errors (``{"error", "detail"}``), with the field at fault."""
    body = {"error": exc.code, "detail": exc.message, "field": exc.field}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers())


class EbcaExtras(BaseModel):
    """The extra object ``ebca``: what A1111 has no field for. Checked by our request models."""

    model_config = ConfigDict(extra="forbid")

    energy: Any = None
    edits: Any = None


class Txt2Img(BaseModel):
    """The A1111 fields the adapter reads. Others that A1111 clients send (``eta``, ``s_churn``,
    ``do_not_save_samples``...) are ignored, as A1111 ignores fields it does not know; those of
    :data:`UNSUPPORTED` are refused unless off."""

    model_config = ConfigDict(extra="allow")

    prompt: Any = ""
    negative_prompt: Any = None
    steps: Any = None
    cfg_scale: Any = None
    width: Any = None
    height: Any = None
    seed: Any = -1
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    ebca: EbcaExtras | None = None


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


def _scheduler(fields: Txt2Img) -> str | None:
    if fields.scheduler is not None and fields.scheduler.lower() != "automatic":
        raise ValidationFailed(
            f"scheduler: only automatic is supported (the sampler decides the noise schedule), got "
            f"{fields.scheduler!r}",
            field="scheduler",
        )
    name = fields.sampler_name if fields.sampler_name is not None else fields.sampler_index
    field = "sampler_name" if fields.sampler_name is not None else "sampler_index"
    if name is None:
        return None
    ours = _SAMPLER_OF.get(name.lower())
    if ours is None:
        known = ", ".join([*SAMPLERS, *SCHEDULERS])
        raise ValidationFailed(f"{field}: unknown sampler {name!r}; known: {known}", field=field)
    return ours


def our_body(fields: Txt2Img) -> dict[str, Any]:
    """The body of our POST /generate (and, with mode inpaint, /edit) for an A1111 request."""
    extra = fields.model_extra or {}
    for name, off in UNSUPPORTED.items():
        if name in extra and extra[name] not in off:
            raise ValidationFailed(f"{name}: not supported by EBCA Serve (leave it off)", field=name)
    given = fields.model_fields_set
    body: dict[str, Any] = {"prompt": fields.prompt, "output_format": "png"}
    if fields.negative_prompt:
        body["negative_prompt"] = fields.negative_prompt
    for theirs, ours in (("steps", "steps"), ("cfg_scale", "guidance_scale"), ("width", "width"),
                         ("height", "height")):  # fmt: skip
        if theirs in given and getattr(fields, theirs) is not None:
            body[ours] = getattr(fields, theirs)
    if fields.seed is not None and fields.seed != -1:  # -1: a random seed, as in A1111
        body["seed"] = fields.seed
    body["num_images"] = fields.batch_size * fields.n_iter
    scheduler = _scheduler(fields)
    if scheduler is not None:
        body["scheduler"] = scheduler
    model = fields.override_settings.get("sd_model_checkpoint")
    if model is not None:
        body["model"] = model
    if fields.ebca is not None:
        body.update({k: v for k, v in fields.ebca.model_dump().items() if k in fields.ebca.model_fields_set})
    return body


def _info(done: Finished, fields: Txt2Img) -> str:
    """A1111's ``info``: a JSON string with the settings actually used (the worker filled the model's
    defaults into the job's request) and every image's seed."""
    request = done.record.request
    result = done.record.result
    assert result is not None
    seeds = done.seeds
    prompt = request.get("prompt", "")
    negative = request.get("negative_prompt") or ""
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * len(seeds),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": result.images[0].width,
        "height": result.images[0].height,
        "sampler_name": _A1111_NAME.get(request.get("scheduler") or "", request.get("scheduler")),
        "cfg_scale": request.get("guidance_scale"),
        "steps": request.get("steps"),
        "batch_size": fields.batch_size,
        "n_iter": fields.n_iter,
        "sd_model_name": request.get("model"),
        "index_of_first_image": 0,
        "job_timestamp": done.record.created_at,
        "job_id": done.record.id,
        "ebca": {"energy": request.get("energy"), "edits": request.get("edits", [])},
    }
    return json.dumps(info)


def _answer(done: Finished, fields: Txt2Img, parameters: Any) -> JSONResponse:
    images = [b64(blob) for blob in done.images]
    return JSONResponse({"images": images, "parameters": parameters, "info": _info(done, fields)})


@router.post("/txt2img", summary="A1111 API: text to image (synchronous)")
async def txt2img(request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    data = await json_body(request, services.settings)
    fields = parse_model(Txt2Img, data)
    submission = await submit_generate(services, our_body(fields), caller, FIELD_NAMES)
    done = await finish(request, services, submission.job.id, FIELD_NAMES)
    return _answer(done, fields, data)


@router.post("/img2img", summary="A1111 API: inpainting (init_images + mask; synchronous)")
async def img2img(request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    data = await json_body(request, services.settings)
    fields = parse_model(Img2Img, data)
    body = {"mode": "inpaint", **our_body(fields)}
    for size in ("width", "height"):  # the output has the init image's size (no resizing)
        body.pop(size, None)
    if len(fields.init_images) != 1:
        raise ValidationFailed(
            f"init_images: exactly one image is supported, got {len(fields.init_images)}", field="init_images"
        )
    if fields.mask is None:
        raise ValidationFailed(
            "mask: required; img2img without a mask is not supported, only inpainting (white = repaint)",
            field="mask",
        )
    image = decode_b64(fields.init_images[0], "init_images[0]")
    mask = decode_b64(fields.mask, "mask")
    if fields.inpainting_mask_invert:
        mask = await run_in_threadpool(_invert, mask, services)
    uploads = {"image": Upload(image, "init.png"), "mask": Upload(mask, "mask.png")}
    submission = await submit_inpaint(services, body, uploads, caller, FIELD_NAMES)
    done = await finish(request, services, submission.job.id, FIELD_NAMES)
    return _answer(done, fields, {k: v for k, v in data.items() if k not in ("init_images", "mask")})


def decode_b64(value: str, field: str) -> bytes:
    """A base64 image as A1111 clients send it (with or without a ``data:image/png;base64,`` prefix)."""
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed(f"{field}: not base64 image data", field=field) from None


def _invert(mask: bytes, services: Services) -> bytes:
    image, _ = decode_image(mask, "mask", services.settings.max_image_pixels)
    return png_bytes(ImageOps.invert(image.convert("L")))


# -- the service ---------------------------------------------------------------------------------------
@router.get("/sd-models", summary="A1111 API: the models (our model ids)")
def sd_models(services: ServicesDep) -> list[dict[str, Any]]:
    return [
        {"title": mid, "model_name": mid, "hash": None, "sha256": None, "filename": mid, "config": None}
        for mid in services.settings.model_table()
    ]


@router.get("/samplers", summary="A1111 API: the samplers (our schedulers)")
def samplers() -> list[dict[str, Any]]:
    named = [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]
    return named + [{"name": s, "aliases": [], "options": {}} for s in SCHEDULERS if s not in _A1111_NAME]


@router.get("/options", summary="A1111 API: options (read only: the default model)")
def options(services: ServicesDep) -> dict[str, Any]:
    return {"sd_model_checkpoint": services.settings.default_model_id}


@router.get("/scripts", summary="A1111 API: scripts (none)")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/progress", summary="A1111 API: progress of the caller's latest job")
def progress(caller: CallerDep, store: StoreDep) -> dict[str, Any]:
    jobs, _ = store.list_jobs(caller.owner, status=None, before=None, limit=1)
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": store.active_jobs(caller.owner),
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
    if not jobs:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    job = jobs[0]
    done, total = job.progress.step, job.progress.total
    fraction = 1.0 if job.status == JobStatus.SUCCEEDED else (done / total if total else 0.0)
    eta = 0.0
    if job.status == JobStatus.RUNNING and job.started_at and fraction > 0:
        elapsed = time.time() - unix_time(job.started_at)
        eta = elapsed * (1 - fraction) / fraction
    interrupted = job.cancel_requested or job.status == JobStatus.CANCELED
    state.update(job=job.id, job_timestamp=job.created_at, sampling_step=done, sampling_steps=total,
                 interrupted=interrupted)  # fmt: skip
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None,
            "textinfo": job.status.value}  # fmt: skip


@router.post("/interrupt", summary="A1111 API: cancel the caller's running job")
def interrupt(caller: CallerDep, store: StoreDep) -> dict[str, Any]:
    jobs, _ = store.list_jobs(caller.owner, status=JobStatus.RUNNING, before=None, limit=1)
    if jobs:
        with contextlib.suppress(Conflict):  # it finished meanwhile
            store.cancel(jobs[0].id)
    return {}
