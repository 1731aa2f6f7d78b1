"""Webhooks in process: the request fields' validation, the per-key secrets, and the dispatcher's
deliveries (signed, retried with backoff under one webhook-id, given up after the retry window) to a
receiver on loopback, checked with the SDK's verify_webhook."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from testkeys import TestKeys
from webhook_receiver import Receiver, documented_verify

from api.main import create_app
from api.webhooks import Dispatcher, WebhookSecrets, sign
from ebca_client import verify_webhook
from ebca_common.jobs import JobStatus, WebhookSpec
from ebca_common.settings import Settings
from ebca_common.store import JobStore

ALICE = TestKeys.header(TestKeys.alice)


class NoQueue:
    def publish(self, job_id: str) -> None:
        pass


def app(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, publisher=NoQueue()), headers=ALICE)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"webhook": "http://hooks.example/x"}, "webhook"),  # http: only with ALLOW_PRIVATE
        ({"webhook": "https://127.0.0.1/x"}, "webhook"),
        ({"webhook": "https://localhost:8443/x"}, "webhook"),
        ({"webhook": "https://[::1]/x"}, "webhook"),
        ({"webhook": "https://10.1.2.3/x"}, "webhook"),
        ({"webhook": "https://169.254.169.254/latest"}, "webhook"),
        ({"webhook": "ftp://hooks.example/x"}, "webhook"),
        ({"webhook": "hooks.example/x"}, "webhook"),
        ({"webhook": "https://user:pw@hooks.example/x"}, "webhook"),
        ({"webhook": "https://hooks.example:99999/x"}, "webhook"),
        ({"webhook": "https://hooks.example/" + "x" * 2000}, "webhook"),
        ({"webhook": 5}, "webhook"),
        ({"webhook": "https://hooks.example/x", "webhook_events": []}, "webhook_events"),
        ({"webhook": "https://hooks.example/x", "webhook_events": ["start", "done"]}, "webhook_events[1]"),
        ({"webhook": "https://hooks.example/x", "webhook_events": "start"}, "webhook_events"),
        ({"webhook_events": ["start"]}, "webhook_events"),
    ],
)
def test_webhook_fields_are_checked(store_settings: Settings, fields: dict[str, Any], field: str) -> None:
    response = app(store_settings).post("/generate", json={"prompt": "a cat", **fields})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_the_job_keeps_the_webhook_and_shows_its_deliveries(store_settings: Settings) -> None:
    client = app(store_settings)
    response = client.post("/generate", json={"prompt": "a cat", "webhook": "https://hooks.example/x"})
    assert response.status_code == 202, response.text
    job = client.get(response.headers["location"]).json()
    assert job["webhook"] == {
        "url": "https://hooks.example/x",
        "events": ["start", "progress", "completed"],  # the default: all three
        "deliveries": {"delivered": 0, "pending": 0, "failed": 0, "last_error": None},
    }
    assert "webhook" not in job["request"] and "webhook_events" not in job["request"]
    plain = client.post("/generate", json={"prompt": "a cat"}).json()
    assert plain["webhook"] is None


def png(size: tuple[int, int], color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_multipart_edit_takes_the_webhook_fields_too(store_settings: Settings) -> None:
    client = app(store_settings)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask_bytes = io.BytesIO()
    mask.save(mask_bytes, format="PNG")
    files = {
        "image": ("i.png", png((32, 32), 90), "image/png"),
        "mask": ("m.png", mask_bytes.getvalue(), "image/png"),
    }

    def edit(**extra: Any) -> Any:
        body = {"mode": "inpaint", "prompt": "a hat", **extra}
        return client.post("/edit", data={"request": json.dumps(body)}, files=files)

    refused = edit(webhook="http://hooks.example/x")
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook"
    accepted = edit(webhook="https://hooks.example/x", webhook_events=["completed", "start", "completed"])
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["webhook"]["events"] == ["start", "completed"]


def test_private_receivers_are_allowed_when_the_setting_says_so(store_settings: Settings) -> None:
    settings = store_settings.model_copy(update={"webhook_allow_private": True})
    response = app(settings).post("/generate", json={"prompt": "a cat", "webhook": "http://127.0.0.1:9/x"})
    assert response.status_code == 202, response.text


def test_each_key_has_its_own_stable_webhook_secret(store_settings: Settings) -> None:
    client = app(store_settings)
    alice = client.get("/keys/me").json()["webhook_secret"]
    bob = client.get("/keys/me", headers=TestKeys.header(TestKeys.bob)).json()["webhook_secret"]
    assert alice.startswith("whsec_") and len(base64.b64decode(alice[6:])) == 32
    assert alice != bob
    # Another replica (another app on the same Redis) derives the same secret.
    assert app(store_settings).get("/keys/me").json()["webhook_secret"] == alice
    # A configured service secret decides them all.
    fixed = store_settings.model_copy(update={"webhook_secret": "s3cret"})
    first = app(fixed).get("/keys/me").json()["webhook_secret"]
    assert first != alice and first == app(fixed).get("/keys/me").json()["webhook_secret"]


# -- the dispatcher ----------------------------------------------------------------------------------------
@pytest.fixture
def hook_settings(store_settings: Settings) -> Settings:
    return store_settings.model_copy(
        update={"webhook_allow_private": True, "webhook_backoff_seconds": 0.05, "webhook_timeout_seconds": 2}
    )


def finished_job(store: JobStore, url: str, events: list[Any] | None = None) -> str:
    hook = WebhookSpec(url=url, events=events or ["start", "completed"])
    job, _ = store.create(kind="generate", mode=None, request={"prompt": "x"}, total_steps=2,
                          webhook=hook, owner=TestKeys.id_of(TestKeys.alice))  # fmt: skip
    store.heartbeat("w:1")
    store.begin(job.id, "w:1")
    store.finish(job.id, JobStatus.SUCCEEDED, lease="w:1", result={"images": []})
    return job.id


def due_ids(store: JobStore) -> list[str]:
    return list(store.r.zrange(store.k("webhooks", "due"), 0, -1))


def test_deliveries_are_signed_with_the_owners_secret(hook_settings: Settings) -> None:
    store = JobStore.from_settings(hook_settings)
    dispatcher = Dispatcher(hook_settings, store)
    with Receiver() as receiver:
        job_id = finished_job(store, receiver.url)
        assert [dispatcher.deliver(i) for i in due_ids(store)] == ["delivered", "delivered"]
    secret = WebhookSecrets(hook_settings, store.r).for_owner(TestKeys.id_of(TestKeys.alice))
    payloads = [verify_webhook(d.body, d.headers, secret) for d in receiver.deliveries()]
    assert [p["type"] for p in payloads] == ["start", "completed"]
    assert payloads[1]["data"]["job_id"] == job_id and payloads[1]["data"]["status"] == "succeeded"
    assert receiver.deliveries()[0].headers["content-type"] == "application/json"
    assert store.get(job_id).webhook.deliveries.model_dump() == {  # type: ignore[union-attr]
        "delivered": 2, "pending": 0, "failed": 0, "last_error": None,
    }  # fmt: skip
    assert due_ids(store) == [] and not store.r.hlen(store.k("webhooks", "msgs"))


def test_a_failing_receiver_gets_retries_with_one_webhook_id(hook_settings: Settings) -> None:
    store = JobStore.from_settings(hook_settings)
    dispatcher = Dispatcher(hook_settings, store)
    with Receiver(plan=[500, 503]) as receiver:
        job_id = finished_job(store, receiver.url, ["completed"])
        (msg_id,) = due_ids(store)
        assert dispatcher.deliver(msg_id) == "retry"
        first_due = store.r.zscore(store.k("webhooks", "due"), msg_id)
        assert dispatcher.deliver(msg_id) == "retry"
        second_due = store.r.zscore(store.k("webhooks", "due"), msg_id)
        # Exponential backoff: 0.05 s, then 0.1 s after the try (give or take the time a try takes).
        assert second_due - first_due > 0.05
        assert store.get(job_id).webhook.deliveries.last_error == "HTTP 503"  # type: ignore[union-attr]
        assert dispatcher.deliver(msg_id) == "delivered"
    seen = receiver.deliveries()
    assert len(seen) == 3 and {d.headers["webhook-id"] for d in seen} == {msg_id}
    assert len({d.body for d in seen}) == 1  # the same bytes every time
    deliveries = store.get(job_id).webhook.deliveries  # type: ignore[union-attr]
    assert (deliveries.delivered, deliveries.pending, deliveries.failed) == (1, 0, 0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_receiver_fails_after_the_retry_window(hook_settings: Settings) -> None:
    settings = hook_settings.model_copy(update={"webhook_retry_seconds": 0.2})
    store = JobStore.from_settings(settings)
    dispatcher = Dispatcher(settings, store)
    job_id = finished_job(store, f"http://127.0.0.1:{closed_port()}/x", ["completed"])
    (msg_id,) = due_ids(store)
    outcomes = []
    deadline = time.monotonic() + 10
    while not outcomes or outcomes[-1] == "retry":
        assert time.monotonic() < deadline
        outcomes.append(dispatcher.deliver(msg_id))
        time.sleep(0.05)
    assert outcomes[-1] == "failed" and set(outcomes[:-1]) == {"retry"}
    deliveries = store.get(job_id).webhook.deliveries  # type: ignore[union-attr]
    assert (deliveries.delivered, deliveries.pending, deliveries.failed) == (0, 0, 1)
    assert deliveries.last_error and "ConnectError" in deliveries.last_error
    assert due_ids(store) == []


def test_a_host_resolving_to_a_private_address_is_refused(
    store_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore.from_settings(store_settings)  # EBCA_WEBHOOK_ALLOW_PRIVATE off
    # A public-looking name passes the request check; what it resolves to is checked on delivery.
    resolved = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 443))]
    monkeypatch.setattr("api.webhooks.resolve", lambda *a, **k: resolved)
    job_id = finished_job(store, "https://hooks.example/x", ["completed"])
    (msg_id,) = due_ids(store)
    assert Dispatcher(store_settings, store).deliver(msg_id) == "failed"
    error = store.get(job_id).webhook.deliveries.last_error  # type: ignore[union-attr]
    assert error is not None and "refused" in error and "10.0.0.5" in error


def test_the_dispatcher_thread_delivers_what_is_due(hook_settings: Settings) -> None:
    store = JobStore.from_settings(hook_settings)
    dispatcher = Dispatcher(hook_settings, store)
    with Receiver() as receiver:
        finished_job(store, receiver.url)
        dispatcher.start()
        try:
            deadline = time.monotonic() + 10
            while len(receiver.deliveries()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            dispatcher.stop()
    assert len(receiver.deliveries()) == 2 and due_ids(store) == []


def test_sign_matches_the_sdks_verification() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, b"{}"),
    }
    assert verify_webhook(b"{}", headers, secret) == {}
    verify = documented_verify()
    assert verify(b"{}", headers, secret) == {}
    with pytest.raises(ValueError, match="bad signature"):
        verify(b"{ }", headers, secret)


def test_two_replicas_never_claim_the_same_delivery(hook_settings: Settings) -> None:
    store = JobStore.from_settings(hook_settings)
    for _ in range(3):
        finished_job(store, "http://127.0.0.1:9/x")  # two deliveries each
    first, second = Dispatcher(hook_settings, store), Dispatcher(hook_settings, store)
    now, lease = time.time(), time.time() + 60

    def claim(dispatcher: Dispatcher, count: int) -> list[str]:
        return list(dispatcher._claim(keys=[dispatcher._due], args=[now, lease, count]))

    a, b = claim(first, 4), claim(second, 4)
    assert len(a) == 4 and len(b) == 2 and not set(a) & set(b)
    assert claim(first, 4) == []  # all leased: due again only once the lease runs out
