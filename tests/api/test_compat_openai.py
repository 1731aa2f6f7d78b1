"""The OpenAI Images API adapter in process (api/compat/openai.py): request mapping onto our job,
responses, the error shape, the mask convention and the signed image URLs."""

from __future__ import annotations

import base64
import io
import json
from urllib.parse import urlsplit

from conftest import CompatApp
from PIL import Image
from testkeys import TestKeys

from ebca_common.jobs import JobError


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generation_maps_onto_our_request_and_answers_b64(compat_app: CompatApp) -> None:
    body = {
        "prompt": "a red circle",
        "n": 2,
        "size": "48x40",
        "model": "other",
        "user": "u1",
        "seed": 7,
        "steps": 4,
        "guidance_scale": 3.0,
        "negative_prompt": "blue",
        "energy": {"gamma_attn": 0.01, "gamma_norm": 0.02},
        "edits": [{"prompt": "green", "alpha": 0.5}],
    }
    response = compat_app.client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"created", "data"} and len(answer["data"]) == 2
    assert [decoded(d["b64_json"]).size for d in answer["data"]] == [(48, 40), (48, 40)]
    record = compat_app.store.record(compat_app.worker.jobs[0])
    assert record is not None and record.kind == "generate" and record.owner == TestKeys.id_of(TestKeys.alice)
    request = record.request
    assert (request["num_images"], request["width"], request["height"], request["model"]) == (
        2,
        48,
        40,
        "other",
    )
    assert (request["seed"], request["negative_prompt"], request["output_format"]) == (7, "blue", "png")
    assert request["energy"]["gamma_norm"] == 0.02 and request["edits"][0]["prompt"] == "green"


def test_defaults_leave_the_model_defaults(compat_app: CompatApp) -> None:
    response = compat_app.client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status_code == 200, response.text
    record = compat_app.store.record(compat_app.worker.jobs[0])
    assert record is not None and record.request["model"] == "shapes" and record.request["num_images"] == 1
    assert decoded(response.json()["data"][0]["b64_json"]).size == (32, 32)


def test_url_format_is_a_signed_url_that_needs_no_key(compat_app: CompatApp) -> None:
    response = compat_app.client.post(
        "/v1/images/generations", json={"prompt": "a cat", "response_format": "url"}
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("http://testserver/v1/images/files/")
    path = urlsplit(url)
    image = compat_app.client.get(f"{path.path}?{path.query}", headers={"Authorization": ""})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)
    forged = path.query.replace("sig=", "sig=0")
    refused = compat_app.client.get(f"{path.path}?{forged}", headers={"Authorization": ""})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    other = path.path.rsplit("/", 1)[0] + "/1"  # the signature names one image
    assert compat_app.client.get(f"{other}?{path.query}").status_code == 403


def test_invalid_fields_are_400_in_openai_shape_naming_their_param(compat_app: CompatApp) -> None:
    cases = {
        "n": ({"prompt": "a cat", "n": 0}, "n"),
        "size": ({"prompt": "a cat", "size": "big"}, "size"),
        "size bound": ({"prompt": "a cat", "size": "1000x1001"}, "size"),
        "model": ({"prompt": "a cat", "model": "dall-e-3"}, "model"),
        "energy": ({"prompt": "a cat", "energy": {"gamma_attn": -1}}, "energy.gamma_attn"),
        "unknown": ({"prompt": "a cat", "colour": "red"}, "colour"),
        "format": ({"prompt": "a cat", "response_format": "gif"}, "response_format"),
        "prompt": ({"prompt": "  "}, "prompt"),
    }
    for name, (body, param) in cases.items():
        response = compat_app.client.post("/v1/images/generations", json=body)
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
        assert error["message"].startswith(param), (name, error)
        assert response.headers["x-should-retry"] == "false"
    assert compat_app.worker.jobs == []  # nothing was queued


def test_bad_key_is_401_invalid_api_key(compat_app: CompatApp) -> None:
    response = compat_app.client.post(
        "/v1/images/generations", json={"prompt": "a cat"}, headers={"Authorization": "Bearer nope"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert compat_app.client.get("/v1/nothing-here").json()["error"]["type"] == "invalid_request_error"


def test_worker_invalid_input_is_400_and_failure_500(compat_app: CompatApp) -> None:
    compat_app.worker.outcome = lambda record: JobError(
        code="invalid_input", message="energy.token_weights: 'dog' is not a word of the prompt",
        field="energy.token_weights")  # fmt: skip
    response = compat_app.client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "energy.token_weights"
    compat_app.worker.outcome = lambda record: JobError(code="out_of_memory", message="CUDA out of memory")
    response = compat_app.client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "out of memory" in response.json()["error"]["message"]


def test_models_lists_our_model_ids(compat_app: CompatApp) -> None:
    answer = compat_app.client.get("/v1/models").json()
    assert answer["object"] == "list"
    assert sorted(m["id"] for m in answer["data"]) == ["other", "shapes"]


def _edit_files(mask: Image.Image | None, size: tuple[int, int] = (32, 32)) -> dict:
    files = {"image": ("image.png", png(Image.new("RGB", size, (10, 20, 30))), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", png(mask), "image/png")
    return files


def test_edit_converts_the_transparent_area_to_our_white_mask(compat_app: CompatApp) -> None:
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent: the area to edit
    data = {
        "prompt": "a blue square",
        "n": "2",
        "energy[gamma_attn]": "0.01",
        "energy[schedule][kind]": "constant",
    }
    response = compat_app.client.post("/v1/images/edits", data=data, files=_edit_files(mask))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    job_id = compat_app.worker.jobs[0]
    record = compat_app.store.record(job_id)
    assert record is not None and record.mode == "inpaint" and record.request["num_images"] == 2
    assert record.request["energy"]["gamma_attn"] == 0.01
    assert record.request["energy"]["schedule"]["kind"] == "constant"
    ours = compat_app.worker.input(job_id, "mask").convert("L")
    assert ours.getpixel((3, 5)) == 255 and ours.getpixel((28, 5)) == 0


def test_edit_refusals_name_the_field(compat_app: CompatApp) -> None:
    opaque = Image.new("RGB", (32, 32), (255, 255, 255))
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    half.paste((0, 0, 0, 0), (0, 0, 16, 32))
    cases = {
        "mask": (_edit_files(opaque), {"prompt": "x"}),
        "image": ({"mask": ("m.png", png(half), "image/png")}, {"prompt": "x"}),
        "size": (_edit_files(half), {"prompt": "x", "size": "64x64"}),
        "n": (_edit_files(half), {"prompt": "x", "n": "many"}),
    }
    for param, (files, data) in cases.items():
        response = compat_app.client.post("/v1/images/edits", data=data, files=files)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
    json_body = compat_app.client.post("/v1/images/edits", content=json.dumps({"prompt": "x"}))
    assert json_body.status_code == 400 and json_body.json()["error"]["param"] == "content-type"


def test_every_route_needs_a_key(compat_app: CompatApp) -> None:
    for method, path in (
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/edits"),
        ("GET", "/v1/models"),
    ):
        response = compat_app.client.request(method, path, headers={"Authorization": ""})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_missing_prompt_and_transparent_background_are_named(compat_app: CompatApp) -> None:
    missing = compat_app.client.post("/v1/images/generations", json={"n": 1}).json()["error"]
    assert missing["param"] == "prompt" and "required" in missing["message"]
    transparent = {"prompt": "a cat", "background": "transparent"}
    error = compat_app.client.post("/v1/images/generations", json=transparent).json()["error"]
    assert error["param"] == "background"
