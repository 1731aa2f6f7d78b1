"""EBCAPipeline.generate_batch: several requests with their own prompts, seeds and energy settings in
one batch (issue 13). The per-row processor state must keep every request's rows independent."""

from __future__ import annotations

from typing import Any

import pytest
from numerics import PIXEL_ATOL, RUN_RTOL, max_pixel_diff, rel_diff

from ebca_core import EBCAPipeline, EnergyConfig, InvalidInputError, Schedule
from ebca_core.pipeline import BatchPart

SHARED: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "np"}

#: Three different requests: another prompt, negative prompt, seeds, gammas, schedule, token weights.
PARTS = [
    BatchPart("a cat and a dog", seed=10, energy=EnergyConfig(0.05, 0.05, token_weights={"dog": 2.5})),
    BatchPart("a red circle", negative_prompt="blue", num_images=2, seed=77, energy=None),
    BatchPart(
        "a green square",
        seed=3,
        energy=EnergyConfig(Schedule.from_kind("exp", 0.2, tau=0.5, ratio=1.0), 0.01, token_weights={2: 0.5}),
    ),
]


def alone(pipe: EBCAPipeline, part: BatchPart, scheduler: str) -> Any:
    return pipe.generate(
        part.prompt,
        negative_prompt=part.negative_prompt,
        num_images=part.num_images,
        seed=part.seed,
        energy=part.energy,
        scheduler=scheduler,
        **SHARED,
    )


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_each_request_in_a_batch_equals_its_run_alone(tiny_pipeline: EBCAPipeline, scheduler: str) -> None:
    outputs = tiny_pipeline.generate_batch(PARTS, scheduler=scheduler, **SHARED)
    assert [o.seeds for o in outputs] == [[10], [77, 78], [3]]
    for part, batched in zip(PARTS, outputs, strict=True):
        single = alone(tiny_pipeline, part, scheduler)
        # Four rows run other matmul blockings than one or two: float32 round-off only (numerics.py);
        # a leak of another request's gamma, token weights or prompt would differ by far more (> 1e-2).
        assert rel_diff(batched.latents, single.latents) < RUN_RTOL
        # Saved as 8-bit images the two may differ by at most one level per channel.
        assert max_pixel_diff(batched.images, single.images) <= PIXEL_ATOL


def test_the_rows_really_differ_by_request(tiny_pipeline: EBCAPipeline) -> None:
    """The same seed and prompt with and without energy inside one batch: the energy row moves, so the
    per-row gammas are applied per row (not the first request's to all)."""
    energy = EnergyConfig(0.3, 0.1, token_weights={"dog": 3.0})
    parts = [BatchPart("a cat and a dog", seed=1), BatchPart("a cat and a dog", seed=1, energy=energy)]
    plain, ebca = tiny_pipeline.generate_batch(parts, scheduler="ddim", **SHARED)
    assert rel_diff(ebca.latents, plain.latents) > 1e-3
    assert rel_diff(plain.latents, alone(tiny_pipeline, parts[0], "ddim").latents) < RUN_RTOL
    assert rel_diff(ebca.latents, alone(tiny_pipeline, parts[1], "ddim").latents) < RUN_RTOL


def test_a_bad_part_is_named(tiny_pipeline: EBCAPipeline) -> None:
    bad = BatchPart("a cat", energy=EnergyConfig(0.1, 0.0, token_weights={"zebra": 2.0}))
    with pytest.raises(InvalidInputError) as info:
        tiny_pipeline.generate_batch([PARTS[1], bad], **SHARED)
    assert info.value.field == "parts[1].energy.token_weights"
    with pytest.raises(InvalidInputError) as info:
        tiny_pipeline.generate_batch([], **SHARED)
    assert info.value.field == "parts"
