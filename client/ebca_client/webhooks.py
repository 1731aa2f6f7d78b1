"""Webhook signatures, per the Standard Webhooks scheme (docs/API.md, webhooks).

A delivery carries three headers: ``webhook-id`` (the same on every retry of one delivery, so a
receiver can drop repeats), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``: one or
more space-separated ``v1,<base64 HMAC-SHA256>`` entries (more than one while a secret is being
rotated), each over ``f"{id}.{timestamp}.{body}"`` with the raw body bytes. The secret is given as
``whsec_<base64 of the key bytes>``.

    from ebca_client.webhooks import WebhookVerificationError, verify_webhook

    try:
        event = verify_webhook(request.body, request.headers, secret="whsec_...")
    except WebhookVerificationError:
        return 400
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from ebca_client.errors import EBCAClientError, InvalidArgumentError

SECRET_PREFIX = "whsec_"
#: How far a delivery's timestamp may be from the receiver's clock, either way (replay protection).
DEFAULT_TOLERANCE_SECONDS = 300.0


class WebhookVerificationError(EBCAClientError):
    """A webhook delivery failed verification: a header is missing or malformed, its timestamp is
    outside the tolerance, or no signature matches. Answer it with a 4xx and do not act on it."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix may be left off)."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError("secret", "expected whsec_ followed by base64") from None
    if not key:
        raise InvalidArgumentError("secret", "the key is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) of one delivery."""
    payload = body.encode() if isinstance(body, str) else body
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a delivery's signature and timestamp, then return its JSON payload.

    ``body`` must be the bytes exactly as received (not re-serialized JSON); ``headers`` is looked up
    without regard to case. Raises ``WebhookVerificationError`` when the delivery cannot be trusted.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = _header(lowered, "webhook-id")
    stamp = _header(lowered, "webhook-timestamp")
    signatures = _header(lowered, "webhook-signature")
    if not (stamp.isascii() and stamp.isdigit()):
        raise WebhookVerificationError(f"webhook-timestamp is not Unix seconds: {stamp[:40]!r}")
    timestamp = int(stamp)
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is {clock - timestamp:+.0f}s from now (tolerance {tolerance:g}s)"
        )
    expected = sign(secret, msg_id, timestamp, body).encode()
    offered = [entry.encode() for entry in signatures.split() if entry.startswith("v1,")]
    # Compare every entry, in constant time each, so the time taken tells nothing about the secret.
    matches = [hmac.compare_digest(expected, entry) for entry in offered]
    if not any(matches):
        raise WebhookVerificationError("no webhook-signature entry matches the body")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise WebhookVerificationError(f"the signed body is not JSON: {exc}") from None


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise WebhookVerificationError(f"the {name} header is missing")
    return value
