"""The SDK's error tree. Every exception the client raises on purpose derives from ``EBCAClientError``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ebca_client.models import JobInfo


class EBCAClientError(Exception):
    """Base class of every error raised by ``ebca_client``."""


class InvalidArgumentError(EBCAClientError, ValueError):
    """A call was made with an argument the client cannot even send (e.g. an unreadable image file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TransportError(EBCAClientError):
    """The API could not be reached (connection refused, dropped, timed out) after all retries."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class APIError(EBCAClientError):
    """The API answered with an error status.

    ``code``, ``message`` and ``field`` come from the documented error body
    ``{"error": {"code", "message", "field"}}``; ``body`` is the parsed JSON (or raw text) as sent.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        body: Any = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        where = f" (field {field})" if field else ""
        super().__init__(f"HTTP {status} {code}: {message}{where}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body
        self.retry_after = retry_after


class AuthenticationError(APIError):
    """HTTP 401: the API wants an API key and got none, or does not accept the one it got.

    Pass ``api_key=`` to the client, set ``EBCA_API_KEY``, or give the command line ``--api-key``.
    ``key_sent`` says whether this client sent one.
    """

    def __init__(self, *args: Any, key_sent: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_sent = key_sent

    def __str__(self) -> str:
        reason = "the API key was not accepted" if self.key_sent else "the API requires an API key"
        return f"{super().__str__()}: {reason} (pass api_key=, or set EBCA_API_KEY)"


class EventStreamError(EBCAClientError):
    """The job's live event stream (``GET /jobs/{id}/events``) could not be used: it broke the SSE
    format or sent an event the client cannot read. ``Job.wait`` then polls instead."""


class EventsUnavailable(EventStreamError):
    """The server does not offer live events: a 404 or 405 (a server older than the endpoint), or an
    answer that is not ``text/event-stream`` (a proxy in between). ``status`` is what it answered."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class IntegrityError(EBCAClientError):
    """Downloaded image bytes do not match the sha256 that the job record announced."""


class JobError(EBCAClientError):
    """Base of errors about a job's outcome; ``job`` is the last job record seen."""

    def __init__(self, message: str, job: JobInfo) -> None:
        super().__init__(message)
        self.job = job


class JobFailed(JobError):
    """The job ended ``failed`` (or ``canceled``: see ``JobCanceled``)."""

    def __init__(self, job: JobInfo) -> None:
        if job.error is not None:
            detail = f"{job.error.code}: {job.error.message}"
        else:
            detail = job.status
        super().__init__(f"job {job.id} {job.status}: {detail}", job)

    @property
    def code(self) -> str | None:
        return self.job.error.code if self.job.error else None


class JobCanceled(JobFailed):
    """The job ended ``canceled``; it produced no images."""


class JobNotFinished(JobError):
    """Images were asked for before the job finished; call ``wait()`` first."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(f"job {job.id} is {job.status}: call wait() before downloading images", job)


class JobTimeout(JobError):
    """``wait`` gave up before the job reached a terminal state; the job itself keeps running."""

    def __init__(self, job: JobInfo, timeout: float) -> None:
        super().__init__(
            f"job {job.id} still {job.status} after {timeout:g}s (stage {job.progress.stage})", job
        )
        self.timeout = timeout
