"""Regressions found by fuzzing the api (QA of issue 4): each hostile request gets a 4xx with the one
error body, names the field at fault, and creates no job (nothing queued, nothing stored).

The api runs in process (TestClient) on the real Redis under a private key prefix, with a fake queue.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from testkeys import TestKeys

from api.main import create_app
from ebca_common.jobs import JobStatus
from ebca_common.settings import Settings
from ebca_common.store import JobStore

AUTH = TestKeys.header(TestKeys.alice)


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish(self, job_id: str) -> None:
        self.sent.append(job_id)


class Api:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore.from_settings(settings)
        self.queue = RecordingQueue()
        self.client = TestClient(create_app(settings, store=self.store, publisher=self.queue), headers=AUTH)

    def assert_refused(
        self, response: httpx.Response, status: int, code: str, field: str | None | type[Any] = Any
    ) -> dict[str, Any]:
        """The documented error body, the status, the field (None: no field key), and no job."""
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) <= {"code", "message", "field"}, body
        error = body["error"]
        assert error["code"] == code, body
        assert isinstance(error["message"], str) and error["message"], body
        if field is not Any:
            assert error.get("field") == field, body
        assert self.store.job_count() == 0 and self.queue.sent == []
        storage = Path(self.settings.storage_root)
        assert not storage.exists() or not any(p.is_file() for p in storage.rglob("*"))
        return error


@pytest.fixture
def api(store_settings: Settings) -> Iterator[Api]:
    settings = store_settings.model_copy(update={"max_json_bytes": 20_000, "max_upload_bytes": 50_000})
    yield Api(settings)


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def mask_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


REAL = {"mode": "real", "source_prompt": "a cat", "edits": [{"prompt": "a dog"}], "steps": 2}
INPAINT = {"mode": "inpaint", "prompt": "a bear", "steps": 2}
JSON = {"content-type": "application/json"}

# -- JSON that json.loads fails on with something other than JSONDecodeError ----------------------------
UNDECODABLE = [
    pytest.param(b"[" * 15_000, id="nesting past the recursion limit"),
    pytest.param(b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", id="int of 5000 digits"),
    pytest.param(b'{"prompt": "x", "energy": ' * 40 + b"1" + b"}" * 40, id="nesting 40 deep"),
]


@pytest.mark.parametrize("path", ["/generate", "/edit"])
@pytest.mark.parametrize("raw", UNDECODABLE)
def test_json_python_cannot_decode_is_422(api: Api, path: str, raw: bytes) -> None:
    api.assert_refused(api.client.post(path, content=raw, headers=JSON), 422, "validation_error", None)


@pytest.mark.parametrize("raw", UNDECODABLE)
def test_multipart_request_part_python_cannot_decode_is_422(api: Api, raw: bytes) -> None:
    files = {"request": ("r.json", raw, "application/json"), "image": ("i.png", image_bytes(), "image/png")}
    api.assert_refused(api.client.post("/edit", files=files), 422, "validation_error", "request")


# -- lone surrogates: pydantic accepts them in dict keys; they cannot be echoed back as UTF-8 -----------
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"prompt": "x", "energy": {"token_weights": {"\\ud800": 2}}}', "energy.token_weights"),
        (b'{"prompt": "x", "edits": [{"prompt": "\\udfff"}]}', "edits[0].prompt"),
        (b'{"prompt": "a \\ud83d cat"}', "prompt"),
        (b'{"\\ud800": 1, "prompt": "x"}', None),
    ],
)
def test_lone_surrogates_are_422_naming_the_field(api: Api, raw: bytes, field: str | None) -> None:
    error = api.assert_refused(
        api.client.post("/generate", content=raw, headers=JSON), 422, "validation_error", field
    )
    assert "Unicode" in error["message"]


def test_lone_surrogate_in_the_multipart_request_part(api: Api) -> None:
    request = '{"mode": "real", "source_prompt": "\\ud800", "edits": [{"prompt": "d"}]}'
    files = {"image": ("i.png", image_bytes(), "image/png")}
    response = api.client.post("/edit", data={"request": request}, files=files)
    api.assert_refused(response, 422, "validation_error", "source_prompt")


# -- token weights the worker (or ebca_core) would crash on --------------------------------------------
@pytest.mark.parametrize("key", ["9" * 7, "9" * 5000, "\u00b2", "\u0663"])
def test_token_weight_keys_that_are_not_plain_indices_are_422(api: Api, key: str) -> None:
    body = {"prompt": "a cat", "energy": {"gamma_attn": 0.01, "token_weights": {key: 2.0}}}
    api.assert_refused(
        api.client.post("/generate", json=body), 422, "validation_error", "energy.token_weights"
    )


def test_token_weight_index_and_word_keys_are_accepted(api: Api) -> None:
    body = {"prompt": "a cat", "energy": {"gamma_attn": 0.01, "token_weights": {"123456": 2.0, "cat²": 1.5}}}
    response = api.client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["request"]["energy"]["token_weights"] == {"123456": 2.0, "cat²": 1.5}


# -- images PIL decodes but the worker cannot convert ------------------------------------------------------
@pytest.mark.parametrize("part", ["image", "mask"])
def test_pixel_mode_that_cannot_become_rgb_and_l_is_422(api: Api, part: str) -> None:
    lab = image_bytes("LAB", fmt="TIFF")  # LAB -> L raises ValueError in PIL
    files = {"image": ("i.png", image_bytes(), "image/png"), "mask": ("m.png", mask_bytes(), "image/png")}
    files[part] = ("x.tiff", lab, "image/tiff")
    response = api.client.post("/edit", data={"request": json.dumps(INPAINT)}, files=files)
    error = api.assert_refused(response, 422, "validation_error", part)
    assert "LAB" in error["message"]


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("CMYK", "JPEG"), ("P", "GIF"), ("LA", "PNG")])
def test_other_pixel_modes_are_accepted(api: Api, mode: str, fmt: str) -> None:
    files = {"image": ("i", image_bytes(mode, fmt=fmt), "application/octet-stream")}
    response = api.client.post("/edit", data={"request": json.dumps(REAL)}, files=files)
    assert response.status_code == 202, response.text


# -- multipart parts: duplicated, unexpected, wrong kind, too big --------------------------------------
def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A multipart body built by hand (repeated names, text fields named like files)."""
    out = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ([("image", b"", "a.png"), ("image", b"", "b.png")], "image"),
        ([("image", b"", "a.png"), ("mask", b"", "m.png"), ("mask", b"", "m.png")], "mask"),
        ([("request", b"{}", None), ("image", b"", "a.png")], "request"),  # a second request part
        ([("seed", b"3", None), ("image", b"", "a.png")], "seed"),
        ([("image", b"not a file", None)], "image"),
        ([("thumbnail", b"", "t.png"), ("image", b"", "a.png")], "thumbnail"),
    ],
    ids=[
        "duplicate image",
        "duplicate mask",
        "duplicate request",
        "extra field",
        "image as text",
        "extra file",
    ],
)
def test_multipart_part_problems_name_the_part(api: Api, parts: list, field: str) -> None:
    png = image_bytes()
    parts = [("request", json.dumps(INPAINT).encode(), None)] + [
        (
            name,
            png if name in ("image", "thumbnail") and filename else mask_bytes() if filename else data,
            filename,
        )
        for name, data, filename in parts
    ]
    raw, headers = _multipart(parts)
    api.assert_refused(api.client.post("/edit", content=raw, headers=headers), 422, "validation_error", field)


