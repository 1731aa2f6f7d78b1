"""The api in process (TestClient) on the real Redis under a private key prefix, with a fake queue."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from testkeys import TestKeys

from api.main import create_app
from ebca_common.errors import Unavailable
from ebca_common.jobs import JobStatus, unix_time
from ebca_common.model_defaults import ModelDefaults
from ebca_common.settings import Settings
from ebca_common.store import JobStore

AUTH = TestKeys.header(TestKeys.alice)
REPO = Path(__file__).resolve().parents[2]


class FakeQueue:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[str] = []
        self.fail = fail

    def publish(self, job_id: str) -> None:
        if self.fail:
            raise Unavailable("broker down")
        self.sent.append(job_id)


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def app_parts(store_settings: Settings, queue: FakeQueue):
    settings = store_settings.model_copy(update={"max_queue": 3, "max_upload_bytes": 5000})
    store = JobStore.from_settings(settings)
    return TestClient(create_app(settings, store=store, publisher=queue), headers=AUTH), store


def test_submit_publishes_exactly_once(app_parts, queue: FakeQueue) -> None:
    client, store = app_parts
    response = client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "a"})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert queue.sent == [job_id]
    assert (
        client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "a"}).status_code
        == 200
    )
    assert queue.sent == [job_id]  # a replay is not queued again
    assert response.json()["request"]["model"] == "shapes"


def test_queue_full_is_429_and_creates_nothing(app_parts) -> None:
    client, store = app_parts
    for _ in range(3):
        assert client.post("/generate", json={"prompt": "a cat"}).status_code == 202
    response = client.post("/generate", json={"prompt": "a cat"})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert int(response.headers["retry-after"]) >= 1
    assert store.job_count() == 3


def test_broker_down_is_503_and_the_job_is_removed(store_settings: Settings) -> None:
    store = JobStore.from_settings(store_settings)
    client = TestClient(create_app(store_settings, store=store, publisher=FakeQueue(fail=True)), headers=AUTH)
    response = client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "k"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == str(store_settings.retry_after_seconds)
    assert store.job_count() == 0 and store.queue_depth() == 0
    assert store.lookup_idempotent("k", "anything") is None  # the key is free for the retry


def test_upload_limit_per_file(app_parts) -> None:
    client, store = app_parts
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buf, format="PNG")  # noise: > 5000 bytes
    assert len(buf.getvalue()) > 5000
    request = {"mode": "real", "source_prompt": "x", "edits": [{"prompt": "y"}]}
    response = client.post(
        "/edit",
        data={"request": json.dumps(request)},
        files={"image": ("a.png", buf.getvalue(), "image/png")},
    )
    assert response.status_code == 413
    assert response.json()["error"] == {
        "code": "payload_too_large",
        "message": response.json()["error"]["message"],
        "field": "image",
    }
    assert store.job_count() == 0


def test_wrong_content_type_and_unknown_routes(app_parts) -> None:
    client, _ = app_parts
    response = client.post("/edit", content=b"x", headers={"content-type": "text/plain"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "content-type"
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = client.put("/generate")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    job_id = client.post("/generate", json={"prompt": "a cat"}).json()["id"]
    response = client.get(f"/jobs/{job_id}/images/not-a-number")
    assert response.status_code == 422 and response.json()["error"]["field"] == "index"
    # Whose the job is comes first: for a job the caller cannot see, nothing else is said.
    assert client.get("/jobs/x/images/not-a-number").status_code == 404


def test_image_download_from_local_store(app_parts) -> None:
    client, store = app_parts
    job_id = client.post("/generate", json={"prompt": "a cat"}).json()["id"]
    assert client.get(f"/jobs/{job_id}/images/0").status_code == 404  # not finished
    app_storage = client.app.state.services.storage
    app_storage.put(f"jobs/{job_id}/0.png", b"\x89PNG-bytes", "image/png")
    store.begin(job_id, "w")
    image = {"index": 0, "key": f"jobs/{job_id}/0.png", "content_type": "image/png", "url": "", "seed": 1}
    image |= {"width": 8, "height": 8, "sha256": "", "settings_endpoint": "/generate", "settings": {}}
    store.finish(job_id, JobStatus.SUCCEEDED, lease="w", result={"images": [image]})
    response = client.get(f"/jobs/{job_id}/images/0")
    assert response.status_code == 200 and response.content == b"\x89PNG-bytes"
    assert response.headers["content-type"] == "image/png"


def test_readyz_follows_worker_heartbeats(app_parts) -> None:
    client, store = app_parts
    assert client.get("/readyz").status_code == 503
    store.heartbeat("host:123")
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready", "workers": 1}


def test_openapi_documents_every_request_field(app_parts) -> None:
    client, _ = app_parts
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    names = ["GenerateRequest", "InpaintRequest", "RealEditRequest", "SyntheticEditRequest", "EnergySpec"]
    names += ["EditSpec", "ScheduleSpec", "ImageRef", "InversionSpec", "Job", "Progress", "ImageResult"]
    names += ["JobResult", "JobError"]
    for name in names:
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} is undocumented"
    edit_body = spec["paths"]["/edit"]["post"]["requestBody"]["content"]
    assert set(edit_body) == {"application/json", "multipart/form-data"}
    params = [p["name"] for p in spec["paths"]["/generate"]["post"]["parameters"]]
    assert "Idempotency-Key" in params


def test_refused_edit_writes_no_upload(store_settings: Settings) -> None:
    store = JobStore.from_settings(store_settings)
    client = TestClient(create_app(store_settings, store=store, publisher=FakeQueue(fail=True)), headers=AUTH)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, format="PNG")
    request = {"mode": "real", "source_prompt": "x", "edits": [{"prompt": "y"}]}
    response = client.post(
        "/edit",
        data={"request": json.dumps(request)},
        files={"image": ("a.png", buf.getvalue(), "image/png")},
    )
    assert response.status_code == 503
    assert store.job_count() == 0
    storage_root = Path(store_settings.storage_root)
    assert not storage_root.exists() or not any(p.is_file() for p in storage_root.rglob("*"))


def test_request_part_may_be_sent_as_a_file(app_parts, queue: FakeQueue) -> None:
    client, _ = app_parts
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, format="PNG")
    request = json.dumps({"mode": "real", "source_prompt": "x", "edits": [{"prompt": "y"}]}).encode()
    files = {
        "request": ("request.json", request, "application/json"),
        "image": ("a.png", buf.getvalue(), "image/png"),
    }
    response = client.post("/edit", files=files)
    assert response.status_code == 202, response.text
    assert response.json()["mode"] == "real" and queue.sent == [response.json()["id"]]


def test_timeout_seconds_default_and_deadline(app_parts) -> None:
    client, store = app_parts
    default = client.post("/generate", json={"prompt": "a cat"}).json()
    assert default["request"]["timeout_seconds"] == 900  # EBCA_JOB_TIMEOUT_SECONDS, filled in
    given = client.post("/generate", json={"prompt": "a cat", "timeout_seconds": 3600}).json()
    for job, seconds in ((default, 900), (given, 3600)):
        shown = client.get(f"/jobs/{job['id']}").json()
        assert shown["deadline_at"] == job["deadline_at"]
        created, deadline = unix_time(shown["created_at"]), unix_time(shown["deadline_at"])
        assert deadline - created == pytest.approx(seconds, abs=0.002)  # both are millisecond stamps
    edit = {"mode": "inpaint", "prompt": "a bear", "image_ref": {"job_id": "x", "index": 0}}
    too_long = client.post("/edit", json={**edit, "timeout_seconds": 3601})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "timeout_seconds"


def test_models_lists_each_models_edit_defaults(app_parts) -> None:
    client, store = app_parts
    # No worker has published yet: the api reads the model's own file (the built-in model's edit block).
    shapes = {m["id"]: m for m in client.get("/models").json()["models"]}["shapes"]
    written = json.loads((REPO / "models" / "shapes" / "ebca_defaults.json").read_text())["edit"]
    assert shapes["defaults"]["edit"] == written
    assert set(written["real"]) == set(written["synthetic"]) == {"and", "not"}
    # What a worker publishes wins; a model without an edit block lists the paper's SD values.
    store.publish_model_defaults({"shapes": ModelDefaults().model_dump(mode="json")})
    listed = client.get("/models").json()["models"][0]["defaults"]["edit"]
    assert listed["real"]["and"] == {"alpha": 0.75, "alpha_tau": 0.3, "gamma_attn": 5e-4}
    assert listed["synthetic"]["and"] == {"alpha": 1.3, "alpha_tau": 0.2, "gamma_attn": 0.0}
