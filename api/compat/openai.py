"""The OpenAI Images API under ``/v1``: ``POST /v1/images/generations``, ``POST /v1/images/edits``,
``GET /v1/models``, and the signed image URLs that ``response_format=url`` answers with.

Requests become bodies of our ``POST /generate`` and ``POST /edit`` (mode inpaint) and go through the
one job service; the shared request models validate them, and their 422s come back as OpenAI's 400
``invalid_request_error`` with ``param`` named as the OpenAI client calls it (docs/COMPAT.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.auth import CallerDep, current_caller
from api.bodies import json_body, media_type, multipart_limit, read_limited, wrong_content_type
from api.compat.common import Finished, b64, finish, png_bytes, submit_generate, submit_inpaint
from api.deps import Services, ServicesDep
from api.routers.jobs import image_response
from api.service import Upload
from ebca_common.errors import Forbidden, NotFound, PayloadTooLarge, ServiceError, ValidationFailed
from ebca_common.images import decode_image
from ebca_common.jobs import unix_time
from ebca_common.settings import Settings
from ebca_common.specs import parse_model
from ebca_common.store import redis_errors

#: Our field names -> the OpenAI request's (for the ``param`` of an error).
FIELD_NAMES = {"num_images": "n", "width": "size", "height": "size"}
#: Fields our API takes that pass through unchanged (the ``extra_body`` of the openai client).
EXTRAS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "energy",
    "edits",
    "timeout_seconds",
)
#: Form fields of /v1/images/edits read as JSON (numbers, and the energy object); the rest are text.
JSON_FORM_FIELDS = {"n", "seed", "steps", "guidance_scale", "timeout_seconds", "energy", "edits"}
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
#: A mask pixel whose alpha is below this is "transparent": the area to edit (OpenAI's convention).
ALPHA_EDIT_BELOW = 128

# Out of /openapi.json: this is OpenAI's API, documented by OpenAI (docs/COMPAT.md says what is mapped).
router = APIRouter(prefix="/v1", dependencies=[Depends(current_caller)], include_in_schema=False)
#: The signed image URLs: no API key (an <img> tag or a chat front end fetches them); the signature is it.
files = APIRouter(prefix="/v1", include_in_schema=False)


# -- errors ------------------------------------------------------------------------------------------------
_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def render_error(exc: ServiceError) -> JSONResponse:
    """A service error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Our 422 is
    OpenAI's 400 (what the openai client raises as BadRequestError); other statuses stay."""
    status = 400 if exc.status_code == 422 else exc.status_code
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": exc.message, "type": kind, "param": exc.field,
                      "code": _CODES.get(status, exc.code)}}  # fmt: skip
    headers = exc.headers()
    if status not in (429, 503):
        # The openai client retries 409 and 5xx by default: here a retry would run a whole new job.
        headers["x-should-retry"] = "false"
    return JSONResponse(body, status_code=status, headers=headers)


# -- requests ----------------------------------------------------------------------------------------------
class _OpenAIFields(BaseModel):
    """The OpenAI fields the adapter reads itself. What passes through to our request models (prompt,
    model, n and the EBCA extras) is typed ``Any`` here: those models check it, once."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any = None
    model: Any = None
    n: Any = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    user: str | None = None  # accepted, not used
    quality: str | None = None  # accepted, not used: the steps set the quality
    style: str | None = None  # accepted, not used
    moderation: str | None = None  # accepted, not used
    background: Literal["auto", "opaque"] | None = None
    stream: Literal[False] | None = None
    partial_images: Literal[0] | None = None
    output_compression: int | None = None  # accepted, not used
    negative_prompt: Any = None
    seed: Any = None
    steps: Any = None
    guidance_scale: Any = None
    scheduler: Any = None
    energy: Any = None
    edits: Any = None
    timeout_seconds: Any = None


class ImageGeneration(_OpenAIFields):
    """Body of POST /v1/images/generations."""


class ImageEdit(_OpenAIFields):
    """Form fields of POST /v1/images/edits (besides the files image and mask)."""

    input_fidelity: str | None = None  # accepted, not used


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (W, H); None or ``"auto"`` -> None (the model's native size)."""
    if size is None or size == "auto":
        return None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise ValidationFailed(
            f"size: expected WIDTHxHEIGHT (e.g. 512x512) or auto, got {size!r}", field="size"
        )
    return int(match.group(1)), int(match.group(2))


