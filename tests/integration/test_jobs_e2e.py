"""Generate and every edit mode end to end: submit, poll, download, check format and size, and
replay each image's reproduction settings to get the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from testkeys import TestKeys

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
#: models/shapes/ebca_defaults.json as GET /models lists it.
SHAPES_DEFAULTS = {"steps": 20, "guidance_scale": 5.0, "scheduler": "ddim", "width": None, "height": None}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def download_and_check(stack: Stack, job: dict, width: int, height: int) -> list[bytes]:
    """Every image of a succeeded job: HTTP 200, declared type = actual format, size, sha256."""
    assert job["status"] == "succeeded", job
    blobs = []
    for image in job["result"]["images"]:
        response = stack.get(image["url"], timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == image["content_type"]
        decoded = Image.open(io.BytesIO(response.content))
        assert decoded.format == PIL_FORMATS[image["content_type"]]
        assert decoded.size == (width, height) == (image["width"], image["height"])
        assert hashlib.sha256(response.content).hexdigest() == image["sha256"]
        blobs.append(response.content)
    return blobs


def reproduce(stack: Stack, image: dict) -> bytes:
    """Submit an image's settings to its endpoint and return the new image's bytes."""
    assert image["settings"]["num_images"] == 1 and image["settings"]["seed"] == image["seed"]
    response = stack.post(image["settings_endpoint"], json=image["settings"], timeout=10)
    assert response.status_code == 202, response.text
    again = stack.wait_job(response.json()["id"])
    assert again["status"] == "succeeded", again
    new = again["result"]["images"][0]
    assert new["seed"] == image["seed"]
    return stack.get(new["url"], timeout=10).content


@pytest.fixture(scope="module")
def generated(stack: Stack) -> dict:
    """A two-image generate job with BCU and a composition edit (no seed: the worker draws one)."""
    body = {
        "prompt": "a red circle and a blue square",
        "width": 48,
        "height": 40,
        "steps": 4,
        "num_images": 2,
        "scheduler": "euler",
        "energy": {"gamma_attn": 0.01, "gamma_norm": 0.01, "token_weights": {"circle": 2.0, "5": 1.5}},
        "edits": [{"prompt": "green", "alpha": 0.5}],
    }
    response = stack.post("/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["kind"] == "generate" and job["attempts"] == 0
    assert job["request"]["model"] == "model" and job["request"]["seed"] is None
    assert response.headers["location"] == f"/jobs/{job['id']}"
    return stack.wait_job(job["id"])


def test_generate_end_to_end(stack: Stack, generated: dict) -> None:
    job = generated
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    assert job["progress"] == {"stage": "done", "step": 4, "total": 4}  # 2 images denoised together
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    blobs = download_and_check(stack, job, 48, 40)
    seeds = [image["seed"] for image in job["result"]["images"]]
    assert seeds[1] == seeds[0] + 1  # image i uses seed + i
    assert blobs[0] != blobs[1]
    # Deterministic storage keys per job id.
    assert [i["key"] for i in job["result"]["images"]] == [
        f"jobs/{job['id']}/0.png",
        f"jobs/{job['id']}/1.png",
    ]


def test_generate_reproduces_each_image_alone(stack: Stack, generated: dict) -> None:
    for image in generated["result"]["images"]:
        assert image["settings_endpoint"] == "/generate"
        assert_reproduced(stack.get(image["url"], timeout=10).content, reproduce(stack, image))


def assert_reproduced(original: bytes, again: bytes) -> None:
    """An image of a batch, made again alone from its settings: float32 sums blocked differently (~1e-6
    relative) may move a saved 8-bit channel by one level, never more (docs/API.md, "Reproducibility");
    another seed or a leaked setting changes pixels by far more. (A one-image job reproduces byte for
    byte: the same batch composition on the same machine; those tests compare bytes.)"""
    a, b = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), dtype=np.int16) for d in (original, again))
    assert a.shape == b.shape and int(abs(a - b).max()) <= 1


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_formats(stack: Stack, fmt: str) -> None:
    body = {"prompt": "a cat", "steps": 2, "seed": 7, "output_format": fmt}
    job = stack.wait_job(stack.post("/generate", json=body, timeout=10).json()["id"])
    download_and_check(stack, job, 32, 32)  # the tiny model's native size
    assert job["result"]["images"][0]["content_type"] == f"image/{fmt}"
    assert job["result"]["images"][0]["key"].endswith(f"/0.{fmt}")


def test_synthetic_edit(stack: Stack, generated: dict) -> None:
    body = {
        "mode": "synthetic",
        "source_job_id": generated["id"],
        "edits": [{"prompt": "monet painting", "alpha": 1.3, "alpha_tau": 0.25}],
        "output_format": "webp",
    }
    response = stack.post("/edit", json=body, timeout=10)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    assert job["kind"] == "edit" and job["mode"] == "synthetic"
    download_and_check(stack, job, 48, 40)
    source_seeds = [i["seed"] for i in generated["result"]["images"]]
    assert [i["seed"] for i in job["result"]["images"]] == source_seeds  # same seeds as the source
    image = job["result"]["images"][0]
    # The settings are the source's generate request with the editorial prompts.
    assert image["settings_endpoint"] == "/generate"
    assert image["settings"]["prompt"] == generated["request"]["prompt"]
    assert image["settings"]["edits"][0]["prompt"] == "monet painting"
    assert_reproduced(stack.get(image["url"], timeout=10).content, reproduce(stack, image))


def test_inpaint_with_uploads(stack: Stack) -> None:
    picture = Image.new("RGB", (32, 32), (30, 90, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = {"mode": "inpaint", "prompt": "a teddy bear", "model": "tiny-inpaint", "steps": 3, "seed": 11}
    files = {
        "image": ("in.png", png_bytes(picture), "image/png"),
        "mask": ("m.png", png_bytes(mask), "image/png"),
    }
    response = stack.post("/edit", data={"request": json.dumps(request)}, files=files)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    assert job["mode"] == "inpaint"
    (blob,) = download_and_check(stack, job, 32, 32)
    # The stored request points at the stored uploads, so settings replay without the files.
    assert job["request"]["image_ref"] == {"job_id": job["id"], "index": 0, "input": "image"}
    assert job["request"]["mask_ref"] == {"job_id": job["id"], "index": 0, "input": "mask"}
    image = job["result"]["images"][0]
    assert image["settings_endpoint"] == "/edit"
    assert reproduce(stack, image) == blob


def test_real_edit_from_an_earlier_output(stack: Stack, generated: dict) -> None:
    body = {
        "mode": "real",
        "source_prompt": "a red circle",
        "edits": [{"prompt": "blue", "alpha": 1.0}],
        "image_ref": {"job_id": generated["id"], "index": 1},
        "steps": 3,
        "seed": 5,
        "output_format": "png",
    }
    response = stack.post("/edit", json=body, timeout=10)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    (blob,) = download_and_check(stack, job, 48, 40)
    assert reproduce(stack, job["result"]["images"][0]) == blob


def test_real_edit_with_upload(stack: Stack) -> None:
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    request = {"mode": "real", "source_prompt": "a photo of a cat", "edits": [{"prompt": "dog"}], "steps": 3}
    files = {"image": ("cat.png", png_bytes(picture), "image/png")}
    response = stack.post("/edit", data={"request": json.dumps(request)}, files=files)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    (blob,) = download_and_check(stack, job, 32, 32)
    image = job["result"]["images"][0]
    assert image["settings"]["seed"] == image["seed"]  # the drawn seed is reported for replay
    assert reproduce(stack, image) == blob


def test_models_health_ready_metrics_openapi(stack: Stack, generated: dict) -> None:
    with stack.client() as client:
        models = {m["id"]: m for m in client.get("/models").json()["models"]}
        assert set(models) == {"model", "tiny-inpaint", "broken", "shapes"}
        assert [mid for mid, m in models.items() if m["default"]] == ["model"]
        # The workers announce each model's defaults: the shipped file, else the built-in ones.
        shapes = dict(models["shapes"]["defaults"])
        written = json.loads((REPO / "models" / "shapes" / "ebca_defaults.json").read_text())
        assert shapes.pop("edit") == written["edit"]
        assert shapes == SHAPES_DEFAULTS
        builtin = models["model"]["defaults"]
        assert (builtin["steps"], builtin["guidance_scale"], builtin["scheduler"]) == (30, 7.5, "ddim")
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] >= 1
        assert client.get("/metrics").status_code == 403  # a user key; metrics need an admin key
        metrics = stack.get("/metrics", TestKeys.root).text
        succeeded = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith('ebca_jobs_total{status="succeeded"}')
        )
        assert succeeded >= 1
        assert "ebca_queue_depth" in metrics
        count = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("ebca_step_duration_seconds_count")
        )
        assert count >= 4  # the generate job alone made 4 denoising steps
        spec = client.get("/openapi.json").json()
        for path in ("/generate", "/edit", "/jobs/{job_id}", "/jobs/{job_id}/images/{index}", "/models"):
            assert path in spec["paths"]
        generate = spec["components"]["schemas"]["GenerateRequest"]["properties"]
        assert all(prop.get("description") for prop in generate.values()), generate


def test_null_sampler_fields_take_the_models_defaults(stack: Stack) -> None:
    """The shipped model's ebca_defaults.json (20 DDIM steps, guidance 5) fills what the request
    leaves out; the record, the progress total and the image's settings show the values used."""
    body = {"prompt": "a red circle", "model": "shapes", "seed": 3, "num_images": 2}
    response = stack.post("/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["request"]["steps"] is None and queued["request"]["guidance_scale"] is None
    job = stack.wait_job(queued["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"stage": "done", "step": 20, "total": 20}  # the model's 20, images together
    used = {"steps": 20, "guidance_scale": 5.0, "scheduler": "ddim", "width": 32, "height": 32}
    assert {k: job["request"][k] for k in used} == used
    for image in job["result"]["images"]:
        assert {k: image["settings"][k] for k in used} == used
    download_and_check(stack, job, 32, 32)


def test_worker_logs_carry_no_third_party_warnings(stack: Stack, generated: dict) -> None:
    """After the jobs above (models loaded, images made), a worker's log holds no library warning:
    no Python warning (``SomeWarning: ...``), no advice to install packages, no progress bars."""
    noise = re.compile(r"\w+Warning: |pip install|torchvision|accelerate|it/s\]")
    for worker in stack.workers:
        text = worker.log.read_text(errors="replace")
        assert "loaded model" in text or "ready." in text, text[-2000:]
        offending = [line for line in text.splitlines() if noise.search(line)]
        assert not offending, f"{worker.name}: {offending[:5]}"
