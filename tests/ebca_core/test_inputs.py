"""EBCAPipeline.check_inputs: the one place a call's arguments are checked (issue 12)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ebca_common.params import REST_LIMITS
from ebca_core import EBCAPipeline, EditorialPrompt, EnergyConfig, InvalidInputError
from ebca_core.schedules import Schedule

PROMPT = "a cat and a dog"


def no_model_calls(pipe: EBCAPipeline) -> tuple[list[str], list[Any]]:
    calls: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda *a, name=name: calls.append(name))
        for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder))
    ]
    return calls, hooks


@pytest.mark.parametrize("blank", ["", "  ", "\n\t"])
@pytest.mark.parametrize("task", ["generate", "inpaint"])
def test_blank_prompts_are_refused_before_any_compute(
    tiny_pipeline: EBCAPipeline, task: str, blank: str
) -> None:
    import PIL.Image

    images = {"image": PIL.Image.new("RGB", (32, 32)), "mask": PIL.Image.new("L", (32, 32), 0)}
    images["mask"].paste(255, (0, 0, 16, 32))
    calls, hooks = no_model_calls(tiny_pipeline)
    try:
        with pytest.raises(InvalidInputError, match="non-empty") as info:
            if task == "generate":
                tiny_pipeline.generate(blank, num_inference_steps=2)
            else:
                tiny_pipeline.inpaint(prompt=blank, num_inference_steps=2, **images)
    finally:
        for hook in hooks:
            hook.remove()
    assert info.value.field == "prompt" and calls == []


def test_check_inputs_returns_the_converted_call_and_runs_no_model(tiny_pipeline: EBCAPipeline) -> None:
    calls, hooks = no_model_calls(tiny_pipeline)
    try:
        inputs = tiny_pipeline.check_inputs(
            "generate",
            prompt=PROMPT,
            num_inference_steps=3,
            scheduler="ddim",
            energy=EnergyConfig(0.01, 0.01, token_weights={"dog": 2.0}),
            edits=[EditorialPrompt("boat", alpha=0.5)],
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []
    assert inputs.token_weights == {5: 2.0} and len(inputs.timesteps) == 3
    assert inputs.scheduler is not tiny_pipeline.scheduler  # a fresh one per call


def test_the_energy_schedules_are_checked_once_per_call(
    tiny_pipeline: EBCAPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real = Schedule.validate

    def counting(self: Schedule, *args: Any, **kwargs: Any) -> None:
        checked.append(args[2] if len(args) > 2 else kwargs["field"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(Schedule, "validate", counting)
    tiny_pipeline.generate(
        PROMPT,
        num_inference_steps=2,
        output_type="latent",
        energy=EnergyConfig(0.01, 0.01),
        edits=[EditorialPrompt("boat", alpha=0.5)],
    )
    assert sorted(checked) == sorted(
        [
            "energy.gamma_attn",
            "energy.gamma_norm",
            "edits[0].alpha",
            "edits[0].gamma_attn",
            "edits[0].gamma_norm",
        ]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_inference_steps": 201}, "num_inference_steps"),
        ({"guidance_scale": 50.5}, "guidance_scale"),
        ({"energy": EnergyConfig(10.5, 0.0)}, "energy.gamma_attn"),
        ({"edits": [EditorialPrompt("boat", alpha=11.0)]}, "edits[0].alpha"),
        ({"seed": 2**32}, "seed"),
        ({"width": 2056}, "width"),
        ({"num_images": 5}, "num_images"),
        ({"prompt": "x" * 1001}, "prompt"),
    ],
)
def test_a_hosts_limits_bound_every_argument(
    tiny_pipeline: EBCAPipeline, kwargs: dict[str, Any], field: str
) -> None:
    call = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "latent", **kwargs}
    tiny_pipeline.check_inputs("generate", **call)  # the library's own limits allow all of these
    tiny_pipeline.limits = REST_LIMITS
    with pytest.raises(InvalidInputError) as info:
        tiny_pipeline.check_inputs("generate", **call)
    assert info.value.field == field


def test_max_edits_and_max_image_pixels_are_the_limits(tiny_pipeline: EBCAPipeline) -> None:
    tiny_pipeline.max_edits = 1
    assert tiny_pipeline.limits.max_edits == 1
    tiny_pipeline.limits = replace(tiny_pipeline.limits, max_image_pixels=100)
    assert tiny_pipeline.max_image_pixels == 100
    with pytest.raises(InvalidInputError, match="at most 1") as info:
        tiny_pipeline.generate(PROMPT, num_inference_steps=2, edits=[EditorialPrompt("a")] * 2)
    assert info.value.field == "edits"
