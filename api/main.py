"""The FastAPI application: ``uvicorn api.main:app``.

:func:`create_app` builds the process-wide parts once (settings, job store, storage, publisher, job
service, metrics; ``api/deps.py`` hands them to the routes) and mounts one router per resource
(``api/routers/``). This module (and everything it imports) stays free of torch, ebca_core and
worker, so the api image is small and starts fast; tests/api checks that in a subprocess.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from api.auth import KeyRing, current_caller, startup_warnings
from api.compat import a1111, openai
from api.deps import Services
from api.errors import install_error_handlers
from api.metrics import build_registry
from api.openapi import build_openapi
from api.routers import events, jobs, keys, page, service, submit
from api.service import JobService, Publisher
from api.webhooks import Dispatcher, WebhookSecrets
from ebca_common.queueing import CeleryPublisher
from ebca_common.settings import Settings, get_settings
from ebca_common.storage import Storage, storage_from_settings
from ebca_common.store import JobStore
from ebca_common.sweep import Sweeper


def create_app(
    settings: Settings | None = None,
    store: JobStore | None = None,
    storage: Storage | None = None,
    publisher: Publisher | None = None,
    sweep: bool = False,
    webhooks: bool | None = None,
) -> FastAPI:
    """The app; ``sweep`` runs crash recovery in this process while it serves (ebca_common/sweep.py:
    the served app does, in-process test apps do not); ``webhooks`` (default: as ``sweep``) runs the
    webhook dispatcher (api/webhooks.py)."""
    settings = settings or get_settings()
    store = store or JobStore.from_settings(settings)
    storage = storage or storage_from_settings(settings)
    publisher = publisher or CeleryPublisher(settings)
    registry, http_requests = build_registry(store)
    keyring = KeyRing(settings, store)
    sweeper = Sweeper(settings, publisher, store) if sweep else None  # type: ignore[arg-type]
    dispatcher = Dispatcher(settings, store) if (sweep if webhooks is None else webhooks) else None
    aredis = events.async_redis(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        startup_warnings(settings, keyring)
        for part in (sweeper, dispatcher):
            if part is not None:
                part.start()
        yield
        for part in (sweeper, dispatcher):
            if part is not None:
                part.stop()
        await aredis.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="EBCA Serve",
        version="0.1.0",
        description="Text-to-image generation and editing with energy-based cross-attention. "
        "Jobs are queued and run by GPU workers; follow GET /jobs/{id}/events, poll GET /jobs/{id} "
        "or give a webhook.",
    )
    app.state.services = Services(
        settings=settings,
        store=store,
        storage=storage,
        jobs=JobService(settings, store, storage, publisher),
        registry=registry,
        keyring=keyring,
        aredis=aredis,
        webhook_secrets=WebhookSecrets(settings, store.r),
    )
    # The adapters' routes answer errors in their clients' shapes (docs/COMPAT.md).
    install_error_handlers(app, settings, {"/v1/": openai.render_error, "/sdapi/": a1111.render_error})
    _add_middleware(app, settings, http_requests)
    _include_routers(app)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def _add_middleware(app: FastAPI, settings: Settings, http_requests: Any) -> None:
    """CORS (origins from EBCA_CORS_ORIGINS; none by default) and the request counter of /metrics."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=[
                "Location",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
                "RateLimit-Policy",
            ],  # fmt: skip
        )

    @app.middleware("http")
    async def _count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        http_requests.labels(request.method, path, str(response.status_code)).inc()
        return response


def _include_routers(app: FastAPI) -> None:
    app.include_router(service.health)  # liveness and readiness: no key
    app.include_router(page.router)  # the web page: public, it calls the API with the user's key
    app.mount("/static", page.static_files, name="static")
    # Everything else needs a key (routes that use the caller declare it too; FastAPI runs it once).
    for router in (submit.router, jobs.router, events.router, keys.router, service.router):
        app.include_router(router, dependencies=[Depends(current_caller)])
    # The drop-in adapters (api/compat/): the OpenAI Images API and the AUTOMATIC1111 API, each router
    # with its key dependency; the signed image URLs of the OpenAI adapter carry their own proof.
    for router in (openai.router, openai.files, a1111.router):
        app.include_router(router)


app = create_app(sweep=True)