def our_body(fields: _OpenAIFields) -> dict[str, Any]:
    """The fields of our request that an OpenAI request sets (unset ones keep our defaults)."""
    given = fields.model_fields_set
    body: dict[str, Any] = {"prompt": fields.prompt} if "prompt" in given else {}  # else "field required"
    if fields.model is not None:
        body["model"] = fields.model
    if fields.n is not None:
        body["num_images"] = fields.n
    body["output_format"] = fields.output_format or "png"
    body.update({name: getattr(fields, name) for name in EXTRAS if name in given})
    return body


# -- responses ---------------------------------------------------------------------------------------------
def _url_secret(services: Services) -> bytes:
    """The key of the image URL signatures: one random secret in Redis, made by whichever api replica
    needs it first, so every replica signs and checks alike without configuration."""
    store = services.store
    key = store.k("compat", "url-secret")
    with redis_errors():
        store.r.set(key, secrets.token_hex(32), nx=True)
        value = store.r.get(key)
    return value if isinstance(value, bytes) else str(value).encode()


def _signature(secret: bytes, job_id: str, index: int, expires: int) -> str:
    return hmac.new(secret, f"{job_id}/{index}/{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(request: Request, services: Services, job_id: str, index: int) -> str:
    """An absolute URL of image ``index`` that works without the API key until EBCA_PRESIGN_SECONDS
    from now (OpenAI's image URLs expire too)."""
    expires = int(time.time()) + services.settings.presign_seconds
    sig = _signature(_url_secret(services), job_id, index, expires)
    base = str(request.base_url).rstrip("/")
    return f"{base}/v1/images/files/{job_id}/{index}?expires={expires}&sig={sig}"


def images_response(
    request: Request, services: Services, done: Finished, response_format: str | None
) -> JSONResponse:
    job_id = done.record.id
    if response_format == "url":
        data = [{"url": signed_url(request, services, job_id, i)} for i in range(len(done.images))]
    else:
        data = [{"b64_json": b64(blob)} for blob in done.images]
    return JSONResponse({"created": int(unix_time(done.record.created_at)), "data": data})


# -- routes ------------------------------------------------------------------------------------------------
@router.post("/images/generations", summary="OpenAI Images API: create images (synchronous)")
async def generations(request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    data = await json_body(request, services.settings)
    fields = parse_model(ImageGeneration, data)
    body = our_body(fields)
    size = parse_size(fields.size)
    if size is not None:
        body["width"], body["height"] = size
    submission = await submit_generate(services, body, caller, FIELD_NAMES)
    done = await finish(request, services, submission.job.id, FIELD_NAMES)
    return images_response(request, services, done, fields.response_format)


@router.post("/images/edits", summary="OpenAI Images API: edit an image with a mask (inpainting)")
async def edits(request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    form, uploads = await read_form(request, services.settings)
    fields = parse_model(ImageEdit, form)
    if "image" not in uploads:
        raise ValidationFailed("image: required (a file part image)", field="image")
    max_pixels = services.settings.max_image_pixels
    image, _ = await run_in_threadpool(decode_image, uploads["image"].data, "image", max_pixels)
    size = parse_size(fields.size)
    if size is not None and size != image.size:
        raise ValidationFailed(
            f"size: must be the image's size {image.size[0]}x{image.size[1]} or auto (no resizing), got "
            f"{fields.size}",
            field="size",
        )
    if "mask" in uploads:
        mask, _ = await run_in_threadpool(decode_image, uploads["mask"].data, "mask", max_pixels)
    else:
        mask = image  # OpenAI: without a mask, the image's own transparency marks the area to edit
    ours = {
        "image": uploads["image"],
        "mask": Upload(await run_in_threadpool(repaint_mask, mask), "mask.png"),
    }
    body = {"mode": "inpaint", **our_body(fields)}
    submission = await submit_inpaint(services, body, ours, caller, FIELD_NAMES)
    done = await finish(request, services, submission.job.id, FIELD_NAMES)
    return images_response(request, services, done, fields.response_format)


@router.get("/models", summary="OpenAI Models API: the models jobs may name")
def models(services: ServicesDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": mid, "object": "model", "created": 0, "owned_by": "ebca-serve"}
            for mid in services.settings.model_table()
        ],
    }


@files.get("/images/files/{job_id}/{index}", summary="An image of a signed URL (no API key)")
def signed_image(
    job_id: str,
    index: int,
    services: ServicesDep,
    expires: int = Query(..., description="Unix time after which the URL is refused."),
    sig: str = Query(..., max_length=128, description="HMAC-SHA256 of job/index/expires."),
) -> Response:
    expected = _signature(_url_secret(services), job_id, index, expires)
    if not hmac.compare_digest(expected, sig) or time.time() > expires:
        raise Forbidden("the image URL has expired or its signature is wrong; ask for the image again")
    record = services.store.record(job_id)
    if record is None:
        raise NotFound(f"job {job_id!r} not found")
    return image_response(record, index, services.storage, services.settings)


# -- the edit form -----------------------------------------------------------------------------------------
def repaint_mask(mask: Image.Image) -> bytes:
    """OpenAI's mask (transparent = edit) as ours (white = repaint), PNG-encoded; 400 for a mask
    without transparency, whose meaning would be a guess."""
    has_alpha = "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info)
    if not has_alpha:
        raise ValidationFailed(
            "mask: needs an alpha channel; its fully transparent pixels mark the area to edit (without a "
            "mask, the image's own transparency does)",
            field="mask",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return png_bytes(alpha.point(lambda v: 255 if v < ALPHA_EDIT_BELOW else 0))


async def read_form(request: Request, settings: Settings) -> tuple[dict[str, Any], dict[str, Upload]]:
    """The multipart form of /v1/images/edits: its text fields (JSON-decoded where the field is a
    number or object; ``energy[gamma_attn]`` nests) and its files ``image`` (or ``image[]``, once)
    and ``mask``."""
    if media_type(request) != "multipart/form-data":
        raise wrong_content_type(request, "multipart/form-data")
    raw = await read_limited(request, multipart_limit(settings), "the multipart body")

    async def body() -> AsyncIterator[bytes]:
        yield raw

    parser = MultiPartParser(request.headers, body(), max_files=8, max_fields=64,
                             max_part_size=multipart_limit(settings))  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ValidationFailed(f"body: malformed multipart request ({exc.message})", field=None) from None
    fields: dict[str, Any] = {}
    uploads: dict[str, Upload] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            key = "image" if name == "image[]" else name
            if key not in ("image", "mask"):
                raise ValidationFailed(f"{name}: unexpected file part (send image and mask)", field=name)
            if key in uploads:
                raise ValidationFailed(f"{key}: one file only (several images are not supported)", field=key)
            data = await value.read()
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"{key}: {len(data)} bytes is over the limit of {settings.max_upload_bytes} bytes",
                    field=key,
                )
            uploads[key] = Upload(data, value.filename)
        else:
            _put_field(fields, name, value)
    return fields, uploads


def _put_field(fields: dict[str, Any], name: str, value: str) -> None:
    """A form field into ``fields``: ``energy[schedule][kind]`` nests; numbers and JSON objects of the
    fields that take them are decoded (anything else stays text, for the models to name)."""
    path = re.findall(r"\[([^\]]*)\]", name)
    head = name.split("[", 1)[0]
    if not head or "" in path or (path and name != head + "".join(f"[{p}]" for p in path)):
        raise ValidationFailed(f"{name}: not a field name (arrays go as JSON text)", field=name)
    if head in JSON_FORM_FIELDS:
        try:
            decoded: Any = json.loads(value)
        except ValueError:
            decoded = value
    else:
        decoded = value
    target = fields
    for part in [head, *path][:-1]:
        inner = target.setdefault(part, {})
        if not isinstance(inner, dict):
            raise ValidationFailed(f"{name}: {part} is given as a value and as an object", field=head)
        target = inner
    last = [head, *path][-1]
    if last in target:
        raise ValidationFailed(f"{name}: given more than once", field=head)
    target[last] = decoded
