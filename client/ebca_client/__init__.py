"""Python SDK and ``ebca`` command line for EBCA Serve (depends on httpx and pydantic only).

from ebca_client import Client, EnergySpec, EditSpec
with Client("http://127.0.0.1:8000") as client:
    energy = EnergySpec(gamma_attn=0.01, gamma_norm=0.02, token_weights={"crown": 2.5})
    job = client.generate("a lion with a crown", energy=energy)
    paths = job.wait(timeout=300).save("out/")
"""

from __future__ import annotations

from ebca_client._core import RetryPolicy
from ebca_client.aio import AsyncClient, AsyncJob
from ebca_client.client import Client, Job
from ebca_client.errors import (
    APIError,
    EBCAClientError,
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
    JobInfo,
    JobStatus,
    ModelInfo,
    Progress,
    ScheduleSpec,
)
from ebca_client.settings import ClientSettings

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ClientSettings",
    "EBCAClientError",
    "EditSpec",
    "EnergySpec",
    "ImageRef",
    "ImageResult",
    "IntegrityError",
    "InvalidArgumentError",
    "InversionSpec",
    "Job",
    "JobCanceled",
    "JobError",
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
]
