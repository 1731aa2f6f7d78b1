"""The task-specific steps of the shared skeleton: initial latents, extra U-Net input, output fix-up.

:class:`TaskStepsMixin` gives :class:`~ebca_core.pipeline.EBCAPipeline` one small method per task for
step 4 of the skeleton (docs/EBCA.md, "Pipeline anatomy"): seeded noise or given latents (generate),
the DDIM-inverted image with its cache (edit_real), noise plus the mask and masked-image input or the
latent blend (inpaint); and the output step of inpainting, which pastes the kept pixels back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ebca_core.denoising import DenoiseRun
from ebca_core.images import image_sha256, pil_to_tensor
from ebca_core.inputs import CallInputs
from ebca_core.inversion import ddim_invert

#: Initial latents, and the region mask the BCU uses (None = no masked BCU).
_LatentsAndMask = tuple[torch.Tensor, torch.Tensor | None]


class TaskStepsMixin:
    """Steps 4 and 8 of each task for :class:`~ebca_core.pipeline.EBCAPipeline` (which provides these)."""

    unet: Any
    vae: Any
    device: torch.device
    dtype: torch.dtype
    model_id: str
    is_inpainting: bool
    inversion_cache_size: int
    _inversion_cache: OrderedDict[tuple[Any, ...], torch.Tensor]

    def _prepare_latents(self, inputs: CallInputs, run: DenoiseRun) -> _LatentsAndMask:
        """Step 4: the initial latents, with the task's extra U-Net input set on ``run``.

        Returns the latents and the region mask the BCU uses (inpainting with energy), else None.
        """
        if inputs.task == "edit_real":
            return self._inverted_latents(inputs, run), None
        if inputs.task == "inpaint":
            return self._inpaint_latents(inputs, run)
        if inputs.latents is None:
            latents = self._noise(run.generators, inputs.latent_shape)
        else:
            latents = inputs.latents.to(self.device, self.dtype)
        return latents * run.scheduler.init_noise_sigma, None

    def _finish(self, inputs: CallInputs, images: np.ndarray | None) -> np.ndarray | None:
        """Step 8, task part: inpainting returns the input's pixels outside the mask exactly."""
        if inputs.task != "inpaint" or images is None:
            return images
        assert inputs.picture is not None and inputs.region is not None
        # The VAE round trip would shift the kept pixels; paste the originals back.
        original = np.asarray(inputs.picture, dtype=np.float32)[None] / 255.0
        return np.where(inputs.region[None, :, :, None], images, original).astype(np.float32)

    # --- generate and inpaint ------------------------------------------------------------------------
    def _noise(self, generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        # One draw per image from its own generator, so image i does not depend on the batch.
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(rows).to(self.device, self.dtype)

    @torch.no_grad()
    def _encode_image(self, image: PIL.Image.Image) -> torch.Tensor:
        """VAE latents of ``image`` (the posterior mean: deterministic, as inversion needs)."""
        pixels = pil_to_tensor(image).to(self.device, self.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    def _inpaint_latents(self, inputs: CallInputs, run: DenoiseRun) -> _LatentsAndMask:
        """Noise, plus the mask and masked image (9-channel U-Net) or the latent blend.

        Either way the known region is kept (docs/EBCA.md, "Tasks"); the mask also goes to the BCU.
        """
        assert inputs.picture is not None and inputs.region is not None
        n = inputs.num_images
        region = torch.from_numpy(inputs.region.astype(np.float32))
        pixel_mask = region[None, None].to(self.device, self.dtype)
        # The mask at latent resolution, nearest-neighbour like StableDiffusionInpaintPipeline.
        latent_mask = F.interpolate(pixel_mask, size=inputs.latent_shape[1:], mode="nearest")
        latent_mask = latent_mask.expand(n, -1, -1, -1)
        noise = self._noise(run.generators, inputs.latent_shape)
        if self.is_inpainting:
            # Masked image: the pixels to keep, the region to repaint set to 0 (mid-gray in [-1, 1]).
            masked = pil_to_tensor(inputs.picture).to(self.device, self.dtype) * (1 - pixel_mask)
            with torch.no_grad():
                masked_latents = self.vae.encode(masked).latent_dist.mode() * self.vae.config.scaling_factor
            run.extra_unet_channels = torch.cat([latent_mask, masked_latents.expand(n, -1, -1, -1)], 1)
        else:
            run.blend_mask = latent_mask
            run.blend_latents = self._encode_image(inputs.picture).expand(n, -1, -1, -1)
            run.blend_noise = noise
        # The mask only matters to the BCU: without energy the plain kernels run.
        region_mask = latent_mask if inputs.energy is not None else None
        return noise * run.scheduler.init_noise_sigma, region_mask

    # --- real-image editing ----------------------------------------------------------------------------
    def _inverted_latents(self, inputs: CallInputs, run: DenoiseRun) -> torch.Tensor:
        """DDIM inversion of the input image with the source prompt, from the cache when it has it."""
        assert inputs.picture is not None and inputs.prompt is not None and inputs.inversion is not None
        source_embeds = run.prompt_embeds[:1]
        key = (
            image_sha256(inputs.picture),
            self.model_id,
            str(self.dtype),
            inputs.prompt,
            len(run.timesteps),
            inputs.inversion,
        )
        cached = self._inversion_cache.get(key)
        if cached is not None:
            self._inversion_cache.move_to_end(key)
            inverted = cached.clone()
        else:
            inputs.stage("inverting")
            inverted = self._invert(inputs, run, source_embeds)
            if self.inversion_cache_size > 0:
                self._inversion_cache[key] = inverted.clone()
                while len(self._inversion_cache) > self.inversion_cache_size:
                    self._inversion_cache.popitem(last=False)
        return inverted.expand(inputs.num_images, -1, -1, -1).clone()

    def _invert(self, inputs: CallInputs, run: DenoiseRun, source_embeds: torch.Tensor) -> torch.Tensor:
        assert inputs.picture is not None and inputs.inversion is not None

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # No classifier-free guidance during inversion (as pix2pix-zero and EBCA do).
            return self.unet(latents, t, encoder_hidden_states=source_embeds, return_dict=False)[0]

        scheduler = run.scheduler
        return ddim_invert(
            self._encode_image(inputs.picture),
            run.timesteps,
            scheduler.alphas_cumprod.to(self.device),
            scheduler.final_alpha_cumprod.to(self.device),
            predict,
            inputs.inversion,
            prediction_type=scheduler.config.prediction_type,
        )

    def clear_inversion_cache(self) -> None:
        self._inversion_cache.clear()
