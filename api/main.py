"""The FastAPI application: ``uvicorn api.main:app``.

This module (and everything it imports) stays free of torch, ebca_core and worker, so the api image is
small and starts fast; tests/api checks that in a subprocess.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match

from api.metrics import build_registry
from api.service import CeleryPublisher, JobService, Publisher, Upload
from ebca_common.errors import NotFound, PayloadTooLarge, ServiceError, Unavailable, ValidationFailed
from ebca_common.jobs import Job, JobStatus
from ebca_common.model_defaults import defaults_of
from ebca_common.settings import Settings, get_settings
from ebca_common.specs import GenerateRequest, edit_request_adapter, field_path, load_json
from ebca_common.storage import Storage, storage_from_settings
from ebca_common.store import JobStore

log = logging.getLogger("ebca.api")

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Stable error code (docs/API.md, Errors)."},
                "message": {"type": "string", "description": "What went wrong, for humans."},
                "field": {"type": "string", "description": "Dotted path of the field at fault, if one is."},
            },
            "required": ["code", "message"],
        }
    },
}
_ERRORS = {
    code: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, text in {
        404: "Unknown job or image.",
        409: "Idempotency conflict, or cancel of a finished job.",
        413: "Upload or body over the configured limit.",
        422: "Invalid request; `field` names the field.",
        429: "Queue full (Retry-After).",
        503: "Redis or the queue unreachable (Retry-After); nothing was created.",
    }.items()
}


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """Read the body, refusing with 413 as soon as it passes ``limit`` (never buffering more)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} of {declared} bytes is over the limit of {limit} bytes")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _wrong_content_type(request: Request, expected: str) -> ValidationFailed:
    got = request.headers.get("content-type", "")
    return ValidationFailed(f"content-type: expected {expected}, got {got!r}", field="content-type")


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isprintable():
        raise ValidationFailed(
            "Idempotency-Key: must be 1 to 200 printable characters", field="Idempotency-Key"
        )
    return key


