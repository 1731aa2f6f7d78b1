"""Webhook signature verification (Standard Webhooks scheme). The expected signatures are computed
here with hmac and base64 directly, not with the module under test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from ebca_client import InvalidArgumentError, WebhookVerificationError, verify_webhook
from ebca_client.webhooks import sign

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
MSG_ID = "msg_2hAqVMGRiXgmBm1bJxA5pT"
TS = 1_790_000_000
BODY = json.dumps({"type": "completed", "job_id": "abc", "data": {"status": "succeeded"}}).encode()


def expected_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(signature: str, msg_id: str = MSG_ID, timestamp: int | str = TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


GOOD = expected_signature(KEY, MSG_ID, TS, BODY)


def test_the_specifications_example_delivery_verifies() -> None:
    # The example of the Standard Webhooks specification; the signature below was also recomputed
    # with expected_signature (same key, id, timestamp and body).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    key = base64.b64decode(secret.removeprefix("whsec_"))
    assert expected_signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == signature
    hdrs = headers(signature, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330)
    assert verify_webhook(body, hdrs, secret, now=1614265330 + 10) == {"test": 2432232314}


def test_a_signed_delivery_verifies_and_returns_its_payload() -> None:
    assert sign(SECRET, MSG_ID, TS, BODY) == GOOD
    payload = verify_webhook(BODY, headers(GOOD), SECRET, now=TS)
    assert payload == {"type": "completed", "job_id": "abc", "data": {"status": "succeeded"}}
    # Header names in any case (as a web framework may hand them over), the body as text, the
    # secret without its prefix.
    mixed = {"Webhook-Id": MSG_ID, "WEBHOOK-TIMESTAMP": str(TS), "Webhook-Signature": GOOD}
    assert verify_webhook(BODY.decode(), mixed, base64.b64encode(KEY).decode(), now=TS) == payload


def test_any_of_several_signatures_may_match() -> None:
    other = expected_signature(b"an old secret", MSG_ID, TS, BODY)
    assert verify_webhook(BODY, headers(f"{other} {GOOD}"), SECRET, now=TS)
    # Only v1 entries count: the same digest under another scheme's label does not.
    with pytest.raises(WebhookVerificationError, match="no webhook-signature entry matches"):
        verify_webhook(BODY, headers(GOOD.replace("v1,", "v1a,") + " " + other), SECRET, now=TS)


@pytest.mark.parametrize(
    ("body", "hdrs"),
    [
        (BODY + b" ", headers(GOOD)),  # the body changed (even by white space)
        (BODY, headers(GOOD, msg_id="msg_other")),  # the signature was for another delivery id
        (BODY, headers(expected_signature(KEY, MSG_ID, TS + 1, BODY))),  # for another timestamp
        (BODY, headers(expected_signature(b"x" * 32, MSG_ID, TS, BODY))),  # with another secret
        (BODY, headers("v1," + base64.b64encode(b"\0" * 32).decode())),
    ],
    ids=["body", "id", "timestamp", "secret", "zeros"],
)
def test_a_tampered_delivery_is_refused(body: bytes, hdrs: dict[str, str]) -> None:
    with pytest.raises(WebhookVerificationError, match="no webhook-signature entry matches"):
        verify_webhook(body, hdrs, SECRET, now=TS)


def test_the_timestamp_must_be_within_the_tolerance_either_way() -> None:
    assert verify_webhook(BODY, headers(GOOD), SECRET, now=TS + 300)
    assert verify_webhook(BODY, headers(GOOD), SECRET, now=TS - 300)
    with pytest.raises(WebhookVerificationError, match=r"\+301s from now \(tolerance 300s\)"):
        verify_webhook(BODY, headers(GOOD), SECRET, now=TS + 301)  # a replay of an old delivery
    with pytest.raises(WebhookVerificationError, match="-301s from now"):
        verify_webhook(BODY, headers(GOOD), SECRET, now=TS - 301)
    with pytest.raises(WebhookVerificationError, match="tolerance 5s"):
        verify_webhook(BODY, headers(GOOD), SECRET, now=TS + 6, tolerance=5)


@pytest.mark.parametrize(
    ("hdrs", "message"),
    [
        ({"webhook-timestamp": str(TS), "webhook-signature": GOOD}, "webhook-id header is missing"),
        ({"webhook-id": MSG_ID, "webhook-signature": GOOD}, "webhook-timestamp header is missing"),
        ({"webhook-id": MSG_ID, "webhook-timestamp": str(TS)}, "webhook-signature header is missing"),
        (headers(GOOD, timestamp="1.79e9"), "not Unix seconds"),
        (headers(GOOD, timestamp="-5"), "not Unix seconds"),
    ],
)
def test_missing_or_malformed_headers_are_refused(hdrs: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookVerificationError, match=message):
        verify_webhook(BODY, hdrs, SECRET, now=TS)


def test_a_bad_secret_is_an_argument_error_and_a_non_json_body_is_refused() -> None:
    for secret in ("whsec_not base64!", "whsec_"):
        with pytest.raises(InvalidArgumentError) as info:
            verify_webhook(BODY, headers(GOOD), secret, now=TS)
        assert info.value.field == "secret"
    text = b"not json"
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify_webhook(text, headers(expected_signature(KEY, MSG_ID, TS, text)), SECRET, now=TS)
