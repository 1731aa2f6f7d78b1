"""Python SDK and ``ebca`` command line for EBCA Serve (depends on httpx and pydantic only).

from ebca_client import Client, EnergySpec, EditSpec
with Client("http://127.0.0.1:8000") as client:        # api_key= or $EBCA_API_KEY where auth is on
    energy = EnergySpec(gamma_attn=0.01, gamma_norm=0.02, token_weights={"crown": 2.5})
    job = client.generate("a lion with a crown", energy=energy)
    for event in job.events():                           # live: queue position, steps, result
        print(event.status, event.progress.step, event.progress.total)
    paths = job.wait(timeout=300).save("out/")
"""

from __future__ import annotations

from ebca_client._core import RetryPolicy
from ebca_client._version import __version__
from ebca_client.aio import AsyncClient, AsyncJob
from ebca_client.client import Client, Job
from ebca_client.errors import (
    APIError,
    AuthenticationError,
    EBCAClientError,
    EventStreamError,
    EventsUnavailable,
    IntegrityError,
    InvalidArgumentError,
    JobCanceled,
    JobError,
    JobFailed,
    JobNotFinished,
    JobTimeout,
    TransportError,
)
from ebca_client.models import (
    EditSpec,
    EnergySpec,
    ImageRef,
    ImageResult,
    InversionSpec,
    JobEvent,
    JobInfo,
    JobStatus,
    ModelInfo,
    Progress,
    ScheduleSpec,
)
from ebca_client.settings import ClientSettings
from ebca_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "Client",
    "ClientSettings",
    "EBCAClientError",
    "EditSpec",
    "EnergySpec",
    "EventStreamError",
    "EventsUnavailable",
    "ImageRef",
    "ImageResult",
    "IntegrityError",
    "InvalidArgumentError",
    "InversionSpec",
    "Job",
    "JobCanceled",
    "JobError",
    "JobEvent",
    "JobFailed",
    "JobInfo",
    "JobNotFinished",
    "JobStatus",
    "JobTimeout",
    "ModelInfo",
    "Progress",
    "RetryPolicy",
    "ScheduleSpec",
    "TransportError",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
