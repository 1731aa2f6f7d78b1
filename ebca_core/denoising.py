"""The denoising loop shared by every task (docs/EBCA.md, "Pipeline anatomy").

:class:`DenoiseRun` holds what one call needs once its inputs are checked and prepared; :func:`denoise`
walks the scheduler's timesteps with classifier-free guidance, the task's extra U-Net input
(9-channel inpainting) or latent blend (inpainting on a text-to-image checkpoint), and the EBCA
processors installed for the duration of the loop.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_core.errors import InvalidInputError
from ebca_core.processor import EBCAState, ebca_attention

ProgressCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class DenoiseRun:
    """Everything the shared denoising loop needs for one call, built after validation."""

    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    num_inference_steps: int
    prompt_embeds: torch.Tensor  # [B, N, D]
    negative_embeds: torch.Tensor | None  # [B, N, D] when guidance is on
    guidance_scale: float
    generators: list[torch.Generator]
    state: EBCAState | None
    callback: ProgressCallback | None
    # Inpainting: channels appended to the U-Net input (9-channel checkpoints) or a latent blend.
    extra_unet_channels: torch.Tensor | None = None
    blend_mask: torch.Tensor | None = None  # [B, 1, h, w], 1 = repaint
    blend_latents: torch.Tensor | None = None  # clean image latents
    blend_noise: torch.Tensor | None = None

    @property
    def do_cfg(self) -> bool:
        return self.negative_embeds is not None


def _unet_out(unet: Any, run: DenoiseRun, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    model_input = torch.cat([latents, latents]) if run.do_cfg else latents
    model_input = run.scheduler.scale_model_input(model_input, t)
    if run.extra_unet_channels is not None:
        extra = run.extra_unet_channels
        model_input = torch.cat([model_input, torch.cat([extra, extra]) if run.do_cfg else extra], dim=1)
    context = (
        torch.cat([run.negative_embeds, run.prompt_embeds])
        if run.negative_embeds is not None
        else run.prompt_embeds
    )
    noise_pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
    if run.do_cfg:
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + run.guidance_scale * (cond - uncond)
    return noise_pred


def _step_kwargs(run: DenoiseRun) -> dict[str, Any]:
    """The extra arguments this scheduler's ``step`` takes: the per-image generators, eta 0."""
    kwargs: dict[str, Any] = {}
    params = inspect.signature(run.scheduler.step).parameters
    if "generator" in params:
        kwargs["generator"] = run.generators if len(run.generators) > 1 else run.generators[0]
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _blend(run: DenoiseRun, latents: torch.Tensor, i: int) -> torch.Tensor:
    """Mask-blended inpainting: outside the mask, the image latents re-noised to the next level."""
    assert run.blend_mask is not None and run.blend_latents is not None and run.blend_noise is not None
    if i < len(run.timesteps) - 1:
        next_t = run.timesteps[i + 1 : i + 2]
        known = run.scheduler.add_noise(run.blend_latents, run.blend_noise, next_t)
    else:
        known = run.blend_latents
    return run.blend_mask * latents + (1 - run.blend_mask) * known


def denoise(unet: Any, run: DenoiseRun, latents: torch.Tensor) -> torch.Tensor:
    """Run the scheduler's timesteps from ``latents``; returns the denoised latents.

    ``run.callback(step, total, latents)`` follows every counted step and may raise to abort; the
    EBCA processors come off the U-Net again either way.
    """
    scheduler, timesteps = run.scheduler, run.timesteps
    step_kwargs = _step_kwargs(run)
    order = getattr(scheduler, "order", 1)
    warmup = len(timesteps) - run.num_inference_steps * order
    completed = 0
    context = ebca_attention(unet, run.state) if run.state is not None else contextlib.nullcontext()
    with context, torch.no_grad():
        for i, t in enumerate(timesteps):
            noise_pred = _unet_out(unet, run, latents, t)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if run.blend_mask is not None:
                latents = _blend(run, latents, i)
            if not torch.isfinite(latents).all():
                # Step sizes far beyond the recommended ones overflow the context; say so instead of
                # returning a black image.
                raise InvalidInputError(
                    f"the denoising diverged at step {i} (non-finite latents); lower the step sizes "
                    "(gammas, alphas) or use float32",
                    field="energy",
                )
            # Progress is counted like diffusers' progress bar: warm-up calls (PNDM's extra first call)
            # do not count, so the last call reports step == total.
            if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                completed += 1
                if run.callback is not None:
                    run.callback(min(completed, run.num_inference_steps), run.num_inference_steps, latents)
    return latents
