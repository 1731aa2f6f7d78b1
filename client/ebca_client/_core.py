"""I/O-free pieces shared by the sync and async clients: request building, retry decisions, error
parsing and image encoding. ``client.py`` and ``aio.py`` only add the sending and the sleeping."""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ebca_client.errors import (
    APIError,
    EBCAClientError,
    IntegrityError,
    InvalidArgumentError,
    JobCanceled,
    JobFailed,
    JobNotFinished,
)
from ebca_client.models import EditSpec, EnergySpec, ImageRef, ImageResult, InversionSpec, JobInfo, JobStatus

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
# The server explicitly did not process the request: safe to repeat for any method.
RETRY_ALWAYS_STATUSES = frozenset({429, 503})
# A proxy in between may or may not have forwarded it: only safe when repeating cannot duplicate work.
RETRY_IF_SAFE_STATUSES = frozenset({502, 504})

EnergyArg = EnergySpec | Mapping[str, Any] | None
EditArg = EditSpec | Mapping[str, Any] | str
ImageArg = str | os.PathLike[str] | bytes | bytearray | memoryview | ImageRef | Any


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

    def build(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        kwargs: dict[str, Any] = {"headers": dict(self.headers), "params": self.params}
        if self.files is not None:
            kwargs["files"] = self.files
            kwargs["data"] = self.form or {}
        elif self.json_body is not None:
            kwargs["json"] = self.json_body
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
    """Turn an error response into ``APIError``, reading the documented ``{"error": {...}}`` body and
    falling back gracefully for anything else (a proxy's HTML page, FastAPI's ``{"detail"}``)."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()
        message = text[:500] if text else (response.reason_phrase or "error")
        return APIError(status, f"http_{status}", message, None, text, retry_after=retry_after)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return APIError(
            status,
            str(err.get("code") or f"http_{status}"),
            str(err.get("message") or response.reason_phrase or "error"),
            err.get("field"),
            body,
            retry_after=retry_after,
        )
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
        return APIError(status, f"http_{status}", message, None, body, retry_after=retry_after)
    return APIError(status, f"http_{status}", json.dumps(body)[:500], None, body, retry_after=retry_after)


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------------
# Request bodies


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    # Fields left None take the server's defaults (docs/API.md), so the client never has to copy them.
    return {k: v for k, v in values.items() if v is not None}


def energy_json(energy: EnergyArg, name: str = "energy") -> dict[str, Any] | None:
    if energy is None:
        return None
    if isinstance(energy, EnergySpec):
        return energy.to_json()
    if isinstance(energy, Mapping):
        return dict(energy)
    raise InvalidArgumentError(name, f"expected EnergySpec or a mapping, got {type(energy).__name__}")


def edits_json(edits: Sequence[EditArg] | None, name: str = "edits") -> list[dict[str, Any]] | None:
    if edits is None:
        return None
    if isinstance(edits, (str, Mapping, EditSpec)):
        edits = [edits]
    out: list[dict[str, Any]] = []
    for i, edit in enumerate(edits):
        if isinstance(edit, EditSpec):
            out.append(edit.to_json())
        elif isinstance(edit, str):
            out.append({"prompt": edit})
        elif isinstance(edit, Mapping):
            out.append(dict(edit))
        else:
            raise InvalidArgumentError(
                f"{name}.{i}", f"expected EditSpec, a mapping or a prompt string, got {type(edit).__name__}"
            )
    return out


def inversion_json(inversion: InversionSpec | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if inversion is None:
        return None
    if isinstance(inversion, InversionSpec):
        return inversion.to_json()
    return dict(inversion)


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


def submit_spec(
    path: str, body: dict[str, Any], uploads: Mapping[str, ImageArg] | None, idempotency_key: str | None
) -> RequestSpec:
    """A keyed POST: JSON when nothing is uploaded, else multipart with the JSON in the ``request``
    part (docs/API.md, POST /edit). ``ImageRef`` uploads become ``<name>_ref`` fields of the body."""
    key = idempotency_key or new_idempotency_key()
    headers = {"Idempotency-Key": key}
    body = dict(body)
    files: dict[str, tuple[str, bytes, str]] = {}
    for name, value in (uploads or {}).items():
        if value is None:
            continue
        if isinstance(value, ImageRef):
            body[f"{name}_ref"] = value.to_json()
        else:
            files[name] = encode_image(value, name)
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
    except ImportError as exc:  # pragma: no cover - pillow is a dependency of the project
        raise EBCAClientError("decoding images needs pillow: pip install pillow") from exc
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
# Submit bodies. Each builder receives the submit method's arguments (``locals()``) and picks the
# documented fields by name, so the sync and async clients cannot drift apart.

_GENERATE_FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "num_images",
    "seed",
    "output_format",
)
_INPAINT_FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "steps",
    "guidance_scale",
    "scheduler",
    "num_images",
    "seed",
    "output_format",
)
_REAL_FIELDS = ("source_prompt", "model", "steps", "guidance_scale", "num_images", "seed", "output_format")


def _with_extra(body: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    extra = params.get("extra")
    if extra:
        body.update(extra)
    return body


def generate_body(params: Mapping[str, Any]) -> dict[str, Any]:
    body = _drop_none({k: params.get(k) for k in _GENERATE_FIELDS})
    body.update(
        _drop_none({"energy": energy_json(params.get("energy")), "edits": edits_json(params.get("edits"))})
    )
    return _with_extra(body, params)


def inpaint_body(params: Mapping[str, Any]) -> dict[str, Any]:
    body = {"mode": "inpaint", **_drop_none({k: params.get(k) for k in _INPAINT_FIELDS})}
    body.update(_drop_none({"energy": energy_json(params.get("energy"))}))
    return _with_extra(body, params)


def real_body(params: Mapping[str, Any]) -> dict[str, Any]:
    body = {"mode": "real", **_drop_none({k: params.get(k) for k in _REAL_FIELDS})}
    body["edits"] = edits_json(params.get("edits")) or []
    body.update(
        _drop_none(
            {
                "energy": energy_json(params.get("energy")),
                "inversion": inversion_json(params.get("inversion")),
            }
        )
    )
    return _with_extra(body, params)


def synthetic_body(params: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "mode": "synthetic",
        "source_job_id": job_id_of(params.get("source_job")),
        "edits": edits_json(params.get("edits")) or [],
    }
    body.update(_drop_none({"output_format": params.get("output_format")}))
    return _with_extra(body, params)


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
