"""Every kind of bad request gets its status and the one error body, and creates no job; the
Idempotency-Key replays and conflicts; with Redis down the api answers 503 + Retry-After."""

from __future__ import annotations

import io
import json
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from PIL import Image
from testkeys import TestKeys

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def png(size: tuple[int, int], color: int | tuple[int, ...] = (10, 20, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(size: tuple[int, int] = (32, 32)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (4, 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not None:
        assert body["error"].get("field") == field, body
        assert field.split(".")[0].split("[")[0] in body["error"]["message"]


GEN = {"prompt": "a cat", "steps": 2}

# (name, body, field) for POST /generate -> 422
GENERATE_422: list[tuple[str, Any, str | None]] = [
    ("missing prompt", {"steps": 2}, "prompt"),
    ("blank prompt", {"prompt": "   "}, "prompt"),
    ("prompt too long", {"prompt": "a" * 1001}, "prompt"),
    ("width not multiple of 8", {**GEN, "width": 30}, "width"),
    ("height too large", {**GEN, "height": 4096}, "height"),
    ("steps zero", {**GEN, "steps": 0}, "steps"),
    ("steps as a boolean", {**GEN, "steps": True}, "steps"),
    ("height as a float", {**GEN, "height": 16.0}, "height"),
    ("guidance as a string", {**GEN, "guidance_scale": "7.5"}, "guidance_scale"),
    ("steps too many", {**GEN, "steps": 201}, "steps"),
    ("guidance too high", {**GEN, "guidance_scale": 51}, "guidance_scale"),
    ("unknown scheduler", {**GEN, "scheduler": "heun"}, "scheduler"),
    ("too many images", {**GEN, "num_images": 5}, "num_images"),
    ("negative seed", {**GEN, "seed": -1}, "seed"),
    ("seed too large", {**GEN, "seed": 2**32}, "seed"),
    ("output format", {**GEN, "output_format": "gif"}, "output_format"),
    ("negative gamma", {**GEN, "energy": {"gamma_attn": -0.1}}, "energy.gamma_attn"),
    ("schedule kind", {**GEN, "energy": {"schedule": {"kind": "cosine"}}}, "energy.schedule.kind"),
    ("schedule tau", {**GEN, "energy": {"schedule": {"kind": "step", "tau": 1.5}}}, "energy.schedule.tau"),
    ("token weight <= 0", {**GEN, "energy": {"token_weights": {"cat": 0}}}, "energy.token_weights"),
    ("edit alpha negative", {**GEN, "edits": [{"prompt": "dog", "alpha": -1}]}, "edits[0].alpha"),
    ("edit direction", {**GEN, "edits": [{"prompt": "dog", "direction": "or"}]}, "edits[0].direction"),
    ("normaliser <= 0", {**GEN, "edits": [{"prompt": "dog", "alpha": 1.5, "direction": "not"}]}, "edits"),
    ("too many edits", {**GEN, "edits": [{"prompt": "dog"}] * 5}, "edits"),
    ("unknown field", {**GEN, "step": 3}, "step"),
    ("unknown model", {**GEN, "model": "sd-xxl"}, "model"),
    ("not an object", ["a cat"], None),
]


@pytest.mark.parametrize(("name", "body", "field"), GENERATE_422, ids=[c[0] for c in GENERATE_422])
def test_generate_422(stack: Stack, name: str, body: Any, field: str | None) -> None:
    before = stack.job_keys()
    assert_error(stack.post("/generate", json=body, timeout=10), 422, "validation_error", field)
    assert stack.job_keys() == before


def test_invalid_json_and_oversized_json(stack: Stack) -> None:
    before = stack.job_keys()
    headers = {"content-type": "application/json"}
    assert_error(
        stack.post("/generate", content=b'{"prompt": ', headers=headers, timeout=10),
        422,
        "validation_error",
    )
    big = json.dumps(
        {"prompt": "a cat", "negative_prompt": "x" * 30000}
    ).encode()  # EBCA_MAX_JSON_BYTES 20000
    assert_error(
        stack.post("/generate", content=big, headers=headers, timeout=10),
        413,
        "payload_too_large",
    )
    assert stack.job_keys() == before


def _edit(
    stack: Stack, request: Any, files: dict[str, tuple[str, bytes, str]] | None = None
) -> httpx.Response:
    if files is None:
        return stack.post("/edit", json=request, timeout=10)
    return stack.post("/edit", data={"request": json.dumps(request)}, files=files, timeout=10)


INPAINT = {"mode": "inpaint", "prompt": "a bear", "model": "tiny-inpaint", "steps": 2}
REAL = {"mode": "real", "source_prompt": "a cat", "edits": [{"prompt": "dog"}], "steps": 2}


def test_edit_422_cases(stack: Stack) -> None:
    image = ("i.png", png((32, 32)), "image/png")
    mask = ("m.png", mask_png(), "image/png")
    unknown = uuid.uuid4().hex
    cases: list[tuple[Any, dict[str, Any] | None, str | None]] = [
        ({"prompt": "x"}, None, "mode"),
        ({"mode": "outpaint"}, None, "mode"),
        (INPAINT, None, "image"),  # no image at all
        (INPAINT, {"image": image}, "mask"),  # no mask
        (INPAINT, {"image": image, "mask": ("m.png", mask_png((16, 16)), "image/png")}, "mask"),  # size
        (INPAINT, {"image": image, "mask": ("m.png", png((32, 32), 0, "L"), "image/png")}, "mask"),  # empty
        (INPAINT, {"image": image, "mask": ("m.png", png((32, 32), 255, "L"), "image/png")}, "mask"),  # full
        (INPAINT, {"image": ("i.png", b"not an image at all", "image/png"), "mask": mask}, "image"),
        (INPAINT, {"image": ("i.png", png((300, 300)), "image/png"), "mask": mask}, "image"),  # > max pixels
        (REAL, {"image": ("i.png", png((30, 30)), "image/png")}, "image"),  # not a multiple of 8
        ({**INPAINT, "image_ref": {"job_id": unknown}}, {"image": image, "mask": mask}, "image"),  # both
        (
            {**INPAINT, "image_ref": {"job_id": unknown}, "mask_ref": {"job_id": unknown}},
            None,
            "image_ref.job_id",
        ),
        ({**REAL, "edits": []}, {"image": image}, "edits"),
        ({k: v for k, v in REAL.items() if k != "source_prompt"}, {"image": image}, "source_prompt"),
        (REAL, {"image": image, "mask": mask}, "mask"),
        (REAL, {"image": image, "extra": image}, "extra"),
        (
            {"mode": "synthetic", "source_job_id": unknown, "edits": [{"prompt": "dog"}]},
            None,
            "source_job_id",
        ),
        ({"mode": "synthetic", "source_job_id": unknown, "edits": []}, None, "edits"),
    ]
    before = stack.job_keys()
    for request, files, field in cases:
        response = _edit(stack, request, files)
        try:
            assert_error(response, 422, "validation_error", field)
        except AssertionError as exc:
            raise AssertionError(f"case {request} {list(files or {})}: {exc}") from None
    # Multipart without the request part, and a request part that is not JSON.
    response = stack.post("/edit", files={"image": image}, timeout=10)
    assert_error(response, 422, "validation_error", "request")
    response = stack.post("/edit", data={"request": "{nope"}, files={"image": image})
    assert_error(response, 422, "validation_error", "request")
    assert stack.job_keys() == before


def test_synthetic_source_must_be_a_succeeded_generate_job(stack: Stack) -> None:
    def synthetic(source: str) -> httpx.Response:
        body = {"mode": "synthetic", "source_job_id": source, "edits": [{"prompt": "dog"}]}
        return client.post("/edit", json=body)

    with stack.client() as client:
        failed = stack.wait_job(client.post("/generate", json={**GEN, "model": "broken"}).json()["id"])
        assert failed["status"] == "failed"
        files = {"image": ("i.png", png((32, 32)), "image/png")}
        edit = client.post("/edit", data={"request": json.dumps(REAL)}, files=files)
        edited = stack.wait_job(edit.json()["id"])
        assert edited["status"] == "succeeded"
        before = stack.job_keys()
        assert_error(synthetic(failed["id"]), 422, "validation_error", "source_job_id")  # not succeeded
        assert_error(synthetic(edited["id"]), 422, "validation_error", "source_job_id")  # not a generate job
        # An output reference to a job without images is refused the same way.
        response = client.post("/edit", json={**REAL, "image_ref": {"job_id": failed["id"], "index": 0}})
        assert_error(response, 422, "validation_error", "image_ref.job_id")
        response = client.post("/edit", json={**REAL, "image_ref": {"job_id": edited["id"], "index": 3}})
        assert_error(response, 422, "validation_error", "image_ref.index")
        assert stack.job_keys() == before


def test_upload_over_limit_is_413(stack: Stack) -> None:
    before = stack.job_keys()
    huge = ("big.png", b"\x89PNG" + bytes(400_000), "image/png")  # EBCA_MAX_UPLOAD_BYTES is 300000
    response = _edit(stack, INPAINT, {"image": huge, "mask": ("m.png", mask_png(), "image/png")})
    assert_error(response, 413, "payload_too_large")
    # Over the whole-body bound: refused while reading, from Content-Length alone.
    bigger = ("big.png", bytes(1_000_000), "image/png")
    response = _edit(stack, INPAINT, {"image": bigger, "mask": bigger})
    assert_error(response, 413, "payload_too_large")
    assert stack.job_keys() == before


def test_unknown_jobs_are_404(stack: Stack) -> None:
    with stack.client() as client:
        assert_error(client.get("/jobs/does-not-exist"), 404, "not_found")
        assert_error(client.delete("/jobs/does-not-exist"), 404, "not_found")
        assert_error(client.get("/jobs/does-not-exist/images/0"), 404, "not_found")
        done = stack.wait_job(client.post("/generate", json={"prompt": "a dog", "steps": 1}).json()["id"])
        assert_error(client.get(f"/jobs/{done['id']}/images/1"), 404, "not_found")
        # Cancel of a finished job is a conflict and changes nothing.
        assert_error(client.delete(f"/jobs/{done['id']}"), 409, "conflict")
        assert client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded"


def test_idempotency_key_replay_and_conflict(stack: Stack) -> None:
    key = f"test-{uuid.uuid4().hex}"
    body = {"prompt": "a blue square", "steps": 2, "seed": 3}
    with stack.client() as client:
        first = client.post("/generate", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 202
        before = stack.job_keys()
        # Same key, same body (other key order) -> the same job, nothing new.
        replay = client.post("/generate", json=dict(reversed(body.items())), headers={"Idempotency-Key": key})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
        # Same key, different body -> 409 and nothing new.
        conflict = client.post("/generate", json={**body, "seed": 4}, headers={"Idempotency-Key": key})
        assert_error(conflict, 409, "idempotency_conflict")
        other_endpoint = client.post(
            "/edit",
            json={"mode": "synthetic", "source_job_id": first.json()["id"], "edits": [{"prompt": "dog"}]},
            headers={"Idempotency-Key": key},
        )
        assert other_endpoint.status_code in (409, 422)
        assert stack.job_keys() == before
        assert_error(client.post("/generate", json=body, headers={"Idempotency-Key": "k" * 201}), 422,
                     "validation_error", "Idempotency-Key")  # fmt: skip
        # Multipart edits replay too (the file bytes are part of the fingerprint).
        files = {"image": ("i.png", png((32, 32)), "image/png")}
        edit_key = f"edit-{uuid.uuid4().hex}"
        request = {"request": json.dumps({**REAL, "seed": 1})}
        one = client.post("/edit", data=request, files=files, headers={"Idempotency-Key": edit_key})
        assert one.status_code == 202, one.text
        two = client.post("/edit", data=request, files=files, headers={"Idempotency-Key": edit_key})
        assert two.status_code == 200 and two.json()["id"] == one.json()["id"]
        other_file = {"image": ("i.png", png((32, 32), (1, 2, 3)), "image/png")}
        three = client.post("/edit", data=request, files=other_file, headers={"Idempotency-Key": edit_key})
        assert_error(three, 409, "idempotency_conflict")
        assert stack.wait_job(first.json()["id"])["status"] == "succeeded"
        assert stack.wait_job(one.json()["id"])["status"] == "succeeded"


def test_redis_down_is_503_and_creates_nothing(stack: Stack, dead_redis_api: str) -> None:
    before = stack.job_keys()
    # The admin key: /metrics needs one. A key configured in EBCA_API_KEYS still opens /metrics and
    # /healthz while Redis is away (its revocations cannot be read then; docs/DEPLOY.md, API keys).
    with httpx.Client(base_url=dead_redis_api, timeout=20, headers=stack.auth(TestKeys.root)) as client:
        for response in (
            client.post("/generate", json={"prompt": "a cat", "steps": 2}),
            client.post(
                "/edit", json={"mode": "synthetic", "source_job_id": "x", "edits": [{"prompt": "d"}]}
            ),
            client.get("/jobs/anything"),
            client.delete("/jobs/anything"),
            client.get("/readyz"),
        ):
            assert_error(response, 503, "unavailable")
            assert int(response.headers["retry-after"]) > 0
        # Validation still answers first, and the process itself is up.
        assert_error(client.post("/generate", json={"steps": 2}), 422, "validation_error", "prompt")
        assert client.get("/healthz").status_code == 200
        assert "ebca_store_up 0.0" in client.get("/metrics").text
    assert stack.job_keys() == before
