"""The api and ebca_core accept and refuse the same values of every request field (issue 12).

Each case is a request body (and, for edits, uploaded images). The api side is the code a POST runs:
``parse_generate`` / ``parse_edit``, ``check_limits`` and the upload checks of ``api/service.py``. The
core side is what the worker makes of the same request, handed to ``EBCAPipeline.check_inputs`` the way
a library caller would pass it (the request's own ``num_images`` and ``seed``), on a pipeline with the
limits the worker gives its pipelines (``service_limits``). Both must accept, or both refuse naming the
same field (ebca_core may add the key below it: ``energy.token_weights.two words``).

Not enumerated, and why: ``model`` selects the pipeline (no core argument); ``output_format`` is the
worker's encoding; ``image_ref``/``mask_ref``/``source_job_id`` are references the api resolves;
``mode`` picks the model; ``timeout_seconds`` is the job's deadline, which the worker enforces around
the pipeline call (ebca_core has no such argument); ``webhook`` and ``webhook_events`` belong to the
job's record (the api's dispatcher delivers them; the worker never sees them). Values of the wrong
JSON type (``"7"`` for a number) are a wire-format matter the strict request models refuse; the core's
Python arguments are typed. Two differences are pinned in tests of their own: word token weights and
token indices past the prompt depend on the model's tokenizer, which only the worker has; and an upload
must also convert to grayscale for the api, because a stored upload may later serve as another job's
mask.
"""

from __future__ import annotations

import io
from typing import Any

import PIL.Image
import pytest

from ebca_common.errors import ValidationFailed
from ebca_common.images import check_image_size, check_mask, decode_image
from ebca_common.model_defaults import BUILTIN_DEFAULTS, fill_defaults
from ebca_common.params import REST_LIMITS
from ebca_common.settings import Settings
from ebca_common.specs import (
    GenerateRequest,
    InpaintRequest,
    RealEditRequest,
    check_limits,
    parse_edit,
    parse_generate,
    service_limits,
    stored_request,
)
from ebca_core import EBCAPipeline, InvalidInputError
from worker.runner import MODES, energy_config

SETTINGS = Settings(default_model="models/shapes", models={}, max_image_pixels=64 * 64)
PROMPT = "a cat and a dog"


