"""API keys in process (TestClient, real Redis under a private prefix, a fake queue): who gets in, who
sees which job, the per-key quotas, key management, and the headers that go with them. The real
service (uvicorn, workers, two api processes) is tested in tests/integration/test_auth_stack.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from testkeys import TestKeys

from api.main import create_app
from ebca_common.errors import Unavailable
from ebca_common.jobs import JobResult, JobStatus
from ebca_common.keys import hash_key
from ebca_common.settings import Settings
from ebca_common.store import JobStore

A, B, R = TestKeys.alice, TestKeys.bob, TestKeys.root


class Queue:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.fail = False

    def publish(self, job_id: str) -> None:
        if self.fail:
            raise Unavailable("broker down")
        self.sent.append(job_id)


class Api:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore.from_settings(settings)
        self.queue = Queue()
        self.app = create_app(settings, store=self.store, publisher=self.queue)
        self.http = TestClient(self.app)

    def call(self, method: str, path: str, key: str | None = A, **kwargs: Any) -> Any:
        headers = {**(TestKeys.header(key) if key else {}), **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def submit(self, key: str = A, **body: Any) -> Any:
        return self.call("POST", "/generate", key, json={"prompt": "a cat", **body})


@pytest.fixture
def api(store_settings: Settings) -> Api:
    return Api(store_settings)


def limited(settings: Settings, **limits: Any) -> Settings:
    """The test keys, alice with these limit overrides."""
    entries = json.loads(TestKeys.entries_json())
    entries[0]["limits"] = limits
    return settings.model_copy(update={"api_keys": json.dumps(entries)})


def assert_401(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized" and response.json()["error"]["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_every_operation_but_health_needs_a_valid_key(api: Api) -> None:
    paths = api.app.openapi()["paths"]
    probes = 0
    for path, operations in paths.items():
        concrete = path.replace("{job_id}", "x").replace("{index}", "0").replace("{key_id}", "k")
        for method in operations:
            for headers in ({}, TestKeys.header("ebca_no-such-key"), {"Authorization": f"Basic {A}"}):
                response = api.http.request(method.upper(), concrete, headers=headers)
                if path in ("/healthz", "/readyz"):
                    assert response.status_code in (200, 503)
                else:
                    assert_401(response)
                probes += 1
    assert probes >= 3 * 13
    assert api.store.job_count() == 0 and api.queue.sent == []
    # The schema says so: a bearer scheme, required by every operation but the two health probes.
    schema = api.app.openapi()
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "Bearer" in scheme["description"]
    for path, operations in paths.items():
        for operation in operations.values():
            assert bool(operation.get("security")) == (path not in ("/healthz", "/readyz")), path


def test_jobs_are_their_keys_and_admins_see_all(api: Api) -> None:
    mine = api.submit(A).json()["id"]
    theirs = api.submit(B).json()["id"]
    assert api.call("GET", f"/jobs/{mine}").json()["owner"] == TestKeys.id_of(A)
    for method, path in (("GET", f"/jobs/{theirs}"), ("DELETE", f"/jobs/{theirs}"),
                         ("GET", f"/jobs/{theirs}/images/0")):  # fmt: skip
        response = api.call(method, path, A)
        # Exactly what a job that does not exist gets: nothing tells the two apart.
        assert response.status_code == 404 and response.json() == {
            "error": {"code": "not_found", "message": f"job {theirs!r} not found"}
        }
    assert api.call("GET", f"/jobs/{theirs}", B).json()["status"] == "queued"
    assert api.call("GET", f"/jobs/{theirs}", R).status_code == 200
    assert api.call("DELETE", f"/jobs/{theirs}", R).json()["status"] == "canceled"
    listed = {job["id"] for job in api.call("GET", "/jobs", A).json()["jobs"]}
    assert listed == {mine}
    assert {job["id"] for job in api.call("GET", "/jobs", R).json()["jobs"]} == {mine, theirs}
    only_bob = api.call("GET", "/jobs", R, params={"owner": TestKeys.id_of(B)}).json()["jobs"]
    assert [job["id"] for job in only_bob] == [theirs]
    refused = api.call("GET", "/jobs", A, params={"owner": TestKeys.id_of(B)})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"


def test_references_resolve_only_to_the_callers_jobs(api: Api) -> None:
    theirs = api.submit(B).json()["id"]
    before = api.store.job_count()
    image_ref = {
        "mode": "inpaint",
        "prompt": "x",
        "image_ref": {"job_id": theirs},
        "mask_ref": {"job_id": theirs},
    }
    synthetic = {"mode": "synthetic", "source_job_id": theirs, "edits": [{"prompt": "a dog"}]}
    for body, field in ((image_ref, "image_ref.job_id"), (synthetic, "source_job_id")):
        response = api.call("POST", "/edit", A, json=body)
        assert response.status_code == 422, response.text
        assert (
            response.json()["error"]["field"] == field and "not found" in response.json()["error"]["message"]
        )
    assert api.store.job_count() == before


def test_idempotency_keys_are_per_api_key(api: Api) -> None:
    headers = {"Idempotency-Key": "same"}
    first = api.call("POST", "/generate", A, json={"prompt": "a cat"}, headers=headers)
    other = api.call("POST", "/generate", B, json={"prompt": "a cat"}, headers=headers)
    replay = api.call("POST", "/generate", A, json={"prompt": "a cat"}, headers=headers)
    assert (first.status_code, other.status_code, replay.status_code) == (202, 202, 200)
    assert first.json()["id"] == replay.json()["id"] != other.json()["id"]
    # A replay is not a new submission: it takes nothing from the quota.
    assert replay.headers.get("ratelimit-remaining") is None


def test_list_pages_newest_first_with_a_status_filter(api: Api) -> None:
    ids = [api.submit(A).json()["id"] for _ in range(5)]
    api.call("DELETE", f"/jobs/{ids[1]}")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.call("GET", "/jobs", params=params).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    canceled = api.call("GET", "/jobs", params={"status": "canceled"}).json()
    assert [job["id"] for job in canceled["jobs"]] == [ids[1]] and canceled["next_cursor"] is None
    bad = api.call("GET", "/jobs", params={"status": "done"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    bad = api.call("GET", "/jobs", params={"cursor": "abc"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
    # Records that expired leave the list (and its index) without a gap.
    api.store.r.delete(api.store.job_key(ids[2]))
    assert [job["id"] for job in api.call("GET", "/jobs").json()["jobs"]] == [ids[4], ids[3], ids[1], ids[0]]
    assert api.store.r.zscore(api.store.k("owned", TestKeys.id_of(A)), ids[2]) is None


def test_the_submit_rate_is_a_token_bucket(store_settings: Settings) -> None:
    api = Api(limited(store_settings, burst=3, rate_per_minute=6))
    accepted = [api.submit(A) for _ in range(3)]
    assert [r.status_code for r in accepted] == [202, 202, 202]
    assert [r.headers["ratelimit-remaining"] for r in accepted] == ["2", "1", "0"]
    assert (
        accepted[0].headers["ratelimit-limit"] == "3" and accepted[0].headers["ratelimit-policy"] == "3;w=30"
    )
    refused = api.submit(A)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    # 6 per minute: the next token is at most 10 s away; the bucket is full again within 30 s.
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert refused.headers["ratelimit-remaining"] == "0" and int(refused.headers["ratelimit-reset"]) <= 30
    assert "6 jobs per minute" in refused.json()["error"]["message"]
    assert api.store.job_count() == 3 and len(api.queue.sent) == 3
    # Another key has its own bucket.
    assert api.submit(B).status_code == 202


def test_active_jobs_and_images_per_day_caps(store_settings: Settings) -> None:
    api = Api(limited(store_settings, max_active_jobs=2, max_images_per_day=5))
    first, second = api.submit(A).json()["id"], api.submit(A, num_images=2).json()["id"]
    refused = api.submit(A)
    assert refused.status_code == 429 and "active jobs" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) == store_settings.retry_after_seconds
    api.call("DELETE", f"/jobs/{first}")  # a finished job frees its slot
    assert api.submit(A, num_images=2).status_code == 202  # 1 + 2 + 2 images today
    api.call("DELETE", f"/jobs/{second}")
    refused = api.submit(A)
    assert refused.status_code == 429 and "images per day" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 24 * 3600 + 1
    assert api.store.job_count() == 3


def test_a_refused_submission_takes_nothing(store_settings: Settings) -> None:
    api = Api(limited(store_settings, burst=2, rate_per_minute=0.001, max_active_jobs=5))
    api.queue.fail = True
    for _ in range(3):  # the broker is down: 503, and the token, images and slot come back each time
        response = api.submit(A)
        assert response.status_code == 503
    assert api.store.job_count() == 0 and api.store.active_jobs(TestKeys.id_of(A)) == 0
    api.queue.fail = False
    assert api.submit(A).headers["ratelimit-remaining"] == "1"
    # A request refused by validation never reaches the quota.
    assert api.call("POST", "/generate", A, json={"prompt": ""}).status_code == 422
    assert api.submit(A).headers["ratelimit-remaining"] == "0"


def test_keys_are_made_listed_and_revoked_by_admins(api: Api) -> None:
    assert api.call("POST", "/keys", A, json={"name": "x"}).status_code == 403
    assert api.call("GET", "/keys", A).status_code == 403
    made = api.call("POST", "/keys", R, json={"name": "carol", "limits": {"burst": 2}})
    assert made.status_code == 201
    carol = made.json()
    assert carol["key"].startswith("ebca_") and carol["source"] == "api" and carol["limits"]["burst"] == 2
    assert carol["limits"]["rate_per_minute"] == api.settings.key_rate_per_minute  # the default
    # Only the digest is stored.
    assert carol["key"] not in json.dumps(api.store.r.hgetall(api.store.k("keys")))
    me = api.call("GET", "/keys/me", carol["key"]).json()
    assert (me["id"], me["name"], me["role"], me["auth"]) == (carol["id"], "carol", "user", "required")
    listed = {k["name"]: k for k in api.call("GET", "/keys", R).json()}
    assert set(listed) == {"alice", "bob", "root", "carol"} and listed["alice"]["source"] == "env"
    assert all("key" not in k and "hash" not in k for k in listed.values())
    assert api.call("DELETE", f"/keys/{carol['id']}", R).json()["revoked"] is True
    assert_401(api.call("GET", "/keys/me", carol["key"]))
    # A configured key is revoked the same way.
    assert api.call("DELETE", f"/keys/{TestKeys.id_of(B)}", R).status_code == 200
    assert_401(api.submit(B))
    assert api.call("DELETE", "/keys/key_nope", R).status_code == 404
    bad = api.call("POST", "/keys", R, json={"name": "x", "role": "owner"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "role"


def test_the_keys_file_is_read_again_when_it_changes(store_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    carol = "ebca_test-carol-" + "c" * 32
    path.write_text(json.dumps([{"name": "carol", "hash": hash_key(carol)}]))
    api = Api(store_settings.model_copy(update={"api_keys": "", "api_keys_file": str(path)}))
    assert api.call("GET", "/keys/me", carol).json()["name"] == "carol"
    assert_401(api.call("GET", "/keys/me", A))
    path.write_text("[]")
    api.app.state.services.keyring._checked = 0.0  # as if a second had passed
    assert_401(api.call("GET", "/keys/me", carol))
    path.write_text("not json")  # a broken edit keeps the keys last read
    api.app.state.services.keyring._checked = 0.0
    assert_401(api.call("GET", "/keys/me", carol))


def test_metrics_need_an_admin_key(api: Api) -> None:
    assert api.call("GET", "/metrics", A).status_code == 403
    assert "ebca_queue_depth" in api.call("GET", "/metrics", R).text


def test_auth_off_trusts_one_user_and_says_so(
    store_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ebca.api")
    api = Api(store_settings.model_copy(update={"auth": "off"}))
    with api.http:  # runs the start-up
        job = api.submit(None).json()
        assert job["owner"] == "anonymous"
        assert api.call("GET", f"/jobs/{job['id']}", None).status_code == 200
        assert api.call("GET", "/keys/me", None).json()["auth"] == "off"
    assert any("EBCA_AUTH=off" in record.message for record in caplog.records)


def test_no_key_configured_says_how_to_make_one(
    store_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ebca.api")
    api = Api(store_settings.model_copy(update={"api_keys": ""}))
    with api.http:
        assert_401(api.submit(A))
    assert any("python -m api.keys create" in record.message for record in caplog.records)


def test_cors_is_off_unless_origins_are_set(store_settings: Settings) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    closed = Api(store_settings).http.options("/generate", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = Api(store_settings.model_copy(update={"cors_origins": ["https://app.example"]}))
    allowed = opened.http.options("/generate", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()


def test_result_images_are_served_immutable_and_unsniffable(api: Api) -> None:
    job_id = api.submit(A).json()["id"]
    api.app.state.services.storage.put(f"jobs/{job_id}/0.png", b"\x89PNG-bytes", "image/png")
    api.store.begin(job_id, "w")
    image = {"index": 0, "key": f"jobs/{job_id}/0.png", "content_type": "image/png", "url": "",
             "seed": 1, "width": 1, "height": 1, "sha256": "", "settings_endpoint": "/generate",
             "settings": {}}  # fmt: skip
    api.store.finish(
        job_id, JobStatus.SUCCEEDED, lease="w", result=JobResult.model_validate({"images": [image]})
    )
    response = api.call("GET", f"/jobs/{job_id}/images/0")
    assert response.status_code == 200 and response.content == b"\x89PNG-bytes"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "private, max-age=31536000, immutable"


def test_the_keys_command_makes_a_key_the_api_accepts(store_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    made = subprocess.run(
        [sys.executable, "-m", "api.keys", "create", "ci", "--admin", "--file", str(path), "--rate", "10"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    key = made.stdout.split("shown only now:\n  ", 1)[1].split()[0]
    assert path.stat().st_mode & 0o077 == 0 and key not in path.read_text()
    again = subprocess.run(
        [sys.executable, "-m", "api.keys", "create", "bot", "--file", str(path), "--quiet"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    api = Api(store_settings.model_copy(update={"api_keys": "", "api_keys_file": str(path)}))
    me = api.call("GET", "/keys/me", key).json()
    assert (me["name"], me["role"], me["limits"]["rate_per_minute"]) == ("ci", "admin", 10.0)
    assert api.call("GET", "/keys/me", again.stdout.strip()).json()["name"] == "bot"
    printed = subprocess.run(
        [sys.executable, "-m", "api.keys", "create", "env-key"], capture_output=True, text=True, timeout=60
    )
    line = next(x for x in printed.stdout.splitlines() if "EBCA_API_KEYS=" in x)
    entries = json.loads(line.split("EBCA_API_KEYS=", 1)[1].strip("'"))
    assert entries[0]["name"] == "env-key" and entries[0]["hash"].startswith("sha256:")
