"""Client-side settings: the one place the SDK and the ``ebca`` command line read the environment.

The client depends on httpx and pydantic only (no pydantic-settings), so the handful of variables
is read here by hand and validated by a pydantic model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, Field, field_validator

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseModel):
    """Connection and retry defaults. Explicit constructor arguments always win over these."""

    api_url: str = Field(DEFAULT_API_URL, description="Base URL of the EBCA Serve API (EBCA_API_URL).")
    timeout: float = Field(30.0, gt=0, description="Per-request HTTP timeout in seconds (EBCA_API_TIMEOUT).")
    max_retries: int = Field(
        4, ge=0, le=20, description="Retries for idempotent calls and keyed submits (EBCA_API_MAX_RETRIES)."
    )

    @field_validator("api_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        """Build settings from ``EBCA_API_URL``, ``EBCA_API_TIMEOUT`` and ``EBCA_API_MAX_RETRIES``."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for field, var in (
            ("api_url", "EBCA_API_URL"),
            ("timeout", "EBCA_API_TIMEOUT"),
            ("max_retries", "EBCA_API_MAX_RETRIES"),
        ):
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate(values)
