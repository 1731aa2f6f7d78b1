"""Client models: they accept what the server stores, and the submit bodies are built from them."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from sdk_fakes import FakeAPI

from ebca_client import AsyncClient, AsyncJob, Client, EditSpec, InvalidArgumentError, InversionSpec, Job
from ebca_client.models import GenerateRequest, ImageRef, InpaintRequest, RealEditRequest


def test_image_ref_to_an_uploaded_input_round_trips() -> None:
    ref = ImageRef.model_validate({"job_id": "abc", "index": 0, "input": "mask"})
    assert ref.input == "mask"
    assert ref.to_json() == {"job_id": "abc", "index": 0, "input": "mask"}
    assert ImageRef(job_id="abc", index=2).to_json() == {"job_id": "abc", "index": 2}
    with pytest.raises(ValidationError):
        ImageRef.model_validate({"job_id": "abc", "input": "thumbnail"})


# ---------------------------------------------------------------------------------------------------
# Submit bodies are built from the typed request models


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def client(api: FakeAPI) -> Iterator[Client]:
    with Client("http://api.test", transport=api.transport()) as c:
        yield c


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"steps": "5"}, "steps", "Input should be a valid integer"),
        ({"seed": True}, "seed", "Input should be a valid integer"),
        ({"steps": 5.0}, "steps", "Input should be a valid integer"),
        ({"energy": 5}, "energy", "expected a mapping or EnergySpec, got int"),
        ({"edits": ["ok", 3]}, "edits.1", "expected a mapping or EditSpec, got int"),
        ({"negative_prompt": b"x"}, "negative_prompt", "Input should be a valid string"),
    ],
)
def test_a_wrong_type_names_the_field_and_sends_nothing(
    api: FakeAPI, client: Client, kwargs: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("a cat", **kwargs)
    assert (info.value.field, info.value.message) == (field, message)
    assert api.seen == []


def test_mappings_pass_through_as_given_and_extra_adds_fields(api: FakeAPI, client: Client) -> None:
    client.generate(
        "a cat",
        guidance_scale=7,  # an int is a valid JSON number for a float field
        energy={"gamma_attn": 0.1, "added_later": {"x": 1}},
        edits="snow",
        extra={"webhook": "https://hooks.test/x"},
    )
    client.edit_synthetic("j" * 8, ({"prompt": "fog", "alpha": 0.5}, EditSpec(prompt="rain")))
    first, second = (json.loads(r.content) for r in api.seen)
    assert first == {
        "prompt": "a cat",
        "guidance_scale": 7,
        "energy": {"gamma_attn": 0.1, "added_later": {"x": 1}},
        "edits": [{"prompt": "snow"}],
        "webhook": "https://hooks.test/x",
    }
    assert second["edits"] == [
        {"prompt": "fog", "alpha": 0.5},
        # alpha, alpha_tau and gamma_attn left None: the model's edit defaults, so they are not sent.
        {"prompt": "rain", "direction": "and", "gamma_norm": 0.0},
    ]
    assert (second["mode"], second["source_job_id"]) == ("synthetic", "j" * 8)


def test_the_request_models_are_the_bodies_the_api_documents() -> None:
    body = RealEditRequest(source_prompt="a cat", edits=["snow"], inversion=InversionSpec(regularize=True))
    assert body.to_json() == {
        "mode": "real",
        "source_prompt": "a cat",
        "edits": [{"prompt": "snow"}],
        "inversion": {"regularize": True},
    }
    inpaint = InpaintRequest(prompt="a hat", image_ref=ImageRef(job_id="j1"), steps=3)
    ref = {"job_id": "j1", "index": 0}
    assert inpaint.to_json() == {"mode": "inpaint", "prompt": "a hat", "image_ref": ref, "steps": 3}
    assert GenerateRequest(prompt="x").to_json() == {"prompt": "x"}


# ---------------------------------------------------------------------------------------------------
# One surface, two ways to run it


def public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_")
    }


@pytest.mark.parametrize(("sync", "asyn"), [(Client, AsyncClient), (Job, AsyncJob)])
def test_the_async_twin_has_the_same_methods_with_the_same_parameters(sync: type, asyn: type) -> None:
    sync_api, async_api = public(sync), public(asyn)
    assert sync_api.keys() == async_api.keys()
    for name, signature in sync_api.items():
        assert list(signature.parameters.values()) == list(async_api[name].parameters.values()), name
