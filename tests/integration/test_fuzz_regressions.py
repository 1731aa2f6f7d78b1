"""Hostile requests found by fuzzing the real api (QA of issue 4), replayed against uvicorn on loopback:
each is a 4xx naming its field, creates no job, leaves the keep-alive connection usable (a 500 made
uvicorn drop it) and logs no unhandled error."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _image(mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def _mask() -> bytes:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


INPAINT = {"mode": "inpaint", "prompt": "a bear", "model": "tiny-inpaint", "steps": 1}
JSON = {"content-type": "application/json"}


def _cases() -> list[tuple[str, str, dict[str, Any], int, str | None]]:
    """(name, path, httpx request kwargs, status, field)."""
    dup = (
        b"--b0\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n" + json.dumps(INPAINT).encode()
        + b"\r\n--b0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + _image()
        + b"\r\n--b0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.png\"\r\n\r\n" + _image()
        + b"\r\n--b0\r\nContent-Disposition: form-data; name=\"mask\"; filename=\"m.png\"\r\n\r\n" + _mask()
        + b"\r\n--b0--\r\n"
    )  # fmt: skip
    lab_mask = {
        "image": ("i.png", _image(), "image/png"),
        "mask": ("m.tiff", _image("LAB", "TIFF"), "image/tiff"),
    }
    image = {"image": ("i.png", _image(), "image/png")}
    big_int = b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}"
    surrogate = b'{"prompt": "a cat", "energy": {"token_weights": {"\\ud800": 2}}}'
    superscript = {"prompt": "a cat", "energy": {"token_weights": {"\u00b2": 2}}}
    weights = "energy.token_weights"
    multipart = {"content-type": "multipart/form-data; boundary=b0"}
    text = {"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}}
    huge = {"prompt": "a", "width": 512, "height": 512}
    return [
        ("deep nesting", "/generate", {"content": b"[" * 15_000, "headers": JSON}, 422, None),
        ("5000-digit integer", "/generate", {"content": big_int, "headers": JSON}, 422, None),
        ("deep request part", "/edit", {"data": {"request": "[" * 15_000}, "files": image}, 422, "request"),
        ("surrogate word", "/generate", {"content": surrogate, "headers": JSON}, 422, weights),
        ("superscript index", "/generate", {"json": superscript}, 422, weights),
        ("LAB mask", "/edit", {"data": {"request": json.dumps(INPAINT)}, "files": lab_mask}, 422, "mask"),
        ("image twice", "/edit", {"content": dup, "headers": multipart}, 422, "image"),
        ("generate as text", "/generate", text, 422, "content-type"),
        ("too many pixels", "/generate", {"json": huge}, 422, "width"),
    ]  # fmt: skip


def test_hostile_requests_are_refused_cleanly(stack: Stack) -> None:
    assert stack.api is not None
    log_size = stack.api.log.stat().st_size
    before = stack.job_keys()
    with stack.client() as client:
        for name, path, kwargs, status, field in _cases():
            response = client.post(path, **kwargs)
            assert response.status_code == status, f"{name}: {response.text}"
            error = response.json()["error"]
            assert error["code"] == "validation_error" and error["message"], f"{name}: {error}"
            assert error.get("field") == field, f"{name}: {error}"
            # The same connection serves the next request (uvicorn closes it after an unhandled error).
            assert client.get("/healthz").status_code == 200, name
    assert stack.job_keys() == before
    with stack.api.log.open("rb") as fh:
        fh.seek(log_size)
        new_log = fh.read().decode(errors="replace")
    assert "unhandled error" not in new_log and "Traceback" not in new_log, new_log[-2000:]
