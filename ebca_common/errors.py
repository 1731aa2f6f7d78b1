"""The service's error hierarchy.

Each error knows its HTTP status and its stable ``code``; the api renders every one of them as
``{"error": {"code", "message", "field"?}}`` (docs/API.md, "Errors").
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        #: Further response headers (the RateLimit-* fields of a 429, WWW-Authenticate of a 401).
        self.extra_headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return {**self.extra_headers, **retry}


class ValidationFailed(ServiceError):
    """The request is well-formed HTTP but a field is wrong (``field`` names it)."""

    status_code = 422
    code = "validation_error"


class Unauthorized(ServiceError):
    """No API key, or one the service does not know (or revoked)."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="ebca"'})


class Forbidden(ServiceError):
    """A valid key asking for what only an admin key may do (keys, metrics)."""

    status_code = 403
    code = "forbidden"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    """The job is in a state that does not allow the operation (cancel of a finished job)."""

    status_code = 409
    code = "conflict"


class IdempotencyConflict(ServiceError):
    status_code = 409
    code = "idempotency_conflict"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"


class Unavailable(ServiceError):
    """A backend (Redis, the broker, storage) cannot be reached; retry later."""

    status_code = 503
    code = "unavailable"


class StorageError(ServiceError):
    """Storage failed for a reason that is not the client's."""

    status_code = 503
    code = "unavailable"


class ObjectNotFound(NotFound):
    """A storage key does not exist."""