def create_app(
    settings: Settings | None = None,
    store: JobStore | None = None,
    storage: Storage | None = None,
    publisher: Publisher | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    store = store or JobStore.from_settings(settings)
    storage = storage or storage_from_settings(settings)
    publisher = publisher or CeleryPublisher(settings)
    service = JobService(settings, store, storage, publisher)
    registry, http_requests = build_registry(store)

    app = FastAPI(
        title="EBCA Serve",
        version="0.1.0",
        description="Text-to-image generation and editing with energy-based cross-attention. "
        "Jobs are queued and run by GPU workers; poll GET /jobs/{id}.",
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.service = service

    # -- errors: one body shape for everything -----------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, Unavailable) and exc.retry_after is None:
            exc.retry_after = settings.retry_after_seconds
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = tuple(p for p in first.get("loc", ()) if p not in ("body", "path", "query", "header"))
        path = field_path(loc) or None
        return _error_response(ValidationFailed(f"{path}: {first.get('msg')}", field=path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        body = {"error": {"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}}
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route whose path matched; /jobs/{id} has two (GET, DELETE).
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(
            Unavailable(f"the job store is unreachable: {exc}", retry_after=settings.retry_after_seconds)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            {"error": {"code": "internal_error", "message": "internal error; see the api log"}},
            status_code=500,
        )

    @app.middleware("http")
    async def _count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        http_requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    # -- jobs ------------------------------------------------------------------------------------------
    def _job_response(job: Job, status_code: int) -> JSONResponse:
        return JSONResponse(
            job.model_dump(mode="json"), status_code=status_code, headers={"Location": job.url}
        )

    @app.post(
        "/generate",
        status_code=202,
        response_model=Job,
        responses={200: {"model": Job, "description": "Idempotent replay: the existing job."}, **_ERRORS},
        summary="Queue a text-to-image job",
    )
    async def generate(request: Request) -> JSONResponse:
        key = _idempotency_key(request)
        if _media_type(request) not in ("", "application/json"):
            raise _wrong_content_type(request, "application/json")
        body = load_json(await _read_limited(request, settings.max_json_bytes, "the JSON body"))
        submission = await run_in_threadpool(service.generate, body, key)
        return _job_response(submission.job, 202 if submission.created else 200)

    @app.post(
        "/edit",
        status_code=202,
        response_model=Job,
        responses={200: {"model": Job, "description": "Idempotent replay: the existing job."}, **_ERRORS},
        summary="Queue an edit job (inpaint, real image, synthetic)",
    )
    async def edit(request: Request) -> JSONResponse:
        key = _idempotency_key(request)
        media_type = _media_type(request)
        uploads: dict[str, Upload] = {}
        if media_type == "multipart/form-data":
            raw = await _read_limited(request, _multipart_limit(settings), "the multipart body")
            body, uploads = await _parse_multipart(request, raw, settings)
        elif media_type in ("", "application/json"):
            body = load_json(await _read_limited(request, settings.max_json_bytes, "the JSON body"))
        else:
            raise _wrong_content_type(request, "application/json or multipart/form-data")
        submission = await run_in_threadpool(service.edit, body, uploads, key)
        return _job_response(submission.job, 202 if submission.created else 200)

    @app.get("/jobs/{job_id}", response_model=Job, responses=_ERRORS, summary="A job's state and result")
    def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(store.get(job_id).model_dump(mode="json"))

    @app.delete(
        "/jobs/{job_id}", status_code=202, response_model=Job, responses=_ERRORS, summary="Cancel a job"
    )
    def cancel_job(job_id: str) -> JSONResponse:
        return JSONResponse(store.cancel(job_id).model_dump(mode="json"), status_code=202)

    @app.get(
        "/jobs/{job_id}/images/{index}",
        responses={
            200: {"description": "The image bytes (local store).", "content": {"image/png": {}}},
            307: {"description": "Redirect to a presigned URL (S3 store)."},
            **_ERRORS,
        },
        summary="Download a result image",
    )
    def get_image(job_id: str, index: int) -> Response:
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

    # -- service ---------------------------------------------------------------------------------------
    @app.get("/models", summary="Models that jobs may name, with the defaults of each")
    def models() -> dict[str, Any]:
        default = settings.default_model_id
        # What the workers announced (they have the model files); a model no worker announced yet
        # falls back to its file when this process can see it, else to the built-in defaults.
        published = store.model_defaults()
        return {
            "models": [
                {
                    "id": mid,
                    "default": mid == default,
                    "defaults": published.get(mid) or defaults_of(location).model_dump(mode="json"),
                }
                for mid, location in settings.model_table().items()
            ]
        }

    @app.get("/healthz", summary="The api process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Redis answers and at least one worker is alive", responses=_ERRORS)
    def readyz() -> JSONResponse:
        try:
            store.ping()
            workers = store.live_workers()
        except Unavailable as exc:
            exc.retry_after = settings.retry_after_seconds
            return _error_response(exc)
        if not workers:
            return _error_response(
                Unavailable("no live worker (no heartbeat)", retry_after=settings.retry_after_seconds)
            )
        return JSONResponse({"status": "ready", "workers": len(workers)})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path (for the Allow header of a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods.update(route_methods)
    return sorted(methods)


def _multipart_limit(settings: Settings) -> int:
    """Largest multipart body: two uploads, the JSON part and room for the part headers."""
    return 2 * settings.max_upload_bytes + settings.max_json_bytes + 64 * 1024


#: More parts than a valid request has (request, image, mask), so that an unexpected or repeated part
#: is named by the checks below; past these counts the parser refuses the body as a whole.
_MAX_PARTS = 16


async def _parse_multipart(request: Request, raw: bytes, settings: Settings) -> tuple[Any, dict[str, Upload]]:
    async def body() -> AsyncIterator[bytes]:
        yield raw

    # Part sizes are checked below, per part and with the field named; the parser's own bound is only
    # the whole body's (already enforced while reading).
    parser = MultiPartParser(
        request.headers,
        body(),
        max_files=_MAX_PARTS,
        max_fields=_MAX_PARTS,
        max_part_size=_multipart_limit(settings),
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ValidationFailed(f"body: malformed multipart request ({exc.message})", field=None) from None
    uploads: dict[str, Upload] = {}
    request_part: str | None = None
    seen: set[str] = set()
    for name, value in form.multi_items():
        if name in seen:
            raise ValidationFailed(f"{name}: the part is given more than once", field=name)
        seen.add(name)
        if name == "request":
            # Some clients send the JSON part as a file (with a filename or application/json type).
            data = await value.read() if isinstance(value, UploadFile) else value.encode("utf-8", "replace")
            if len(data) > settings.max_json_bytes:
                raise PayloadTooLarge(
                    f"request: {len(data)} bytes is over the limit of {settings.max_json_bytes} bytes",
                    field="request",
                )
            try:
                request_part = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationFailed("request: not UTF-8 text", field="request") from None
        elif name in ("image", "mask"):
            if not isinstance(value, UploadFile):
                raise ValidationFailed(
                    f"{name}: must be a file part (with a filename), not a text field", field=name
                )
            data = await value.read()
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"{name}: {len(data)} bytes is over the limit of {settings.max_upload_bytes} bytes",
                    field=name,
                )
            uploads[name] = Upload(data, value.filename)
        else:
            kind = "file part" if isinstance(value, UploadFile) else "form field"
            raise ValidationFailed(
                f"{name or '(unnamed)'}: unexpected {kind} (send `request`, `image`, `mask`)",
                field=name or None,
            )
    if request_part is None:
        raise ValidationFailed(
            "request: the part `request` (the JSON body as text) is required", field="request"
        )
    return load_json(request_part, field="request"), uploads


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the request bodies, which the handlers parse themselves (to bound the
    body size while reading and to accept multipart on /edit)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"

    def register(name: str, model_schema: dict[str, Any]) -> dict[str, str]:
        components.update(model_schema.pop("$defs", {}))
        components[name] = model_schema
        return {"$ref": ref.format(model=name)}

    gen_ref = register("GenerateRequest", GenerateRequest.model_json_schema(ref_template=ref))
    edit_ref = register("EditRequest", edit_request_adapter.json_schema(ref_template=ref))
    schema["paths"]["/generate"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": gen_ref}},
    }
    schema["paths"]["/edit"]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": edit_ref},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["request"],
                    "properties": {
                        "request": {"type": "string", "description": "The JSON body (EditRequest) as text."},
                        "image": {"type": "string", "format": "binary", "description": "Input image."},
                        "mask": {"type": "string", "format": "binary", "description": "Inpaint mask."},
                    },
                }
            },
        },
    }
    for path in ("/generate", "/edit"):
        schema["paths"][path]["post"].setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "Same key + same body returns the same job; a different body is a 409.",
            }
        )
    app.openapi_schema = schema
    return schema


app = create_app()