def test_multipart_request_part_over_the_json_limit_is_413(api: Api) -> None:
    big = json.dumps({**REAL, "source_prompt": "x" * 30_000})  # max_json_bytes is 20000 here
    files = {"image": ("i.png", image_bytes(), "image/png")}
    api.assert_refused(
        api.client.post("/edit", data={"request": big}, files=files), 413, "payload_too_large", "request"
    )


# -- content types ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/generate", "/edit"])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonp"]
)
def test_non_json_content_types_are_422(api: Api, path: str, content_type: str) -> None:
    body = json.dumps({"prompt": "a cat"} if path == "/generate" else REAL)
    response = api.client.post(path, content=body, headers={"content-type": content_type})
    api.assert_refused(response, 422, "validation_error", "content-type")


def test_generate_refuses_multipart(api: Api) -> None:
    response = api.client.post(
        "/generate", data={"request": "{}"}, files={"image": ("i.png", b"x", "image/png")}
    )
    api.assert_refused(response, 422, "validation_error", "content-type")


def test_media_types_are_case_insensitive(api: Api) -> None:
    body = json.dumps({**REAL, "image_ref": {"job_id": "nope"}})
    response = api.client.post(
        "/edit", content=body, headers={"content-type": "Application/JSON; charset=UTF-8"}
    )
    # Parsed as JSON: the refusal is about the reference, not the content type.
    api.assert_refused(response, 422, "validation_error", "image_ref.job_id")
    response = api.client.post(
        "/generate", content=b'{"prompt": "a cat"}', headers={"content-type": "APPLICATION/JSON"}
    )
    assert response.status_code == 202, response.text


