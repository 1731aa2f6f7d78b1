"""Client-side settings: the one place the SDK and the ``ebca`` command line read the environment.

The client depends on httpx and pydantic only (no pydantic-settings), so the handful of variables
is read here by hand and validated by a pydantic model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ebca_client.errors import InvalidArgumentError

DEFAULT_API_URL = "http://127.0.0.1:8000"

_ENV = (
    ("api_url", "EBCA_API_URL"),
    ("api_key", "EBCA_API_KEY"),
    ("timeout", "EBCA_API_TIMEOUT"),
    ("max_retries", "EBCA_API_MAX_RETRIES"),
)


class ClientSettings(BaseModel):
    """Connection and retry defaults. Explicit constructor arguments always win over these."""

    # A rejected value is not repeated in the error: it may be the API key.
    model_config = ConfigDict(hide_input_in_errors=True)

    api_url: str = Field(DEFAULT_API_URL, description="Base URL of the EBCA Serve API (EBCA_API_URL).")
    api_key: SecretStr | None = Field(
        None, description="API key, sent as `Authorization: Bearer <key>` (EBCA_API_KEY)."
    )
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

    @field_validator("api_key", mode="before")
    @classmethod
    def _check_key(cls, value: object) -> object:
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(secret, str):
            return value
        # A header value: visible ASCII only, so a pasted newline or space cannot split the header.
        # The key itself is never echoed back.
        if not re.fullmatch(r"[\x21-\x7e]+", secret):
            raise ValueError("must be one word of visible ASCII characters (no spaces or line breaks)")
        return secret

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        """Build settings from ``EBCA_API_URL``, ``EBCA_API_KEY``, ``EBCA_API_TIMEOUT`` and
        ``EBCA_API_MAX_RETRIES`` (an empty variable counts as unset). A bad value raises
        ``InvalidArgumentError`` naming the variable."""
        env = os.environ if environ is None else environ
        return cls._validated({field: env[var] for field, var in _ENV if env.get(var)}, dict(_ENV))

    def with_overrides(self, *, base_url: str | None = None, api_key: str | None = None) -> ClientSettings:
        """These settings with a client constructor's explicit arguments in place; a bad one raises
        ``InvalidArgumentError`` naming the argument."""
        values = self.model_dump()
        if base_url is not None:
            values["api_url"] = base_url
        if api_key is not None:
            values["api_key"] = api_key
        return self._validated(values, {"api_url": "base_url", "api_key": "api_key"})

    @classmethod
    def _validated(cls, values: Mapping[str, object], names: Mapping[str, str]) -> ClientSettings:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")
            raise InvalidArgumentError(names.get(field, field), message) from None
