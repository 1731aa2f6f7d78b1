"""I/O-free pieces of the client: request building, retry decisions, error parsing, image encoding.

The logic that interleaves them with I/O (retries, waiting, the event stream) is in ``_base.py``."""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ebca_client.errors import (
    APIError,
    AuthenticationError,
    EBCAClientError,
    IntegrityError,
    InvalidArgumentError,
    JobCanceled,
    JobFailed,
    JobNotFinished,
)
from ebca_client.models import (
    EditSpec,
    EnergySpec,
    ImageRef,
    ImageResult,
    InversionSpec,
    JobInfo,
    JobStatus,
    _Request,
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
# The server explicitly did not process the request: safe to repeat for any method.
RETRY_ALWAYS_STATUSES = frozenset({429, 503})
# A proxy in between may or may not have forwarded it: only safe when repeating cannot duplicate work.
RETRY_IF_SAFE_STATUSES = frozenset({502, 504})

EnergyArg = EnergySpec | Mapping[str, Any] | None
EditArg = EditSpec | Mapping[str, Any] | str
InversionArg = InversionSpec | Mapping[str, Any] | None
ImageArg = str | os.PathLike[str] | bytes | bytearray | memoryview | ImageRef | Any
_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; ``Retry-After`` from the server wins when it is larger."""

    max_retries: int = 4
    backoff_initial: float = 0.25
    backoff_factor: float = 2.0
    backoff_max: float = 8.0
    retry_after_max: float = 60.0
    jitter: float = 0.1

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry ``retry_number`` (1-based)."""
        base = min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (retry_number - 1))
        base *= 1.0 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            base = max(base, min(retry_after, self.retry_after_max))
        return max(0.0, base)


@dataclass
class RequestSpec:
    """Everything needed to send (and re-send, byte for byte) one API call."""

    method: str
    path: str
    json_body: Any = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    form: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    # A submit carrying an Idempotency-Key may be repeated: the server maps the key to one job.
    keyed: bool = False

    @property
    def retryable_on_transport_error(self) -> bool:
        return self.method in IDEMPOTENT_METHODS or self.keyed

    def build(
        self, client: httpx.Client | httpx.AsyncClient, read_timeout: float | None = None
    ) -> httpx.Request:
        """The request to send; ``read_timeout`` replaces the client's for this request alone (the
        longest wait for the next bytes of a response, which for an event stream is the silence
        allowed between events)."""
        kwargs: dict[str, Any] = {"headers": dict(self.headers), "params": self.params}
        if self.files is not None:
            kwargs["files"] = self.files
            kwargs["data"] = self.form or {}
        elif self.json_body is not None:
            kwargs["json"] = self.json_body
        if read_timeout is not None:
            base = client.timeout
            kwargs["timeout"] = httpx.Timeout(
                connect=base.connect, read=read_timeout, write=base.write, pool=base.pool
            )
        return client.build_request(self.method, self.path, **kwargs)


def should_retry_status(spec: RequestSpec, status: int) -> bool:
    if status in RETRY_ALWAYS_STATUSES:
        return True
    return status in RETRY_IF_SAFE_STATUSES and spec.retryable_on_transport_error


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def api_error_from_response(response: httpx.Response) -> APIError:
    """Turn an error response into ``APIError`` (``AuthenticationError`` for a 401), reading the
    documented ``{"error": {...}}`` body and falling back gracefully for anything else (a proxy's
    HTML page, FastAPI's ``{"detail"}``)."""
    status = response.status_code
    code, message, field_name, body = _error_parts(response)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 401:
        key_sent = "authorization" in response.request.headers
        return AuthenticationError(
            status, code, message, field_name, body, retry_after=retry_after, key_sent=key_sent
        )
    return APIError(status, code, message, field_name, body, retry_after=retry_after)


def _error_parts(response: httpx.Response) -> tuple[str, str, str | None, Any]:
    status = response.status_code
    fallback_code = f"http_{status}"
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()
        return fallback_code, text[:500] if text else (response.reason_phrase or "error"), None, text
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or response.reason_phrase or "error")
        return str(err.get("code") or fallback_code), message, err.get("field"), body
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return fallback_code, detail if isinstance(detail, str) else json.dumps(detail), None, body
    return fallback_code, json.dumps(body)[:500], None, body


def is_event_stream(response: httpx.Response) -> bool:
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == "text/event-stream"


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------------
# Request bodies


def request_model(request_type: type[_M], /, **fields: Any) -> _M:
    """Build a submit body from the call's arguments; a wrong type is an ``InvalidArgumentError``
    naming the field, raised before anything is sent."""
    try:
        return request_type(**fields)
    except ValidationError as exc:
        raise invalid_argument(exc) from None


def invalid_argument(exc: ValidationError) -> InvalidArgumentError:
    """The first error of a request model as ``InvalidArgumentError``. pydantic puts the branch of a
    union in an error's location (``energy.EnergySpec``): the field path keeps the field names and
    list indices only, and a value that fits no branch is told what the field takes."""
    errors = exc.errors()
    loc = errors[0]["loc"]
    path = ".".join(str(p) for p in loc if isinstance(p, int) or _FIELD_NAME.fullmatch(p)) or exc.title
    if loc and isinstance(loc[-1], str) and not _FIELD_NAME.fullmatch(loc[-1]):
        branches = [e["loc"][-1] for e in errors if e["loc"][:-1] == loc[:-1]]
        kinds = " or ".join(_BRANCH_NAMES.get(str(b), str(b)) for b in branches)
        return InvalidArgumentError(path, f"expected {kinds}, got {type(errors[0]['input']).__name__}")
    return InvalidArgumentError(path, errors[0]["msg"])


