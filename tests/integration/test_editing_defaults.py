"""Editing the built-in model through the service with no edit settings at all: the model's own edit
defaults (the ``edit`` block of models/shapes/ebca_defaults.json, chosen by benchmarks/bench_editing.py)
make a colour swap succeed, as the detector reads it, in real-image and in synthetic editing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from ebca_shapes.detector import detect

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SOURCE = "a red circle"
# A colour swap as a user writes it: no alpha, alpha_tau or gamma_attn anywhere.
EDITS = [{"prompt": "a blue circle"}, {"prompt": "a red circle", "direction": "not"}]
#: Seeds whose source image the detector reads as one red circle (checked below, not assumed).
SEED = 3000
IMAGES = 2


def labels(stack: Stack, image: dict) -> list[tuple[str, str]]:
    blob = stack.get(image["url"], timeout=10).content
    return [d.label for d in detect(Image.open(io.BytesIO(blob)).convert("RGB"))]


def swapped(found: list[tuple[str, str]]) -> bool:
    return ("blue", "circle") in found and ("red", "circle") not in found


def submit(stack: Stack, path: str, body: dict) -> dict:
    response = stack.post(path, json=body, timeout=10)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def test_real_and_synthetic_colour_swaps_use_the_models_edit_defaults(stack: Stack) -> None:
    defaults = json.loads((REPO / "models" / "shapes" / "ebca_defaults.json").read_text())["edit"]
    source = submit(
        stack, "/generate", {"prompt": SOURCE, "model": "shapes", "seed": SEED, "num_images": IMAGES}
    )
    for image in source["result"]["images"]:
        assert labels(stack, image) == [("red", "circle")], "the source must show one red circle"

    synthetic = submit(stack, "/edit", {"mode": "synthetic", "source_job_id": source["id"], "edits": EDITS})
    real = [
        submit(
            stack,
            "/edit",
            {
                "mode": "real",
                "model": "shapes",
                "source_prompt": SOURCE,
                "edits": EDITS,
                "image_ref": {"job_id": source["id"], "index": index},
                "seed": 0,
            },
        )
        for index in range(IMAGES)
    ]
    for mode, jobs in (("synthetic", [synthetic]), ("real", real)):
        for job in jobs:
            for image in job["result"]["images"]:
                assert swapped(labels(stack, image)), (mode, image["seed"], labels(stack, image))
                # The values used are on record: the model's defaults for the mode and direction.
                for edit in image["settings"]["edits"]:
                    want = defaults[mode][edit["direction"]]
                    got = {k: edit[k] for k in ("alpha", "alpha_tau", "gamma_attn")}
                    assert got == want, (mode, edit)
