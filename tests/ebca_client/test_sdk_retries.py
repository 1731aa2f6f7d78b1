"""Retry, backoff and idempotency behaviour of the sync and async clients (httpx.MockTransport)."""

from __future__ import annotations

import time
from collections import deque

import httpx
import pytest
from sdk_fakes import FakeAPI, Fault

from ebca_client import APIError, AsyncClient, Client, RetryPolicy, TransportError
from ebca_client._core import parse_retry_after

FAST = RetryPolicy(max_retries=3, backoff_initial=0.001, backoff_max=0.01)


def make_client(api: FakeAPI, retry: RetryPolicy = FAST) -> Client:
    return Client("http://api.test", retry=retry, transport=api.transport())


def test_get_retries_transport_errors_then_succeeds() -> None:
    api = FakeAPI(faults=deque([Fault("drop_before"), Fault("drop_before")]))
    with make_client(api) as client:
        job = client.generate("a cat")
        api.faults.extend([Fault("drop_before"), Fault("drop_after")])
        assert client.get_job(job.id).id == job.id
    # Two refused connections before the submit got through, then one refused and one lost answer.
    assert len(api.requests_to("POST", "/generate")) == 3 and len(api.jobs) == 1
    assert len(api.requests_to("GET", "/jobs/")) == 3


def test_get_gives_up_after_max_retries_with_transport_error() -> None:
    api = FakeAPI(faults=deque(Fault("drop_before") for _ in range(10)))
    with make_client(api) as client, pytest.raises(TransportError, match="ConnectError"):
        client.models()
    assert len(api.seen) == FAST.max_retries + 1


def test_503_is_retried_honouring_retry_after() -> None:
    api = FakeAPI(faults=deque([Fault("status", 503, {"Retry-After": "1"})]))
    with make_client(api) as client:
        started = time.monotonic()
        models = client.models()
        elapsed = time.monotonic() - started
    assert [m.id for m in models] == ["shapes"]
    # The policy's own backoff is ~1 ms: only the server's Retry-After explains a 1 s pause.
    assert elapsed >= 0.95


def test_429_on_submit_is_retried_and_makes_one_job() -> None:
    api = FakeAPI(faults=deque([Fault("status", 429, {"Retry-After": "0"})]))
    with make_client(api) as client:
        job = client.generate("a cat")
    posts = api.requests_to("POST", "/generate")
    assert len(posts) == 2
    assert len(api.jobs) == 1 and job.id in api.jobs


def test_retry_after_exhausted_raises_api_error_with_status() -> None:
    api = FakeAPI(faults=deque(Fault("status", 503, {"Retry-After": "0"}) for _ in range(10)))
    with make_client(api) as client, pytest.raises(APIError) as info:
        client.get_job("abc")
    assert info.value.status == 503 and info.value.code == "unavailable"
    assert info.value.message == "try later"
    assert len(api.seen) == FAST.max_retries + 1


def test_submit_dropped_after_processing_is_retried_with_same_key_one_job() -> None:
    api = FakeAPI(faults=deque([Fault("drop_after")]))
    with make_client(api) as client:
        job = client.generate("a lion with a crown", seed=3)
    posts = api.requests_to("POST", "/generate")
    assert len(posts) == 2
    keys = {p.headers["idempotency-key"] for p in posts}
    assert len(keys) == 1 and keys.pop()
    assert list(api.jobs) == [job.id]


def test_each_submit_call_has_its_own_key() -> None:
    api = FakeAPI()
    with make_client(api) as client:
        first = client.generate("a cat")
        second = client.generate("a cat")
    assert first.id != second.id
    keys = [p.headers["idempotency-key"] for p in api.requests_to("POST", "/generate")]
    assert len(set(keys)) == 2


def test_explicit_idempotency_key_is_sent_and_reuses_the_job() -> None:
    api = FakeAPI()
    with make_client(api) as client:
        first = client.generate("a cat", idempotency_key="my-key-1")
        second = client.generate("a cat", idempotency_key="my-key-1")
    assert first.id == second.id
    assert [p.headers["idempotency-key"] for p in api.seen] == ["my-key-1", "my-key-1"]


def test_submit_500_is_not_retried() -> None:
    api = FakeAPI(faults=deque([Fault("status", 500)]))
    with make_client(api) as client, pytest.raises(APIError) as info:
        client.generate("a cat")
    assert info.value.status == 500
    assert len(api.seen) == 1 and not api.jobs


def test_validation_error_is_not_retried_and_carries_field_and_message() -> None:
    api = FakeAPI()
    with make_client(api) as client, pytest.raises(APIError) as info:
        client.generate("")
    err = info.value
    assert (err.status, err.code, err.field) == (422, "validation_error", "prompt")
    assert err.message == "prompt must not be empty"
    assert err.body == {
        "error": {"code": "validation_error", "message": "prompt must not be empty", "field": "prompt"}
    }
    assert len(api.seen) == 1


def test_non_json_error_body_still_gives_api_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    client = Client(
        "http://api.test", retry=RetryPolicy(max_retries=0), transport=httpx.MockTransport(handler)
    )
    with client, pytest.raises(APIError) as info:
        client.get_job("x")
    assert info.value.status == 502 and info.value.code == "http_502"
    assert "bad gateway" in info.value.message


def test_retried_delete_that_already_canceled_reports_the_cancel() -> None:
    api = FakeAPI()
    with make_client(api) as client:
        job = client.generate("a cat")
        api.faults.append(Fault("drop_after"))  # the first DELETE cancels, its answer is lost
        canceled = client.cancel(job.id)
    assert canceled.status == "canceled"
    assert len(api.requests_to("DELETE", "/jobs/")) == 2


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=4.0) == pytest.approx(6.0)
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=40.0) == 0.0


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(backoff_initial=0.5, backoff_factor=2.0, backoff_max=3.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert RetryPolicy(retry_after_max=2.0, jitter=0.0).delay(1, retry_after=100.0) == 2.0


async def test_async_submit_dropped_after_processing_makes_one_job() -> None:
    api = FakeAPI(faults=deque([Fault("drop_after"), Fault("status", 503, {"Retry-After": "0"})]))
    async with AsyncClient("http://api.test", retry=FAST, transport=api.async_transport()) as client:
        job = await client.generate("a cat")
    posts = api.requests_to("POST", "/generate")
    assert len(posts) == 3
    assert len({p.headers["idempotency-key"] for p in posts}) == 1
    assert list(api.jobs) == [job.id]


async def test_async_api_error_surfaces() -> None:
    api = FakeAPI()
    async with AsyncClient("http://api.test", retry=FAST, transport=api.async_transport()) as client:
        with pytest.raises(APIError) as info:
            await client.get_job("missing")
    assert info.value.status == 404 and info.value.code == "not_found"


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBCA_API_URL", "http://from-env.test:1234/")
    api = FakeAPI()
    with Client(retry=FAST, transport=api.transport()) as client:
        assert client.base_url == "http://from-env.test:1234"
        client.models()
    assert api.seen[0].url.host == "from-env.test"
    with Client("http://explicit.test", transport=api.transport()) as client:
        assert client.base_url == "http://explicit.test"


def test_bad_base_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="http://"):
        Client("ftp://nope")
