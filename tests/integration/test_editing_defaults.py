"""Editing the built-in model through the service with no edit settings at all: the model's own edit
defaults (the ``edit`` block of models/shapes/ebca_defaults.json, chosen by benchmarks/bench_editing.py)
make the edits succeed, as the detector reads them: a colour swap by real-image editing and a shape
swap by synthetic editing. The benchmark's report set puts their rates at 36% and 92% (docs/SHAPES.md,
"Editing benchmark"): the seeds here are ones where they succeed, checked as sources below, so this
test guards the service path (defaults filled per mode and direction, recorded, used), not the rates."""

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
# Edits as a user writes them: no alpha, alpha_tau or gamma_attn anywhere.
EDITS = {
    "real": [{"prompt": "a blue circle"}, {"prompt": "a red circle", "direction": "not"}],
    "synthetic": [{"prompt": "a red square"}, {"prompt": "a red circle", "direction": "not"}],
}
WANTED = {"real": ("blue", "circle"), "synthetic": ("red", "square")}
#: Image i of the source job has seed SEED + i; each source must read as one red circle (checked below).
SEED = 3001
IMAGES = 2


def labels(stack: Stack, image: dict) -> list[tuple[str, str]]:
    blob = stack.get(image["url"], timeout=10).content
    return [d.label for d in detect(Image.open(io.BytesIO(blob)).convert("RGB"))]


def swapped(found: list[tuple[str, str]], mode: str) -> bool:
    return WANTED[mode] in found and ("red", "circle") not in found


def submit(stack: Stack, path: str, body: dict) -> dict:
    response = stack.post(path, json=body, timeout=10)
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def test_real_and_synthetic_edits_succeed_with_the_models_edit_defaults(stack: Stack) -> None:
    defaults = json.loads((REPO / "models" / "shapes" / "ebca_defaults.json").read_text())["edit"]
    source = submit(
        stack, "/generate", {"prompt": SOURCE, "model": "shapes", "seed": SEED, "num_images": IMAGES}
    )
    for image in source["result"]["images"]:
        assert labels(stack, image) == [("red", "circle")], "the source must show one red circle"

    synthetic = submit(
        stack, "/edit", {"mode": "synthetic", "source_job_id": source["id"], "edits": EDITS["synthetic"]}
    )
    real = [
        submit(
            stack,
            "/edit",
            {
                "mode": "real",
                "model": "shapes",
                "source_prompt": SOURCE,
                "edits": EDITS["real"],
                "image_ref": {"job_id": source["id"], "index": index},
                "seed": 0,
            },
        )
        for index in range(IMAGES)
    ]
    for mode, jobs in (("synthetic", [synthetic]), ("real", real)):
        for job in jobs:
            for image in job["result"]["images"]:
                assert swapped(labels(stack, image), mode), (mode, image["seed"], labels(stack, image))
                # The values used are on record: the model's defaults for the mode and direction.
                for edit in image["settings"]["edits"]:
                    want = defaults[mode][edit["direction"]]
                    got = {k: edit[k] for k in ("alpha", "alpha_tau", "gamma_attn")}
                    assert got == want, (mode, edit)
