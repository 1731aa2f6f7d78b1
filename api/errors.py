"""One error body for everything the api answers: ``{"error": {"code", "message", "field"?}}``.

Every :class:`~ebca_common.errors.ServiceError` maps to its status and code; FastAPI's own request
validation, Starlette's 404/405, a Redis outage and anything unexpected are mapped to the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from ebca_common.errors import ServiceError, Unavailable, ValidationFailed
from ebca_common.settings import Settings
from ebca_common.specs import field_path

log = logging.getLogger("ebca.api")

ERROR_SCHEMA = {
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
ERRORS = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code, text in {
        401: "No API key, or an unknown or revoked one (WWW-Authenticate: Bearer).",
        403: "This needs an admin API key.",
        404: "Unknown job or image, or a job of another API key.",
        409: "Idempotency conflict, or cancel of a finished job.",
        413: "Upload or body over the configured limit.",
        422: "Invalid request; `field` names the field.",
        429: "Queue full, or a quota of the API key reached (Retry-After, RateLimit-* headers).",
        503: "Redis or the queue unreachable (Retry-After); nothing was created.",
    }.items()
}


#: Renders a service error as a response (the adapters of api/compat/ speak their clients' dialects).
ErrorRenderer = Callable[[ServiceError], JSONResponse]


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


def http_error(status_code: int, message: str) -> ServiceError:
    """A Starlette HTTP error (404 of an unknown path, 405) as a service error."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    exc = ServiceError(message)
    exc.status_code = status_code
    exc.code = codes.get(status_code, "http_error")
    return exc


def install_error_handlers(
    app: FastAPI, settings: Settings, dialects: Mapping[str, ErrorRenderer] | None = None
) -> None:
    """Register the handlers that give every error the one body shape; under a path prefix of
    ``dialects`` (``/v1/``, ``/sdapi/``) the same errors are rendered in that API's shape instead."""

    def render(request: Request, exc: ServiceError) -> JSONResponse:
        path = request.url.path
        for prefix, renderer in (dialects or {}).items():
            if path.startswith(prefix):
                return renderer(exc)
        return error_response(exc)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, Unavailable) and exc.retry_after is None:
            exc.retry_after = settings.retry_after_seconds
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = tuple(p for p in first.get("loc", ()) if p not in ("body", "path", "query", "header"))
        path = field_path(loc) or None
        return render(request, ValidationFailed(f"{path}: {first.get('msg')}", field=path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = http_error(exc.status_code, str(exc.detail))
        error.extra_headers.update(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route whose path matched; /jobs/{id} has two (GET, DELETE).
            error.extra_headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return render(request, error)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        return render(
            request,
            Unavailable(f"the job store is unreachable: {exc}", retry_after=settings.retry_after_seconds),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return render(request, ServiceError("internal error; see the api log"))


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path (for the Allow header of a 405)."""
    methods: set[str] = set()
    for route in _routes(app.router.routes):
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods.update(route_methods)
    return sorted(methods)


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes of the app, the included routers' too (FastAPI keeps an included router as one
    entry whose ``original_router`` holds its routes, already prefixed)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        else:
            yield route
