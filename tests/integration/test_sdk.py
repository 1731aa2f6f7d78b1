"""The ebca_client SDK against the real service: the two sides agree on the contract of docs/API.md."""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from ebca_client import Client, EditSpec, EnergySpec

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_sdk_round_trip(stack: Stack) -> None:
    with Client(stack.api_url, api_key=stack.key) as client:
        assert client.ready()
        assert {m.id for m in client.models()} == {"model", "tiny-inpaint", "broken", "shapes"}
        energy = EnergySpec(gamma_attn=0.01, token_weights={"circle": 2.0})
        job = client.generate("a red circle", steps=3, seed=2, num_images=2, energy=energy)
        info = job.wait(timeout=120).info
        assert info.status == "succeeded" and [i.seed for i in info.result.images] == [2, 3]
        data = job.image_bytes(1)
        assert hashlib.sha256(data).hexdigest() == info.result.images[1].sha256
        assert Image.open(io.BytesIO(data)).size == (32, 32)

        synthetic = client.edit_synthetic(job.id, edits=[EditSpec(prompt="blue")]).wait(timeout=120).info
        assert synthetic.status == "succeeded" and synthetic.mode == "synthetic"

        picture = png(Image.new("RGB", (32, 32), (90, 20, 20)))
        mask = Image.new("L", (32, 32))
        mask.paste(255, (0, 0, 16, 16))
        real = client.edit_real(picture, source_prompt="a cat", edits=[EditSpec(prompt="dog")], steps=2)
        assert real.wait(timeout=120).status == "succeeded"
        inpaint = client.edit_inpaint(picture, png(mask), prompt="a bear", model="tiny-inpaint", steps=2)
        assert inpaint.wait(timeout=120).status == "succeeded"
        assert Image.open(io.BytesIO(inpaint.image_bytes(0))).size == (32, 32)