# Field names are lowercase; pydantic's union branch tags are type names.
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_BRANCH_NAMES = {"dict[str,any]": "a mapping"}


def job_id_of(job: Any) -> str:
    """Accept a job id, a ``JobInfo`` or a ``Job``/``AsyncJob`` handle."""
    if isinstance(job, str):
        if not job.strip() or "/" in job:
            raise InvalidArgumentError("job_id", f"not a job id: {job!r}")
        return job.strip()
    if isinstance(job, JobInfo):
        return job.id
    job_id = getattr(job, "id", None)
    if isinstance(job_id, str):
        return job_id
    raise InvalidArgumentError("job_id", f"expected a job id or a job, got {type(job).__name__}")


def image_input(name: str, value: ImageArg) -> tuple[ImageRef | None, ImageArg | None]:
    """An image argument as (a reference for the body's ``<name>_ref``, or bytes to upload)."""
    return (value, None) if isinstance(value, ImageRef) else (None, value)


def submit_spec(
    path: str,
    request: _Request,
    uploads: Mapping[str, ImageArg | None],
    extra: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> RequestSpec:
    """A keyed POST: JSON when nothing is uploaded, else multipart with the JSON in the ``request``
    part (docs/API.md, POST /edit). ``extra`` fields are added to the body as given (a field newer
    than this client)."""
    key = idempotency_key or new_idempotency_key()
    headers = {"Idempotency-Key": key}
    body = {**request.to_json(), **(extra or {})}
    files = {name: encode_image(value, name) for name, value in uploads.items() if value is not None}
    if not files:
        return RequestSpec("POST", path, json_body=body, headers=headers, keyed=True)
    # A boundary derived from the key keeps every retry byte-identical to the first attempt.
    boundary = "ebca-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    form = {"request": json.dumps(body, separators=(",", ":"), sort_keys=True)}
    return RequestSpec("POST", path, files=files, form=form, headers=headers, keyed=True)


# ---------------------------------------------------------------------------------------------------
# Images


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"\xff\xd8\xff", "jpg", "image/jpeg"),
    (b"GIF8", "gif", "image/gif"),
    (b"BM", "bmp", "image/bmp"),
)


def sniff_image_type(data: bytes) -> tuple[str, str]:
    for magic, ext, ctype in _MAGIC:
        if data.startswith(magic):
            return ext, ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return "bin", "application/octet-stream"


def _is_pil_image(value: Any) -> bool:
    # PIL is imported lazily: if the caller holds a PIL image, PIL.Image is already in sys.modules.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def encode_image(value: ImageArg, name: str) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for an upload given as a path, raw bytes or a PIL image."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise InvalidArgumentError(name, "image bytes are empty")
        ext, ctype = sniff_image_type(data)
        return f"{name}.{ext}", data, ctype
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(name, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
        if not data:
            raise InvalidArgumentError(name, f"{str(path)!r} is empty")
        _, ctype = sniff_image_type(data)
        return path.name, data, ctype
    if _is_pil_image(value):
        buffer = io.BytesIO()
        image = value
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1"):
            image = image.convert("RGB")
        image.save(buffer, format="PNG")
        return f"{name}.png", buffer.getvalue(), "image/png"
    raise InvalidArgumentError(
        name, f"expected a path, bytes, a PIL image or an ImageRef, got {type(value).__name__}"
    )


def decode_image(data: bytes) -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise EBCAClientError(
            "decoding images needs pillow: install ebca-client with its images extra "
            "(pip install 'ebca-client[images]' / './client[images]'), or pillow itself; "
            "save() and image_bytes() work without it"
        ) from exc
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def check_digest(data: bytes, expected: str | None, what: str) -> None:
    if expected and hashlib.sha256(data).hexdigest() != expected.lower():
        raise IntegrityError(f"{what}: sha256 mismatch (expected {expected})")


def image_filename(job_id: str, index: int, extension: str) -> str:
    return f"{job_id}-{index}.{extension}"


def next_poll_interval(current: float, maximum: float, factor: float = 1.5) -> float:
    return min(maximum, current * factor)


# ---------------------------------------------------------------------------------------------------
# Job outcomes


def raise_for_outcome(info: JobInfo) -> None:
    """Raise ``JobCanceled``/``JobFailed`` for a terminal job that did not succeed."""
    if info.status == JobStatus.CANCELED:
        raise JobCanceled(info)
    if info.status != JobStatus.SUCCEEDED:
        raise JobFailed(info)


def require_images(info: JobInfo) -> list[ImageResult]:
    if info.status != JobStatus.SUCCEEDED:
        if info.is_terminal:
            raise_for_outcome(info)
        raise JobNotFinished(info)
    return info.images


def image_result(info: JobInfo, index: int) -> ImageResult:
    for img in require_images(info):
        if img.index == index:
            return img
    raise IndexError(f"job {info.id} has no image {index} (it has {len(info.images)})")


def progress_key(info: JobInfo) -> tuple[Any, ...]:
    """What ``wait`` compares between polls to decide whether the job moved."""
    return (info.status, info.progress.stage, info.progress.step, info.queue_position)
