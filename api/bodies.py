"""Reading request bodies: size-bounded while streaming, JSON or multipart, with every refusal a
422/413 naming the part or header at fault (docs/API.md, "POST /edit")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.service import Upload
from ebca_common.errors import PayloadTooLarge, ValidationFailed
from ebca_common.settings import Settings
from ebca_common.specs import load_json


async def read_limited(request: Request, limit: int, what: str) -> bytes:
    """Read the body, refusing with 413 as soon as it passes ``limit`` (never buffering more)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} of {declared} bytes is over the limit of {limit} bytes")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def wrong_content_type(request: Request, expected: str) -> ValidationFailed:
    got = request.headers.get("content-type", "")
    return ValidationFailed(f"content-type: expected {expected}, got {got!r}", field="content-type")


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isprintable():
        raise ValidationFailed(
            "Idempotency-Key: must be 1 to 200 printable characters", field="Idempotency-Key"
        )
    return key


def multipart_limit(settings: Settings) -> int:
    """Largest multipart body: two uploads, the JSON part and room for the part headers."""
    return 2 * settings.max_upload_bytes + settings.max_json_bytes + 64 * 1024


#: More parts than a valid request has (request, image, mask), so that an unexpected or repeated part
#: is named by the checks below; past these counts the parser refuses the body as a whole.
_MAX_PARTS = 16


async def parse_multipart(request: Request, raw: bytes, settings: Settings) -> tuple[Any, dict[str, Upload]]:
    async def body() -> AsyncIterator[bytes]:
        yield raw

    # Part sizes are checked below, per part and with the field named; the parser's own bound is only
    # the whole body's (already enforced while reading).
    parser = MultiPartParser(
        request.headers,
        body(),
        max_files=_MAX_PARTS,
        max_fields=_MAX_PARTS,
        max_part_size=multipart_limit(settings),
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ValidationFailed(f"body: malformed multipart request ({exc.message})", field=None) from None
    uploads: dict[str, Upload] = {}
    request_part: str | None = None
    seen: set[str] = set()
    for name, value in form.multi_items():
        if name in seen:
            raise ValidationFailed(f"{name}: the part is given more than once", field=name)
        seen.add(name)
        if name == "request":
            # Some clients send the JSON part as a file (with a filename or application/json type).
            data = await value.read() if isinstance(value, UploadFile) else value.encode("utf-8", "replace")
            if len(data) > settings.max_json_bytes:
                raise PayloadTooLarge(
                    f"request: {len(data)} bytes is over the limit of {settings.max_json_bytes} bytes",
                    field="request",
                )
            try:
                request_part = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationFailed("request: not UTF-8 text", field="request") from None
        elif name in ("image", "mask"):
            if not isinstance(value, UploadFile):
                raise ValidationFailed(
                    f"{name}: must be a file part (with a filename), not a text field", field=name
                )
            data = await value.read()
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"{name}: {len(data)} bytes is over the limit of {settings.max_upload_bytes} bytes",
                    field=name,
                )
            uploads[name] = Upload(data, value.filename)
        else:
            kind = "file part" if isinstance(value, UploadFile) else "form field"
            raise ValidationFailed(
                f"{name or '(unnamed)'}: unexpected {kind} (send `request`, `image`, `mask`)",
                field=name or None,
            )
    if request_part is None:
        raise ValidationFailed(
            "request: the part `request` (the JSON body as text) is required", field="request"
        )
    return load_json(request_part, field="request"), uploads


async def json_body(request: Request, settings: Settings) -> Any:
    """The decoded JSON body of ``request`` (content type application/json or none)."""
    if media_type(request) not in ("", "application/json"):
        raise wrong_content_type(request, "application/json")
    return load_json(await read_limited(request, settings.max_json_bytes, "the JSON body"))


async def edit_body(request: Request, settings: Settings) -> tuple[Any, dict[str, Upload]]:
    """The JSON of an edit request and its uploads: a JSON body, or multipart with a ``request`` part."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        raw = await read_limited(request, multipart_limit(settings), "the multipart body")
        return await parse_multipart(request, raw, settings)
    if kind in ("", "application/json"):
        return load_json(await read_limited(request, settings.max_json_bytes, "the JSON body")), {}
    raise wrong_content_type(request, "application/json or multipart/form-data")