# -- routes ---------------------------------------------------------------------------------------------
def test_405_lists_every_method_of_the_path(api: Api) -> None:
    response = api.client.put("/jobs/abc")
    api.assert_refused(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "DELETE"}
    response = api.client.delete("/generate")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_reference_to_an_image_no_longer_stored_is_422(api: Api) -> None:
    job_id = api.client.post("/generate", json={"prompt": "a cat"}).json()["id"]
    api.store.begin(job_id, "w")
    image = {"index": 0, "key": f"jobs/{job_id}/0.png", "content_type": "image/png", "url": "", "seed": 1}
    image |= {"width": 16, "height": 16, "sha256": "", "settings_endpoint": "/generate", "settings": {}}
    api.store.finish(
        job_id, JobStatus.SUCCEEDED, lease="w", result={"images": [image]}
    )  # the file was never written
    api.queue.sent.clear()
    before = api.store.job_count()
    response = api.client.post("/edit", json={**REAL, "image_ref": {"job_id": job_id, "index": 0}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "image_ref.job_id"
    assert api.store.job_count() == before and api.queue.sent == []


def test_generate_size_over_the_pixel_limit_is_422(api: Api) -> None:
    limit = api.settings.max_image_pixels
    small = api.settings.model_copy(update={"max_image_pixels": 256 * 256})
    api.client = TestClient(create_app(small, store=api.store, publisher=api.queue), headers=AUTH)
    body = {"prompt": "a cat", "width": 264, "height": 256}
    error = api.assert_refused(api.client.post("/generate", json=body), 422, "validation_error", "width")
    assert "264x256" in error["message"] and limit > 256 * 256
    response = api.client.post("/generate", json={**body, "width": 256})
    assert response.status_code == 202, response.text


def test_idempotency_key_whose_job_expired_is_free_again(api: Api) -> None:
    first = api.client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202
    api.store.r.delete(api.store.job_key(first.json()["id"]))  # the record expired before the key
    api.store.r.zrem(api.store.k("queue"), first.json()["id"])
    retry = api.client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 202, retry.text  # a new job, not a 404 for the vanished one
    assert retry.json()["id"] != first.json()["id"]
    assert api.store.job_count() == 1
    # The key now belongs to the new job: replays and conflicts work as before.
    replay = api.client.post("/generate", json={"prompt": "a cat"}, headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == retry.json()["id"]
    other = api.client.post("/generate", json={"prompt": "a dog"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"


# -- blank prompts (issue 12: inpaint prompt and source_prompt passed the api, then failed the job) -------
@pytest.mark.parametrize(
    ("body", "field"),
    [({**INPAINT, "prompt": "  "}, "prompt"), ({**REAL, "source_prompt": " \n\t"}, "source_prompt")],
)
def test_blank_inpaint_prompt_and_source_prompt_are_422(api: Api, body: dict, field: str) -> None:
    files = {"image": ("i.png", image_bytes(), "image/png"), "mask": ("m.png", mask_bytes(), "image/png")}
    if body["mode"] == "real":
        del files["mask"]
    response = api.client.post("/edit", data={"request": json.dumps(body)}, files=files)
    api.assert_refused(response, 422, "validation_error", field)


@pytest.mark.parametrize("value", [0, -5, 3601, 10**9, 1.5, "60", True])
@pytest.mark.parametrize("path", ["/generate", "/edit"])
def test_timeout_seconds_out_of_range_is_422_naming_it(api: Api, path: str, value: Any) -> None:
    body = {"prompt": "x"} if path == "/generate" else {"mode": "synthetic", "source_job_id": "j",
                                                        "edits": [{"prompt": "d"}]}  # fmt: skip
    api.assert_refused(
        api.client.post(path, json={**body, "timeout_seconds": value}),
        422,
        "validation_error",
        "timeout_seconds",
    )
