"""The drop-in adapters with the real client packages (``openai``, ``webuiapi``) against uvicorn and
Celery workers on the built-in model (docs/COMPAT.md)."""

from __future__ import annotations

import base64
import io
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import webuiapi
from PIL import Image
from testkeys import TestKeys

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "shapes"  # the built-in model: 32x32, trained on CPU
FAST = {"steps": 4, "seed": 5}


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=TestKeys.alice, max_retries=0, timeout=120)


@pytest.fixture
def a1111(stack: Stack) -> webuiapi.WebUIApi:
    port = urlsplit(stack.api_url).port
    # A1111's --api-auth is HTTP Basic: the API key is the password (the user name is not used).
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, username="alice", password=TestKeys.alice)


def latest_job(stack: Stack) -> dict:
    jobs = stack.get("/jobs?limit=1").json()["jobs"]
    assert jobs, "no job"
    return jobs[0]


def test_openai_generate_b64_json_with_energy(stack: Stack, oai: openai.OpenAI) -> None:
    energy = {"gamma_attn": 0.01, "gamma_norm": 0.02, "token_weights": {"circle": 2.0}}
    result = oai.images.generate(
        prompt="a red circle and a blue square", model=MODEL, n=2, size="32x32", response_format="b64_json",
        extra_body={"energy": energy, **FAST},
    )  # fmt: skip
    assert len(result.data) == 2 and result.created > 0
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in result.data]
    assert [(i.format, i.size) for i in images] == [("PNG", (32, 32))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 5 and 6
    job = latest_job(stack)
    assert job["status"] == "succeeded" and job["request"]["energy"]["token_weights"] == {"circle": 2.0}
    assert [i["seed"] for i in job["result"]["images"]] == [5, 6]


def test_openai_generate_url(stack: Stack, oai: openai.OpenAI) -> None:
    result = oai.images.generate(
        prompt="a green triangle", model=MODEL, response_format="url", extra_body=FAST
    )
    url = result.data[0].url or ""
    assert url.startswith(f"{stack.api_url}/v1/images/files/")
    fetched = httpx.get(url, timeout=10)  # no API key: the URL is signed
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (32, 32)


def test_openai_edit_with_mask(stack: Stack, oai: openai.OpenAI) -> None:
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))  # transparent square: the area to edit
    result = oai.images.edit(
        image=("image.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
        prompt="a red circle", model=MODEL, n=1, extra_body=FAST,
    )  # fmt: skip
    edited = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert edited.size == (32, 32)
    job = latest_job(stack)
    assert (job["kind"], job["mode"], job["status"]) == ("edit", "inpaint", "succeeded")
    stored = stack.get(f"/jobs/{job['id']}").json()["request"]["mask_ref"]
    assert stored == {"job_id": job["id"], "index": 0, "input": "mask"}


def test_openai_invalid_field_is_bad_request_naming_it(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(prompt="a cat", model=MODEL, n=99, extra_body=FAST)
    assert caught.value.param == "n" and "n:" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(prompt="a cat", model=MODEL, extra_body={"energy": {"gamma_attn": -1}})
    assert caught.value.param == "energy.gamma_attn"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(prompt="a cat", model="dall-e-3")
    assert caught.value.param == "model"
    bad_key = openai.OpenAI(base_url=oai.base_url, api_key="ebca_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.images.generate(prompt="a cat")


def test_a1111_txt2img(stack: Stack, a1111: webuiapi.WebUIApi) -> None:
    result = a1111.txt2img(
        prompt="a red circle", negative_prompt="blue", width=32, height=32, steps=4, cfg_scale=5, seed=3,
        batch_size=2, sampler_name="DDIM", override_settings={"sd_model_checkpoint": MODEL},
    )  # fmt: skip
    assert [image.size for image in result.images] == [(32, 32)] * 2
    assert result.info["all_seeds"] == [3, 4] and result.info["sampler_name"] == "DDIM"
    assert result.info["sd_model_name"] == MODEL
    job = latest_job(stack)
    assert job["request"]["scheduler"] == "ddim" and job["request"]["guidance_scale"] == 5


def test_a1111_energy_through_the_ebca_object(stack: Stack, a1111: webuiapi.WebUIApi) -> None:
    payload = {"prompt": "a red circle and a blue square", "width": 32, "height": 32, "steps": 4,
               "override_settings": {"sd_model_checkpoint": MODEL},
               "ebca": {"energy": {"gamma_attn": 0.01, "gamma_norm": 0.01}}}  # fmt: skip
    result = a1111.custom_post("txt2img", payload, baseurl=True)  # under /sdapi/v1
    assert len(result.images) == 1 and result.info["ebca"]["energy"]["gamma_attn"] == 0.01


def test_a1111_inpainting_img2img(stack: Stack, a1111: webuiapi.WebUIApi) -> None:
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # white: repaint
    result = a1111.img2img(
        images=[image], mask_image=mask, prompt="a blue square", steps=4, seed=9, sampler_name="Euler a",
        override_settings={"sd_model_checkpoint": MODEL},
    )  # fmt: skip
    assert result.image.size == (32, 32) and result.info["all_seeds"] == [9]
    job = latest_job(stack)
    assert (job["mode"], job["request"]["scheduler"]) == ("inpaint", "euler_ancestral")


def test_a1111_invalid_field_is_its_runtime_error_naming_it(a1111: webuiapi.WebUIApi) -> None:
    with pytest.raises(RuntimeError) as caught:
        a1111.txt2img(prompt="a cat", width=32, height=32, steps=4, sampler_name="Heun")
    status, text = caught.value.args
    assert status == 422 and "sampler_name" in text


def test_a_client_that_goes_away_cancels_its_job(stack: Stack) -> None:
    body = {"prompt": "a red circle", "model": MODEL, "steps": 200, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.api_url}/v1/images/generations", json=body, headers=stack.auth(), timeout=2)
    job = latest_job(stack)
    assert job["request"]["steps"] == 200
    deadline = time.monotonic() + 60
    while job["status"] != "canceled":
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)
        job = stack.job(job["id"])
