"""The AUTOMATIC1111 API adapter in process (api/compat/a1111.py): field and sampler mapping, the
``ebca`` extras, info/parameters, inpainting masks, progress, interrupt and HTTP Basic auth."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

from conftest import CompatApp
from PIL import Image
from testkeys import TestKeys

#: What webuiapi sends besides the fields a test sets (its defaults): all must be accepted.
WEBUIAPI_DEFAULTS = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2, "hr_upscaler": "Latent", "styles": [], "subseed": -1, "subseed_strength": 0.0,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "eta": 1.0, "s_churn": 0,
    "override_settings": {}, "override_settings_restore_afterwards": True, "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    "scheduler": "automatic", "sampler_index": "Euler a",
}  # fmt: skip


def b64png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_txt2img_maps_fields_and_answers_images_parameters_info(compat_app: CompatApp) -> None:
    body = {
        **WEBUIAPI_DEFAULTS,
        "prompt": "a red circle",
        "negative_prompt": "",
        "steps": 6,
        "cfg_scale": 4.5,
        "width": 48,
        "height": 40,
        "seed": 11,
        "batch_size": 2,
        "n_iter": 2,
        "sampler_name": "Euler a",
        "override_settings": {"sd_model_checkpoint": "other"},
        "ebca": {"energy": {"gamma_attn": 0.01}, "edits": [{"prompt": "green", "alpha": 0.5}]},
    }
    response = compat_app.client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["images"]) == 4
    sizes = {Image.open(io.BytesIO(base64.b64decode(i))).size for i in answer["images"]}
    assert sizes == {(48, 40)}
    assert answer["parameters"]["prompt"] == "a red circle"
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert (info["sampler_name"], info["cfg_scale"], info["steps"], info["sd_model_name"]) == (
        "Euler a",
        4.5,
        6,
        "other",
    )
    request = compat_app.store.record(compat_app.worker.jobs[0]).request  # type: ignore[union-attr]
    assert (request["num_images"], request["scheduler"], request["guidance_scale"]) == (
        4,
        "euler_ancestral",
        4.5,
    )
    assert request["negative_prompt"] is None and request["energy"]["gamma_attn"] == 0.01


def test_seed_minus_one_is_random_and_omitted_fields_take_model_defaults(compat_app: CompatApp) -> None:
    response = compat_app.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": -1})
    assert response.status_code == 200, response.text
    record = compat_app.store.record(compat_app.worker.jobs[0])
    assert record is not None and record.request["seed"] is None
    assert json.loads(response.json()["info"])["sampler_name"] == "DDIM"  # the model's default scheduler


def test_invalid_fields_are_422_naming_the_a1111_field(compat_app: CompatApp) -> None:
    cases = {
        "sampler_name": {"sampler_name": "Heun"},
        "scheduler": {"scheduler": "Karras"},
        "cfg_scale": {"cfg_scale": 99},
        "batch_size": {"batch_size": 5},
        "width": {"width": 30},
        "seed": {"seed": -5},
        "ebca.energy.gamma_norm": {"ebca": {"energy": {"gamma_norm": "x"}}},
        "ebca.colour": {"ebca": {"colour": 1}},
        "enable_hr": {"enable_hr": True},
        "override_settings.sd_model_checkpoint": {"override_settings": {"sd_model_checkpoint": "sdxl"}},
    }
    for field, extra in cases.items():
        response = compat_app.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **extra})
        assert response.status_code == 422, (field, response.text)
        error = response.json()
        assert error["field"] == field and error["detail"].startswith(field), (field, error)
    assert compat_app.worker.jobs == []


def test_img2img_inpaints_with_the_white_area(compat_app: CompatApp) -> None:
    image = Image.new("RGB", (32, 24), (10, 20, 30))
    mask = Image.new("L", (32, 24), 0)
    mask.paste(255, (0, 0, 8, 24))
    body = {
        **WEBUIAPI_DEFAULTS,
        "prompt": "a blue square",
        "init_images": ["data:image/png;base64," + b64png(image)],
        "mask": "data:image/png;base64," + b64png(mask),
        "mask_blur": 4,
        "inpainting_fill": 0,
        "denoising_strength": 0.75,
        "width": 512,
        "height": 512,
        "seed": 3,
    }
    response = compat_app.client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    out = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert out.size == (32, 24)  # the init image's size: width/height do not resize
    job_id = compat_app.worker.jobs[0]
    assert compat_app.store.record(job_id).mode == "inpaint"  # type: ignore[union-attr]
    assert compat_app.worker.input(job_id, "mask").convert("L").getpixel((2, 2)) == 255
    inverted = compat_app.client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1})
    assert inverted.status_code == 200, inverted.text
    assert compat_app.worker.input(compat_app.worker.jobs[1], "mask").convert("L").getpixel((2, 2)) == 0


def test_img2img_refusals(compat_app: CompatApp) -> None:
    image = b64png(Image.new("RGB", (32, 24)))
    full = b64png(Image.new("L", (32, 24), 255))
    cases = {
        "mask": {"init_images": [image]},
        "init_images": {"init_images": [], "mask": full},
        "init_images[0]": {"init_images": ["not base64!"], "mask": full},
    }
    for field, extra in cases.items():
        response = compat_app.client.post("/sdapi/v1/img2img", json={"prompt": "x", **extra})
        assert response.status_code == 422 and response.json()["field"] == field, (field, response.text)
    full_mask = compat_app.client.post(
        "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image], "mask": full}
    )
    assert full_mask.status_code == 422 and full_mask.json()["field"] == "mask"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_with_the_key_as_password(compat_app: CompatApp) -> None:
    response = compat_app.client.get("/sdapi/v1/sd-models", headers=basic("anyone", TestKeys.bob))
    assert response.status_code == 200 and {m["title"] for m in response.json()} == {"shapes", "other"}
    me = compat_app.client.get("/keys/me", headers=basic("", TestKeys.bob))
    assert me.json()["name"] == "bob"  # the one key reader serves every route
    for headers in (basic("bob", "wrong"), basic("bob", ""), {"Authorization": "Basic !!"}):
        wrong = compat_app.client.get("/sdapi/v1/sd-models", headers=headers)
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"


def test_samplers_and_options(compat_app: CompatApp) -> None:
    names = {s["name"] for s in compat_app.client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DDIM", "DPM++ 2M", "PLMS"} <= names
    assert compat_app.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"


def test_progress_and_interrupt_touch_only_the_callers_running_job(compat_app: CompatApp) -> None:
    compat_app.worker.hold = threading.Event()
    results: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: results.update(r=compat_app.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat"}))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while (
        not compat_app.worker.jobs or compat_app.store.record(compat_app.worker.jobs[0]).status != "running"
    ):  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job_id = compat_app.worker.jobs[0]
    progress = compat_app.client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job"] == job_id and progress["state"]["job_count"] == 1
    bob = TestKeys.header(TestKeys.bob)
    assert compat_app.client.get("/sdapi/v1/progress", headers=bob).json()["state"]["job"] == ""
    assert compat_app.client.post("/sdapi/v1/interrupt", headers=bob).json() == {}
    assert compat_app.store.record(job_id).cancel_requested is False  # type: ignore[union-attr]
    assert compat_app.client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(10)
    response = results["r"]
    assert response.status_code == 409 and response.json()["error"] == "canceled"  # type: ignore[attr-defined]
    assert compat_app.store.record(job_id).status == "canceled"  # type: ignore[union-attr]
    assert compat_app.client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_every_route_needs_a_key(compat_app: CompatApp) -> None:
    gets = ("sd-models", "samplers", "options", "scripts", "progress")
    for method, name in [
        *(("GET", g) for g in gets),
        *(("POST", p) for p in ("txt2img", "img2img", "interrupt")),
    ]:
        response = compat_app.client.request(method, f"/sdapi/v1/{name}", headers={"Authorization": ""})
        assert response.status_code == 401 and response.json()["error"] == "unauthorized", (
            name,
            response.text,
        )
    assert compat_app.worker.jobs == []
