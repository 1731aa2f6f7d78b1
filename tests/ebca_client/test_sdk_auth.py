"""API keys in the SDK and the CLI: ``api_key=``, ``EBCA_API_KEY``, ``--api-key``, and 401s."""

from __future__ import annotations

import io

import httpx
import pytest
from sdk_fakes import FakeAPI, serve_cli_from

from ebca_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientSettings,
    InvalidArgumentError,
    RetryPolicy,
    cli,
)

FAST = RetryPolicy(max_retries=1, backoff_initial=0.001, backoff_max=0.01)


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBCA_API_KEY", raising=False)


def test_api_key_is_sent_as_bearer_on_every_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    api = FakeAPI(required_key="k-1")
    with Client("http://api.test", api_key="k-1", retry=FAST, transport=api.transport()) as client:
        job = client.generate("a cat")
        api.script(job.id, api.succeeded(job.id))
        job.wait(timeout=5, poll_interval=0.001)
        job.save(tmp_path)
        client.cancel(client.generate("a dog"))
    assert {r.headers["authorization"] for r in api.seen} == {"Bearer k-1"}
    assert {r.method for r in api.seen} == {"GET", "POST", "DELETE"}
    assert any("/images/" in r.url.path for r in api.seen)


def test_api_key_from_the_environment_and_the_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeAPI(required_key="from-env")
    monkeypatch.setenv("EBCA_API_KEY", "from-env")
    with Client("http://api.test", retry=FAST, transport=api.transport()) as client:
        client.models()
    with Client("http://api.test", api_key="explicit", retry=FAST, transport=api.transport()) as client:
        with pytest.raises(AuthenticationError):
            client.models()
    assert [r.headers["authorization"] for r in api.seen] == ["Bearer from-env", "Bearer explicit"]


def test_without_a_key_no_authorization_header_and_401_says_one_is_needed() -> None:
    api = FakeAPI(required_key="k")
    with Client("http://api.test", retry=FAST, transport=api.transport()) as client:
        with pytest.raises(AuthenticationError) as info:
            client.generate("a cat")
    assert "authorization" not in api.seen[0].headers
    err = info.value
    assert (err.status, err.code, err.key_sent) == (401, "unauthorized", False)
    assert str(err) == (
        "HTTP 401 unauthorized: missing or unknown API key: the API requires an API key "
        "(pass api_key=, or set EBCA_API_KEY)"
    )
    assert len(api.seen) == 1 and api.jobs == {}  # a 401 is not retried and created nothing


async def test_async_client_sends_the_key_and_maps_401() -> None:
    api = FakeAPI(required_key="k-async")
    async with AsyncClient("http://api.test", api_key="k-async", transport=api.async_transport()) as client:
        await client.models()
    async with AsyncClient("http://api.test", api_key="k-wrong", transport=api.async_transport()) as client:
        with pytest.raises(AuthenticationError, match="the API key was not accepted") as info:
            await client.get_job("j")
    assert info.value.key_sent


@pytest.mark.parametrize("key", ["two words", "line\nbreak", "tab\tkey", "", "ключ"])
def test_a_key_that_is_not_one_header_word_is_refused_without_echoing_it(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        Client("http://api.test", api_key=key)
    assert info.value.field == "api_key"
    assert key.strip() == "" or key not in str(info.value)
    if key:
        monkeypatch.setenv("EBCA_API_KEY", key)
        with pytest.raises(InvalidArgumentError) as from_env:
            ClientSettings.from_env()
        assert from_env.value.field == "EBCA_API_KEY" and key not in str(from_env.value)


def test_settings_never_show_the_key() -> None:
    settings = ClientSettings.from_env({"EBCA_API_KEY": "s3cr3t-key"})
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cr3t-key"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings.model_dump())


def test_the_key_does_not_follow_a_redirect_to_storage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    api = FakeAPI()
    to_storage: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s3.test":
            to_storage.append(request)
            return httpx.Response(200, content=api.image)
        if "/images/" in request.url.path:
            return httpx.Response(307, headers={"location": "http://s3.test/b/k.png?X-Amz-Signature=x"})
        return api.handle(request)

    transport = httpx.MockTransport(handler)
    with Client("http://api.test", api_key="k-secret", retry=FAST, transport=transport) as client:
        job = client.generate("a cat")
        api.script(job.id, api.succeeded(job.id))
        job.wait(timeout=5, poll_interval=0.001).save(tmp_path)
    assert api.seen[0].headers["authorization"] == "Bearer k-secret"
    (request,) = to_storage
    assert "authorization" not in request.headers


# ---------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    fake = FakeAPI(required_key="cli-key")
    serve_cli_from(fake, monkeypatch, FAST)
    return fake


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


def test_cli_api_key_flag_and_environment(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run("--api-key", "cli-key", "models")
    assert code == 0 and "shapes" in out, err
    monkeypatch.setenv("EBCA_API_KEY", "cli-key")
    assert run("models")[0] == 0
    assert [r.headers["authorization"] for r in api.seen] == ["Bearer cli-key", "Bearer cli-key"]


def test_cli_401_is_exit_3_with_what_to_do(api: FakeAPI) -> None:
    code, out, err = run("generate", "a cat")
    assert code == cli.EXIT_REJECTED and out == ""
    assert err == (
        "ebca: API error 401 unauthorized: missing or unknown API key: the API requires an API key "
        "(set EBCA_API_KEY or pass --api-key)\n"
    )
    code, _, err = run("--api-key", "wrong", "jobs", "get", "abc")
    assert code == cli.EXIT_REJECTED and "the API key was not accepted" in err
    code, _, err = run("--api-key", "has space", "models")
    assert code == cli.EXIT_USAGE and err.startswith("ebca: api_key: must be one word")
