"""The service itself: its models, liveness, readiness and metrics.

``health`` (liveness and readiness) is open to anyone, for load balancers and orchestrators; the rest
needs an API key, and /metrics an admin key (Prometheus sends it as a bearer token: docs/DEPLOY.md).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import AdminDep
from api.deps import ServicesDep, SettingsDep, StoreDep
from api.errors import ERRORS, error_response
from ebca_common.errors import Unavailable
from ebca_common.model_defaults import defaults_of

router = APIRouter(tags=["service"])
health = APIRouter(tags=["service"])


@router.get("/models", summary="Models that jobs may name, with the defaults of each")
def models(settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    default = settings.default_model_id
    # What the workers announced (they have the model files); a model no worker announced yet falls
    # back to its file when this process can see it, else to the built-in defaults.
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


@health.get("/healthz", summary="The api process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", summary="Redis answers and at least one worker is alive", responses={503: ERRORS[503]})
def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    try:
        store.ping()
        workers = store.live_workers()
    except Unavailable as exc:
        exc.retry_after = settings.retry_after_seconds
        return error_response(exc)
    if not workers:
        return error_response(
            Unavailable("no live worker (no heartbeat)", retry_after=settings.retry_after_seconds)
        )
    return JSONResponse({"status": "ready", "workers": len(workers)})


@router.get("/metrics", summary="Prometheus metrics (admin key)", response_class=Response, responses=ERRORS)
def metrics(services: ServicesDep, _: AdminDep) -> Response:
    return Response(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)