def png(size: tuple[int, int] = (32, 32), mode: str = "RGB", color: Any = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def half_mask(size: tuple[int, int] = (32, 32)) -> bytes:
    mask = PIL.Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return _encode(mask)


def _encode(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


GEN: dict[str, Any] = {"prompt": PROMPT, "steps": 4}
INPAINT: dict[str, Any] = {"mode": "inpaint", "prompt": "a bear", "steps": 4}
REAL: dict[str, Any] = {"mode": "real", "source_prompt": "a cat", "edits": [{"prompt": "a dog"}], "steps": 4}
IMAGES = {"image": png(), "mask": half_mask()}


BEAR = {"bear": 2.0}
NOT_B = {"prompt": "b", "alpha": 1.5, "direction": "not"}
NOT_B_FROM_0 = {**NOT_B, "alpha_tau": 0.0}
NOT_CAT = {"prompt": "cat", "alpha": 0.7, "direction": "not"}


def energy(**fields: Any) -> dict[str, Any]:
    return {**GEN, "energy": {"gamma_attn": 0.01, "gamma_norm": 0.01, **fields}}


def edit(**fields: Any) -> dict[str, Any]:
    return {**GEN, "edits": [{"prompt": "monet painting", **fields}]}


def schedule(**fields: Any) -> dict[str, Any]:
    return energy(schedule=fields)


#: (field, body, uploads or None); every field has accepted and refused values.
CASES: list[tuple[str, dict[str, Any], dict[str, bytes] | None]] = [
    ("prompt", {**GEN, "prompt": "a red circle"}, None),
    ("prompt", {**GEN, "prompt": ""}, None),
    ("prompt", {**GEN, "prompt": "   "}, None),
    ("prompt", {**GEN, "prompt": "x" * 1000}, None),
    ("prompt", {**GEN, "prompt": "x" * 1001}, None),
    ("negative_prompt", {**GEN, "negative_prompt": "blurry"}, None),
    ("negative_prompt", {**GEN, "negative_prompt": ""}, None),
    ("negative_prompt", {**GEN, "negative_prompt": "x" * 1001}, None),
    ("steps", {**GEN, "steps": 1}, None),
    ("steps", {**GEN, "steps": 200}, None),
    ("steps", {**GEN, "steps": 0}, None),
    ("steps", {**GEN, "steps": 201}, None),
    ("steps", {**GEN, "steps": None}, None),
    ("guidance_scale", {**GEN, "guidance_scale": 0.0}, None),
    ("guidance_scale", {**GEN, "guidance_scale": 50.0}, None),
    ("guidance_scale", {**GEN, "guidance_scale": -0.5}, None),
    ("guidance_scale", {**GEN, "guidance_scale": 50.5}, None),
    ("width", {**GEN, "width": 48}, None),
    ("width", {**GEN, "width": 12}, None),
    ("width", {**GEN, "width": 0}, None),
    ("width", {**GEN, "width": 2056}, None),
    ("width", {**GEN, "width": 64, "height": 64}, None),
    ("width", {**GEN, "width": 72, "height": 64}, None),  # over the 64*64 pixel limit of SETTINGS
    ("height", {**GEN, "height": 40}, None),
    ("height", {**GEN, "height": 20}, None),
    ("scheduler", {**GEN, "scheduler": "pndm"}, None),
    ("scheduler", {**GEN, "scheduler": "euler_ancestral"}, None),
    ("scheduler", {**GEN, "scheduler": "heun"}, None),
    ("num_images", {**GEN, "num_images": 4}, None),
    ("num_images", {**GEN, "num_images": 5}, None),
    ("num_images", {**GEN, "num_images": 0}, None),
    ("seed", {**GEN, "seed": 0}, None),
    ("seed", {**GEN, "seed": 2**32 - 1}, None),
    ("seed", {**GEN, "seed": 2**32 - 1, "num_images": 2}, None),
    ("seed", {**GEN, "seed": -1}, None),
    ("seed", {**GEN, "seed": 2**32}, None),
    ("energy.gamma_attn", energy(gamma_attn=0.0), None),
    ("energy.gamma_attn", energy(gamma_attn=10.0), None),
    ("energy.gamma_attn", energy(gamma_attn=-0.01), None),
    ("energy.gamma_attn", energy(gamma_attn=10.5), None),
    ("energy.gamma_norm", energy(gamma_norm=0.02), None),
    ("energy.gamma_norm", energy(gamma_norm=-1.0), None),
    ("energy.gamma_norm", energy(gamma_norm=11.0), None),
    ("energy.schedule", schedule(kind="constant"), None),
    ("energy.schedule", schedule(kind="step", tau=0.5), None),
    ("energy.schedule", schedule(kind="reverse_step", tau=1.0), None),
    ("energy.schedule", schedule(kind="reverse_step", tau=1.5), None),
    ("energy.schedule", schedule(kind="step", tau=-0.1), None),
    ("energy.schedule", schedule(kind="cosine"), None),
    ("energy.schedule", schedule(kind="linear", ratio=0.001), None),
    ("energy.schedule", schedule(kind="linear", ratio=-0.001), None),
    ("energy.schedule", schedule(kind="linear", ratio=-0.01), None),  # negative from step 2
    ("energy.schedule", schedule(kind="exp", ratio=0.5), None),
    ("energy.schedule", schedule(kind="exp"), None),
    ("energy.schedule", schedule(kind="exp", ratio=-1.0), None),  # negative at odd steps
    ("energy.schedule", schedule(kind="exp", ratio=1e200), None),  # overflows
    ("energy.token_weights", energy(token_weights={"cat": 2.5}), None),
    ("energy.token_weights", energy(token_weights={"2": 2.5, "5": 1.5}), None),
    ("energy.token_weights", energy(token_weights={"cat": 0.0}), None),
    ("energy.token_weights", energy(token_weights={"cat": -1.0}), None),
    ("energy.token_weights", energy(token_weights={"two words": 2.0}), None),
    ("energy.token_weights", energy(token_weights={" 5": 2.0}), None),
    ("energy.token_weights", energy(token_weights={"": 2.0}), None),
    ("energy.token_weights", energy(token_weights={"9" * 7: 2.0}), None),
    ("energy.token_weights", energy(token_weights={"\u00b2": 2.0}), None),
    ("edits", {**GEN, "edits": [{"prompt": "a"}] * 4}, None),
    ("edits", {**GEN, "edits": [{"prompt": "a"}] * 5}, None),
    ("edits", edit(alpha=1.5, direction="not"), None),  # normaliser -0.5 from step 0
    ("edits", edit(alpha=0.9, direction="not"), None),
    # Explicit alphas and taus: the same verdict on both sides (null ones: the model's defaults).
    ("edits", {**GEN, "edits": [{"prompt": "a", "alpha": 1, "alpha_tau": 0.5}, NOT_B_FROM_0]}, None),
    ("edits", {**GEN, "edits": [{"prompt": "a"}, {**NOT_B, "alpha_tau": 0.5}]}, None),
    ("edits", {**edit(alpha=1.5, direction="not", alpha_tau=1.0), "scheduler": "ddim"}, None),  # never on
    ("edits", {**edit(alpha=1.5, direction="not", alpha_tau=1.0), "scheduler": "pndm"}, None),  # on at T
    ("edits[0].prompt", edit(), None),
    ("edits[0].prompt", edit(prompt=""), None),
    ("edits[0].prompt", edit(prompt="  \t"), None),
    ("edits[0].prompt", edit(prompt="x" * 1001), None),
    ("edits[0].alpha", edit(alpha=0.0), None),
    ("edits[0].alpha", edit(alpha=10.0), None),
    ("edits[0].alpha", edit(alpha=-0.1), None),
    ("edits[0].alpha", edit(alpha=10.1), None),
    ("edits[0].direction", edit(direction="not", alpha=0.5), None),
    ("edits[0].direction", edit(direction="or"), None),
    ("edits[0].alpha_tau", edit(alpha_tau=1.0), None),
    ("edits[0].alpha_tau", edit(alpha_tau=1.2), None),
    ("edits[0].alpha_tau", edit(alpha_tau=-0.2), None),
    ("edits[0].gamma_attn", edit(gamma_attn=1e-3), None),
    ("edits[0].gamma_attn", edit(gamma_attn=-1e-3), None),
    ("edits[0].gamma_attn", edit(gamma_attn=12.0), None),
    ("edits[0].gamma_norm", edit(gamma_norm=5.0), None),
    ("edits[0].gamma_norm", edit(gamma_norm=-5.0), None),
    ("edits[0].gamma_tau", edit(gamma_tau=0.3, gamma_attn=1e-3), None),
    ("edits[0].gamma_tau", edit(gamma_tau=None), None),
    ("edits[0].gamma_tau", edit(gamma_tau=1.01), None),
    # POST /edit, mode inpaint
    ("prompt", INPAINT, IMAGES),
    ("prompt", {**INPAINT, "prompt": "  "}, IMAGES),  # issue 12: passed the api, failed in the worker
    ("prompt", {**INPAINT, "prompt": ""}, IMAGES),
    ("negative_prompt", {**INPAINT, "negative_prompt": "x" * 1001}, IMAGES),
    ("scheduler", {**INPAINT, "scheduler": "lms"}, IMAGES),
    ("scheduler", {**INPAINT, "scheduler": "karras"}, IMAGES),
    ("energy.gamma_attn", {**INPAINT, "energy": {"gamma_attn": 0.025, "gamma_norm": 0.025}}, IMAGES),
    ("energy.gamma_attn", {**INPAINT, "energy": {"gamma_attn": -0.025}}, IMAGES),
    ("energy.token_weights", {**INPAINT, "energy": {"gamma_attn": 0.02, "token_weights": BEAR}}, IMAGES),
    ("image", INPAINT, {**IMAGES, "image": b""}),
    ("image", INPAINT, {**IMAGES, "image": b"GIF89a broken"}),
    ("image", INPAINT, {"image": png((36, 32)), "mask": half_mask((36, 32))}),
    ("image", INPAINT, {"image": png((4, 4)), "mask": half_mask((4, 4))}),
    ("image", INPAINT, {"image": png((72, 64)), "mask": half_mask((72, 64))}),  # over 64*64 pixels
    ("image", INPAINT, {**IMAGES, "image": png((32, 32), "P", fmt="GIF")}),
    ("image", INPAINT, {**IMAGES, "image": png((32, 32), "RGBA")}),
    ("mask", INPAINT, {**IMAGES, "mask": _encode(PIL.Image.open(io.BytesIO(half_mask())).convert("RGBA"))}),
    ("mask", INPAINT, {**IMAGES, "mask": half_mask((32, 40))}),
    ("mask", INPAINT, {**IMAGES, "mask": png((32, 32), "L", 0)}),
    ("mask", INPAINT, {**IMAGES, "mask": png((32, 32), "L", 255)}),
    ("mask", INPAINT, {**IMAGES, "mask": png((32, 32), "LAB", fmt="TIFF")}),
    ("mask", INPAINT, {**IMAGES, "mask": b"\x89PNG broken"}),
    # POST /edit, mode real
    ("source_prompt", REAL, IMAGES),
    ("source_prompt", {**REAL, "source_prompt": " \n "}, IMAGES),  # issue 12: passed the api, failed later
    ("source_prompt", {**REAL, "source_prompt": "x" * 1001}, IMAGES),
    ("edits", {**REAL, "edits": [{"prompt": "dog", "alpha": 0.7}, {**NOT_CAT, "alpha_tau": 0.4}]}, IMAGES),
    ("edits", {**REAL, "edits": [{"prompt": "dog", "alpha": 0.6}, {**NOT_CAT, "alpha": 1.7}]}, IMAGES),
    ("edits[0].prompt", {**REAL, "edits": [{"prompt": " "}]}, IMAGES),
    ("inversion", {**REAL, "inversion": {"regularize": True}}, IMAGES),
    ("steps", {**REAL, "steps": 201}, IMAGES),
    ("image", REAL, {"image": png((36, 32))}),
]  # fmt: skip

#: Prompt-dependent token weights: only the worker has the tokenizer. The api accepts them; ebca_core
#: refuses them naming the field, so the job fails with invalid_input (docs/API.md says so).
TOKENIZER_CASES = [
    energy(token_weights={"unicorn": 2.0}),  # a word the prompt does not have
    energy(token_weights={"50": 2.0}),  # an index past the prompt's tokens
]


#: An upload is stored and may later be referenced as an image or a mask of another job
#: (``{"input": "image"}``), so the api wants it to convert to RGB and to grayscale; ebca_core only
#: needs the conversion the call makes (an image that becomes RGB is fine for edit_real).
STORED_UPLOAD_CASES = [(INPAINT, {**IMAGES, "image": png((32, 32), "LAB", fmt="TIFF")})]


def api_refusal(body: dict[str, Any], uploads: dict[str, bytes] | None) -> ValidationFailed | None:
    """What POST /generate or /edit answers: None (202) or the 422 it raises."""
    try:
        request = parse_edit(body) if "mode" in body else parse_generate(body)
        check_limits(request, SETTINGS)
        if uploads is not None:  # the checks of api/service.py's _input_image, uploads only
            image, _ = decode_image(uploads["image"], "image", SETTINGS.max_image_pixels)
            check_image_size(image, "image")
            if "mask" in uploads:
                mask, _ = decode_image(uploads["mask"], "mask", SETTINGS.max_image_pixels)
                check_mask(image, mask)
    except ValidationFailed as exc:
        return exc
    return None


class Uploads:
    """Stands in for the worker's JobRunner: the stored input images by name."""

    def __init__(self, uploads: dict[str, bytes] | None) -> None:
        self.uploads = uploads or {}

    def input_bytes(self, ref: Any, field: str) -> bytes:
        return self.uploads[field.removesuffix("_ref")]


def core_refusal(
    pipe: EBCAPipeline, body: dict[str, Any], uploads: dict[str, bytes] | None
) -> InvalidInputError | None:
    """What ebca_core says to the same request, converted as the worker converts it."""
    mode = MODES[body.get("mode", "generate")]
    request: Any = stored_request(mode.model, {"num_images": 1, "output_format": "png", **body})
    request = fill_defaults(request, BUILTIN_DEFAULTS, pipe.default_size, edit_mode=mode.edit_mode)
    method, arguments = mode.handler(Uploads(uploads), request)  # type: ignore[arg-type]
    try:
        pipe.check_inputs(
            method,  # type: ignore[arg-type]
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            energy=energy_config(request.energy),
            num_images=request.num_images,
            seed=request.seed,
            **arguments,
        )
    except InvalidInputError as exc:
        return exc
    return None


#: REST names of core arguments; the REST schedule is converted into the two gammas' schedules.
ALIASES = {
    "steps": "num_inference_steps",
    "energy.schedule.tau": "energy.gamma_attn",
    "energy.schedule.ratio": "energy.gamma_attn",
    "energy.schedule.kind": "schedule.kind",
}


@pytest.fixture
def pipe(tiny_pipeline: EBCAPipeline) -> EBCAPipeline:
    tiny_pipeline.limits = service_limits(SETTINGS)  # as worker.pipelines.PipelineCache does
    return tiny_pipeline


def test_api_and_core_accept_and_refuse_the_same_values(pipe: EBCAPipeline) -> None:
    outcomes: dict[str, set[bool]] = {}
    mismatches = []
    for field, body, uploads in CASES:
        api, core = api_refusal(body, uploads), core_refusal(pipe, body, uploads)
        outcomes.setdefault(field, set()).add(api is None)
        if (api is None) != (core is None):
            mismatches.append((field, body, uploads and sorted(uploads), api, core))
        elif api is not None and core is not None:
            api_field = ALIASES.get(api.field or "", api.field or "")
            if core.field != api_field and not (core.field or "").startswith(f"{api_field}."):
                mismatches.append((field, body, "fields differ", api.field, core.field))
    assert not mismatches, "\n".join(map(str, mismatches))
    # Not vacuous: every field has values both sides accept and values both refuse.
    assert {field: sides for field, sides in outcomes.items() if sides != {True, False}} == {
        "inversion": {True}  # a bool: both values are valid
    }


def test_the_requests_fields_are_all_enumerated() -> None:
    """A new request field needs cases here (or a reason in the module docstring to have none)."""
    enumerated = {field.split(".")[0].split("[")[0] for field, _, _ in CASES}
    not_core = {"model", "output_format", "image_ref", "mask_ref", "mode", "source_job_id", "timeout_seconds",
                "webhook", "webhook_events"}  # fmt: skip
    for model in (GenerateRequest, InpaintRequest, RealEditRequest):
        assert set(model.model_fields) - not_core <= enumerated | {"image", "mask"}, model.__name__


@pytest.mark.parametrize("body", TOKENIZER_CASES)
def test_prompt_dependent_token_weights_are_refused_by_the_core_only(
    pipe: EBCAPipeline, body: dict[str, Any]
) -> None:
    assert api_refusal(body, None) is None
    refusal = core_refusal(pipe, body, None)
    assert refusal is not None and refusal.field == "energy.token_weights"


@pytest.mark.parametrize(("body", "uploads"), STORED_UPLOAD_CASES)
def test_uploads_must_also_be_usable_as_masks_by_the_api_only(
    pipe: EBCAPipeline, body: dict[str, Any], uploads: dict[str, bytes]
) -> None:
    refusal = api_refusal(body, uploads)
    assert refusal is not None and refusal.field == "image" and "LAB" in refusal.message
    assert core_refusal(pipe, body, uploads) is None


def test_the_rest_bounds_are_the_limits_the_core_applies() -> None:
    schema = GenerateRequest.model_json_schema()
    fields = schema["properties"]
    steps = next(s for s in fields["steps"]["anyOf"] if s.get("type") == "integer")
    assert steps["maximum"] == REST_LIMITS.max_steps
    edit_schema = schema["$defs"]["EditSpec"]["properties"]
    alpha = next(s for s in edit_schema["alpha"]["anyOf"] if s.get("type") == "number")  # null = default
    assert alpha["maximum"] == REST_LIMITS.max_step_size
    assert fields["prompt"]["maxLength"] == REST_LIMITS.max_prompt_chars
