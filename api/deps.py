"""FastAPI dependencies: the process-wide parts of the app (settings, job store, storage, job
service), built once by :func:`api.main.create_app` and handed to the routes through ``Depends``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from api.auth import KeyRing
from api.service import JobService
from api.webhooks import WebhookSecrets
from ebca_common.settings import Settings
from ebca_common.storage import Storage
from ebca_common.store import JobStore


@dataclass(frozen=True)
class Services:
    """What the routes of one app share; ``app.state.services``."""

    settings: Settings
    store: JobStore
    storage: Storage
    jobs: JobService
    registry: CollectorRegistry
    keyring: KeyRing
    #: The asyncio Redis client of the event streams (GET /jobs/{id}/events).
    aredis: aioredis.Redis
    webhook_secrets: WebhookSecrets


def services(request: Request) -> Services:
    return request.app.state.services


def settings(request: Request) -> Settings:
    return services(request).settings


def store(request: Request) -> JobStore:
    return services(request).store


def storage(request: Request) -> Storage:
    return services(request).storage


def job_service(request: Request) -> JobService:
    return services(request).jobs


SettingsDep = Annotated[Settings, Depends(settings)]
StoreDep = Annotated[JobStore, Depends(store)]
StorageDep = Annotated[Storage, Depends(storage)]
JobServiceDep = Annotated[JobService, Depends(job_service)]
ServicesDep = Annotated[Services, Depends(services)]
