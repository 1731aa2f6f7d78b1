"""The one settings module of the service (api and worker both read it).

Every value comes from an ``EBCA_``-prefixed environment variable, except the AWS credentials, which
keep their standard names (declared here with ``validation_alias`` so no other module reads the
environment).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ebca_common.keys import Limits

#: The repository root: relative paths in settings are resolved against it, so the api and the worker
#: agree on them whatever their working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(value: str) -> str:
    """Resolve a relative filesystem path against the repository root; leave absolute paths alone."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (REPO_ROOT / path).resolve())


def looks_like_path(value: str) -> bool:
    """Tell a directory from a hub id (``owner/name``).

    Explicit paths (leading ``.``, ``/``, ``~``) are paths; otherwise a value whose first segment is a
    directory of the repository (``models/shapes``) is a path even before the model is written there.
    """
    if value.startswith((".", "/", "~")):
        return True
    return (REPO_ROOT / value).exists() or (REPO_ROOT / value.split("/", 1)[0]).is_dir()


class Settings(BaseSettings):
    """Configuration of the api and the worker. Field ``x`` is read from ``EBCA_X``."""

    model_config = SettingsConfigDict(env_prefix="EBCA_", extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job store and Celery broker.")
    key_prefix: str = Field("ebca", description="Namespace of every job-store key in Redis.")
    redis_timeout_seconds: float = Field(2.0, gt=0, description="Socket timeouts towards Redis.")

    storage_url: str = Field(
        "var/storage",
        description="A local directory (relative to the repository root) or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto).")
    s3_public_url: str | None = Field(
        None,
        description="Endpoint that clients reach for presigned downloads when it differs from "
        "EBCA_S3_ENDPOINT_URL (e.g. http://localhost:9000 outside the compose network); null = the same.",
    )
    aws_access_key_id: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: str | None = Field(
        None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key")
    )
    aws_session_token: str | None = Field(
        None, validation_alias=AliasChoices("AWS_SESSION_TOKEN", "aws_session_token")
    )
    aws_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION", "aws_region")
    )
    presign_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Presigned URL lifetime.")

    default_model: str = Field(
        "models/shapes", description="Diffusers directory (relative to the repository root) or hub id."
    )
    models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='Extra models, JSON object id -> directory or hub id, e.g. {"sd15": "/m/sd15"}.',
    )

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Per uploaded file.")
    max_json_bytes: int = Field(256 * 1024, ge=1024, description="Largest JSON request body.")
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Largest uploaded image (w*h).")
    max_edits: int = Field(4, ge=1, description="Most editorial prompts per request.")
    max_images: int = Field(4, ge=1, description="Most images per job.")
    max_queue: int = Field(1000, ge=1, description="Queued jobs beyond this get 429.")
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After sent with 429 and 503.")

    max_batch: int = Field(
        8,
        ge=1,
        description="Image rows a worker denoises in one batch: a starting generate job takes compatible "
        "queued jobs along up to this many images (1 = no coalescing; a job's own images always run "
        "together).",
    )
    batch_max_pixels: int = Field(
        8 * 512 * 512,
        ge=64,
        description="Coalescing stops before a batch's images (width x height x images) exceed this "
        "(a lone job runs whatever its size).",
    )
    max_attempts: int = Field(3, ge=1, description="Worker crashes a job may cause before it fails.")
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    queue: str = Field("gpu", description="Celery queue the api publishes to and the worker consumes.")
    worker_concurrency: int = Field(1, ge=1, description="Worker processes per `celery worker`.")
    max_cached_models: int = Field(2, ge=1, description="Pipelines a worker process keeps loaded (LRU).")
    visibility_timeout: float = Field(
        3600.0,
        gt=0,
        description="Seconds before the Redis broker redelivers an unacknowledged message. Crash "
        "recovery does not wait for it (leases, docs/DEPLOY.md); keep it longer than the longest job.",
    )
    restore_interval: float = Field(
        10.0, gt=0, description="How often a worker looks for unacknowledged jobs to redeliver."
    )
    heartbeat_seconds: float = Field(2.0, gt=0, description="Worker heartbeat period.")
    heartbeat_ttl: float = Field(10.0, gt=0, description="A worker silent this long counts as dead.")
    republish_grace_seconds: float = Field(
        30.0,
        gt=0,
        description="A job queued this long whose broker message is gone is published again (longer "
        "than the api takes to store a request's uploads).",
    )
    job_timeout_seconds: int = Field(900, ge=1, description="timeout_seconds of a request that gives none.")
    max_job_seconds: int = Field(3600, ge=1, description="Largest timeout_seconds a request may give.")
    job_ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="Finished job records expire after.")

    auth: Literal["required", "off"] = Field(
        "required",
        description="required: every request but /healthz and /readyz needs an API key (Bearer); off: "
        "no keys, one trusted user (the api logs a warning).",
    )
    api_keys: str = Field(
        "", description='Key entries as JSON: [{"name", "role", "hash": "sha256:...", "limits"?}].'
    )
    api_keys_file: str | None = Field(
        None, description="A file with the same JSON list, re-read when it changes (relative: repo root)."
    )
    key_rate_per_minute: float | None = Field(
        60.0, gt=0, description="Default submits per minute of a user key (token bucket refill)."
    )
    key_burst: int | None = Field(
        30, ge=1, description="Default bucket size: submits a user key may make at once."
    )
    key_max_active_jobs: int | None = Field(
        32, ge=1, description="Default cap on a user key's jobs queued + running."
    )
    key_max_images_per_day: int | None = Field(
        5000, ge=1, description="Default cap on the images a user key submits per UTC day."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS, comma-separated (none by default: same-origin only).",
    )
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=60, description="Idempotency keys expire after.")

    events_keepalive_seconds: float = Field(
        15.0, gt=0, description="GET /jobs/{id}/events sends a keep-alive comment after this long idle."
    )
    events_maxlen: int = Field(
        500, ge=10, description="Events kept per job (older ones are trimmed; a resume past them restarts)."
    )
    webhook_secret: str | None = Field(
        None,
        description="Service secret the per-key webhook secrets derive from; unset: one is made at random "
        "and kept in Redis (shared by every api replica).",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs over http and to loopback or private addresses (tests, a private "
        "network); off: https to public hosts only.",
    )
    webhook_retry_seconds: float = Field(
        3600.0, gt=0, description="How long a failing webhook delivery is retried before it counts failed."
    )
    webhook_backoff_seconds: float = Field(
        5.0, gt=0, description="First retry delay of a failed delivery; it doubles per attempt (max 10 min)."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a receiver has to answer one delivery."
    )

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _no_secret(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"EBCA_MODELS must be a JSON object: {exc}") from exc
        return value

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _no_file(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> Settings:
        if self.job_timeout_seconds > self.max_job_seconds:
            raise ValueError(
                f"EBCA_JOB_TIMEOUT_SECONDS ({self.job_timeout_seconds}) is over "
                f"EBCA_MAX_JOB_SECONDS ({self.max_job_seconds})"
            )
        return self

    @property
    def default_limits(self) -> Limits:
        """The limits of a user key whose entry sets none."""
        return Limits(
            rate_per_minute=self.key_rate_per_minute,
            burst=self.key_burst,
            max_active_jobs=self.key_max_active_jobs,
            max_images_per_day=self.key_max_images_per_day,
        )

    @property
    def storage_is_s3(self) -> bool:
        return self.storage_url.startswith("s3://")

    @property
    def storage_root(self) -> str:
        """The local storage directory, absolute."""
        return resolve_path(self.storage_url)

    @property
    def default_model_id(self) -> str:
        """The id clients see for the default model: the directory name, or the hub id itself."""
        for model_id, location in self.models.items():
            if location == self.default_model:
                return model_id
        if looks_like_path(self.default_model):
            return Path(self.default_model.rstrip("/")).name
        return self.default_model

    def model_table(self) -> dict[str, str]:
        """Model id -> absolute directory or hub id; the default model is always listed."""
        table = {self.default_model_id: self.default_model}
        table.update(self.models)
        return {
            model_id: resolve_path(location) if looks_like_path(location) else location
            for model_id, location in table.items()
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
