"""The EBCA pipeline: generation, composition/synthetic editing, real-image editing and inpainting.

One :class:`EBCAPipeline` holds the components of a Stable Diffusion checkpoint (U-Net, VAE, CLIP text
encoder and tokenizer, scheduler config) and runs the denoising loop itself, the same way diffusers'
``StableDiffusionPipeline.__call__`` does, with the EBCA processors of :mod:`ebca_core.processor`
installed for the duration of one call (EBCA_SPEC.md). Every call validates all its inputs before any
compute and raises :class:`InvalidInputError` naming the offending field.

Reproducibility: image ``i`` of a call uses its own CPU generator seeded ``seed + i`` for its initial
noise (and for the noise of stochastic schedulers), so a batch of N equals N single runs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_core.config import EditorialPrompt, EnergyConfig, InversionConfig, check_cacao_normaliser
from ebca_core.errors import InvalidInputError
from ebca_core.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageInput,
    check_size_multiple,
    image_sha256,
    load_image,
    load_mask,
    numpy_to_pil,
    pil_to_tensor,
    tensor_to_numpy,
)
from ebca_core.inversion import ddim_invert
from ebca_core.loading import SCHEDULERS, make_scheduler, scheduler_name
from ebca_core.processor import EBCAState, ebca_attention

OutputType = Literal["pil", "np", "latent"]
ProgressCallback = Callable[[int, int, torch.Tensor], None]
StageCallback = Callable[[str], None]

_MAX_SEED = 2**64 - 1


@dataclass
class EBCAOutput:
    """Result of one pipeline call.

    ``images``: a list of PIL images (``output_type="pil"``), a ``[B, H, W, 3]`` float array in [0, 1]
    (``"np"``) or ``None`` (``"latent"``). ``latents``: the final denoised latents ``[B, C, h, w]``.
    ``seeds``: the seed of each image (image i alone with that seed reproduces it). ``energy_trace``:
    per-layer energies of the main prompt when ``record_energy=True`` was asked (else empty).
    """

    images: list[PIL.Image.Image] | np.ndarray | None
    latents: torch.Tensor
    seeds: list[int]
    energy_trace: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(value: object, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"must be an integer, got {type(value).__name__}", field=name)
    if value < minimum:
        raise InvalidInputError(f"must be >= {minimum}, got {value}", field=name)
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"must be <= {maximum}, got {value}", field=name)
    return value


def _check_float(value: object, name: str, minimum: float = 0.0) -> float:
    if not _is_number(value):
        raise InvalidInputError(f"must be a number, got {type(value).__name__}", field=name)
    if not math.isfinite(value):
        raise InvalidInputError(f"must be finite, got {value}", field=name)
    if value < minimum:
        raise InvalidInputError(f"must be >= {minimum}, got {value}", field=name)
    return float(value)


class EBCAPipeline:
    """Stable Diffusion with energy-based cross-attention. Build one with :func:`load_pipeline`.

    Attributes a host may tune: ``max_edits`` (most editorial prompts per call), ``max_image_pixels``
    (largest input image or mask), ``captioner`` (``image -> caption`` used by :meth:`edit_real` when no
    source prompt is given; ``None`` = a source prompt is required), ``inversion_cache_size`` (inverted
    latents kept for :meth:`edit_real`).
    """

    def __init__(
        self,
        *,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: SchedulerMixin,
        model_id: str = "model",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = self._place(unet)
        self.vae = self._place(vae)
        self.text_encoder = self._place(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.model_id = model_id
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_edits = 4
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
        self.captioner: Callable[[PIL.Image.Image], str] | None = None
        self.inversion_cache_size = 8
        self._inversion_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()

    def _place(self, module: Any) -> Any:
        # Cast only when needed: diffusers warns about casting modules it loaded in the right dtype.
        if module.dtype != self.dtype:
            module = module.to(dtype=self.dtype)
        if module.device != self.device:
            module = module.to(self.device)
        module.requires_grad_(False)
        return module.eval()

    # --- properties -------------------------------------------------------------------------------
    @property
    def is_inpainting(self) -> bool:
        """A 9-channel U-Net (noisy latents + mask + masked-image latents): SD-inpainting layout."""
        return int(self.unet.config.in_channels) == 9

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` the model was trained at."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    @property
    def scheduler_name(self) -> str:
        return scheduler_name(self.scheduler)

    def set_scheduler(self, name: str) -> None:
        """Use scheduler ``name`` (one of ``ddim pndm euler euler_ancestral dpm_solver lms``)."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    # --- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings ``[len(texts), N, D]`` of padded prompts (as diffusers' ``encode_prompt``)."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(self.dtype)

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with its start and end tokens, truncated like the encoder input."""
        return list(
            self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        )

    def resolve_token_weights(
        self, prompt: str | None, token_weights: Mapping[int | str, float] | None, num_tokens: int
    ) -> dict[int, float]:
        """Map word or index keys to token indices of the tokenized prompt (0 = start token).

        A word that the tokenizer splits into several tokens weights all of them; a word occurring
        several times weights every occurrence.
        """
        if not token_weights:
            return {}
        ids = self.prompt_token_ids(prompt) if prompt is not None else None
        limit = len(ids) if ids is not None else num_tokens
        resolved: dict[int, float] = {}
        for key, weight in token_weights.items():
            name = "energy.token_weights"
            # Only ASCII digits are an index ("²".isdigit() is true but int("²") raises).
            if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
                key = int(key.strip())
            if isinstance(key, int) and not isinstance(key, bool):
                if key >= limit:
                    what = (
                        f"the prompt's {limit} tokens (start and end tokens included)"
                        if ids
                        else (f"the {limit} tokens of prompt_embeds")
                    )
                    raise InvalidInputError(f"token index {key} is past {what}", field=name)
                resolved[key] = float(weight)
                continue
            if ids is None:
                raise InvalidInputError(
                    f"word {key!r} cannot be resolved without a text prompt; use token indices with "
                    "prompt_embeds",
                    field=name,
                )
            word_ids = self.tokenizer(str(key), add_special_tokens=False).input_ids
            if not word_ids:
                raise InvalidInputError(f"word {key!r} has no tokens", field=name)
            found = [
                start
                for start in range(1, len(ids) - len(word_ids) + 1)
                if ids[start : start + len(word_ids)] == word_ids
            ]
            if not found:
                raise InvalidInputError(f"word {key!r} does not occur in the prompt", field=name)
            for start in found:
                for index in range(start, start + len(word_ids)):
                    resolved[index] = float(weight)
        return resolved

    # --- validation -----------------------------------------------------------------------------------
    def _check_common(
        self,
        *,
        num_inference_steps: object,
        guidance_scale: object,
        num_images: object,
        seed: object,
        output_type: object,
        callback: object,
        on_stage: object,
    ) -> None:
        max_steps = int(self.scheduler.config.num_train_timesteps)
        _check_int(num_inference_steps, "num_inference_steps", 1, max_steps)
        _check_float(guidance_scale, "guidance_scale", 0.0)
        _check_int(num_images, "num_images", 1)
        if seed is not None:
            _check_int(seed, "seed", 0, _MAX_SEED - int(num_images) + 1)  # type: ignore[call-overload]
        if output_type not in ("pil", "np", "latent"):
            raise InvalidInputError(
                f"must be 'pil', 'np' or 'latent', got {output_type!r}", field="output_type"
            )
        if callback is not None and not callable(callback):
            raise InvalidInputError("must be callable(step, total, latents) or None", field="callback")
        if on_stage is not None and not callable(on_stage):
            raise InvalidInputError("must be callable(stage) or None", field="on_stage")

    def _check_size(self, value: object, name: str) -> int | None:
        if value is None:
            return None
        _check_int(value, name, 8)
        if value % 8:  # type: ignore[operator]
            raise InvalidInputError(f"must be a multiple of 8, got {value}", field=name)
        return int(value)  # type: ignore[arg-type]

    def _check_energy_and_edits(
        self,
        energy: object,
        edits: object,
        num_inference_steps: int,
        num_calls: int,
    ) -> list[EditorialPrompt]:
        if energy is not None:
            if not isinstance(energy, EnergyConfig):
                raise InvalidInputError(
                    f"must be an EnergyConfig or None, got {type(energy).__name__}", field="energy"
                )
            energy.validate(num_inference_steps, num_calls)
        if edits is None:
            return []
        if isinstance(edits, EditorialPrompt) or not isinstance(edits, Sequence) or isinstance(edits, str):
            raise InvalidInputError("must be a list of EditorialPrompt", field="edits")
        if len(edits) > self.max_edits:
            raise InvalidInputError(
                f"at most {self.max_edits} editorial prompts are allowed, got {len(edits)}", field="edits"
            )
        for index, edit in enumerate(edits):
            if not isinstance(edit, EditorialPrompt):
                raise InvalidInputError(
                    f"must be an EditorialPrompt, got {type(edit).__name__}", field=f"edits[{index}]"
                )
            edit.validate(index, num_inference_steps, num_calls)
        check_cacao_normaliser(list(edits), num_inference_steps, num_calls)
        return list(edits)

    def _check_embeds(self, value: object, name: str, num_images: int) -> torch.Tensor | None:
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or value.ndim != 3:
            raise InvalidInputError("must be a [batch, tokens, width] tensor", field=name)
        width = int(self.unet.config.cross_attention_dim)
        if value.shape[-1] != width:
            raise InvalidInputError(f"width must be {width}, got {value.shape[-1]}", field=name)
        if value.shape[0] not in (1, num_images):
            raise InvalidInputError(
                f"batch must be 1 or num_images ({num_images}), got {value.shape[0]}", field=name
            )
        if not torch.isfinite(value).all():
            raise InvalidInputError("contains NaN or infinite values", field=name)
        return value.to(self.device, self.dtype).expand(num_images, -1, -1)

    def _scheduler_for(self, name: str | None) -> SchedulerMixin:
        if name is None:
            return make_scheduler(self.scheduler_name, self.scheduler.config)
        if name not in SCHEDULERS:
            raise InvalidInputError(
                f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}", field="scheduler"
            )
        return make_scheduler(name, self.scheduler.config)

    def _timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> torch.Tensor:
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler.timesteps

    def _require_text_to_image(self, task: str) -> None:
        if self.is_inpainting:
            raise InvalidInputError(
                f"{self.model_id!r} is an inpainting checkpoint (9-channel U-Net); it only supports "
                f"inpaint(), not {task}()",
                field="model",
            )

    @staticmethod
    def _seeds(seed: int | None, num_images: int) -> list[int]:
        base = secrets.randbelow(2**32) if seed is None else seed
        return [base + i for i in range(num_images)]

    @staticmethod
    def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
        # CPU generators: the same seed gives the same noise on every device.
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _noise(self, generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        # One draw per image from its own generator, so image i does not depend on the batch.
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(rows).to(self.device, self.dtype)

    def _make_state(
        self,
        *,
        run_steps: int,
        num_calls: int,
        energy: EnergyConfig | None,
        token_weights: dict[int, float],
        do_cfg: bool,
        edits: list[EditorialPrompt],
        edit_uncond: torch.Tensor | None,
        region_mask: torch.Tensor | None,
        record_energy: bool,
    ) -> EBCAState | None:
        if energy is None and not edits and region_mask is None and not record_energy:
            # The plain diffusers path: no processors installed at all.
            return None
        edit_embeds = self.encode_text([e.prompt for e in edits]) if edits else None
        return EBCAState(
            num_inference_steps=run_steps,
            num_unet_calls=num_calls,
            energy=energy,
            token_weights=token_weights,
            do_cfg=do_cfg,
            edits=edits,
            edit_embeds=edit_embeds,
            edit_uncond_embeds=edit_uncond,
            region_mask=region_mask,
            record_energy=record_energy,
        )

    # --- the denoising loop ---------------------------------------------------------------------------
    def _unet_out(self, run: _Run, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
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
        noise_pred = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        if run.do_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + run.guidance_scale * (cond - uncond)
        return noise_pred

    def _denoise(self, run: _Run, latents: torch.Tensor) -> torch.Tensor:
        scheduler, timesteps = run.scheduler, run.timesteps
        step_kwargs: dict[str, Any] = {}
        params = inspect.signature(scheduler.step).parameters
        if "generator" in params:
            step_kwargs["generator"] = run.generators if len(run.generators) > 1 else run.generators[0]
        if "eta" in params:
            step_kwargs["eta"] = 0.0
        order = getattr(scheduler, "order", 1)
        warmup = len(timesteps) - run.num_inference_steps * order
        completed = 0
        context = ebca_attention(self.unet, run.state) if run.state is not None else contextlib.nullcontext()
        with context, torch.no_grad():
            for i, t in enumerate(timesteps):
                noise_pred = self._unet_out(run, latents, t)
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if run.blend_mask is not None:
                    latents = self._blend(run, latents, i)
                if not torch.isfinite(latents).all():
                    # Step sizes far beyond the recommended ones overflow the context; say so
                    # instead of returning a black image.
                    raise InvalidInputError(
                        f"the denoising diverged at step {i} (non-finite latents); lower the step "
                        "sizes (gammas, alphas) or use float32",
                        field="energy",
                    )
                # Progress is counted like diffusers' progress bar: warm-up calls (PNDM's extra first
                # call) do not count, so the last call reports step == total.
                if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                    completed += 1
                    if run.callback is not None:
                        run.callback(
                            min(completed, run.num_inference_steps), run.num_inference_steps, latents
                        )
        return latents

    def _blend(self, run: _Run, latents: torch.Tensor, i: int) -> torch.Tensor:
        """Mask-blended inpainting: outside the mask, the image latents re-noised to the next level."""
        assert run.blend_mask is not None and run.blend_latents is not None and run.blend_noise is not None
        if i < len(run.timesteps) - 1:
            next_t = run.timesteps[i + 1 : i + 2]
            known = run.scheduler.add_noise(run.blend_latents, run.blend_noise, next_t)
        else:
            known = run.blend_latents
        return run.blend_mask * latents + (1 - run.blend_mask) * known

    def _decode(self, latents: torch.Tensor, output_type: str) -> tuple[np.ndarray | None, torch.Tensor]:
        if output_type == "latent":
            return None, latents
        with torch.no_grad():
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return tensor_to_numpy(decoded), latents

    @staticmethod
    def _format(images: np.ndarray | None, output_type: str) -> list[PIL.Image.Image] | np.ndarray | None:
        if images is None:
            return None
        return numpy_to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    def _encode_image(self, image: PIL.Image.Image) -> torch.Tensor:
        """VAE latents of ``image`` (the posterior mean: deterministic, as inversion needs)."""
        pixels = pil_to_tensor(image).to(self.device, self.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    # --- generate ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        energy: EnergyConfig | None = None,
        edits: Sequence[EditorialPrompt] | None = None,
        output_type: OutputType = "pil",
        callback: ProgressCallback | None = None,
        on_stage: StageCallback | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        scheduler: str | None = None,
        record_energy: bool = False,
    ) -> EBCAOutput:
        """Text-to-image generation with BCU on the main prompt and optional CACAO ``edits``.

        Same seed with and without ``edits`` gives the original and the edited image (synthetic
        editing, EBCA_SPEC.md "Tasks"). ``latents`` (``[num_images, C, h, w]``, unscaled noise as in
        diffusers) replaces the seeded initial noise. ``scheduler`` overrides the pipeline's scheduler
        for this call only. ``callback(step, total, latents)`` runs after every denoising step (steps
        1..total) and may raise to abort; ``on_stage`` receives "denoising" then "decoding".
        """
        self._require_text_to_image("generate")
        self._check_common(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images=num_images,
            seed=seed,
            output_type=output_type,
            callback=callback,
            on_stage=on_stage,
        )
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidInputError("give exactly one of prompt and prompt_embeds", field="prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidInputError(f"must be a string, got {type(prompt).__name__}", field="prompt")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InvalidInputError(
                f"must be a string or None, got {type(negative_prompt).__name__}", field="negative_prompt"
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InvalidInputError(
                "give at most one of negative_prompt and negative_prompt_embeds", field="negative_prompt"
            )
        prompt_embeds = self._check_embeds(prompt_embeds, "prompt_embeds", num_images)
        negative_prompt_embeds = self._check_embeds(
            negative_prompt_embeds, "negative_prompt_embeds", num_images
        )
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise InvalidInputError(
                f"shape {tuple(negative_prompt_embeds.shape)} differs from prompt_embeds "
                f"{tuple(prompt_embeds.shape)}",
                field="negative_prompt_embeds",
            )
        height = self._check_size(height, "height")
        width = self._check_size(width, "width")
        shape = self._latent_shape(latents, height, width, num_images)
        run_scheduler = self._scheduler_for(scheduler)
        timesteps = self._timesteps(run_scheduler, num_inference_steps)
        edit_list = self._check_energy_and_edits(energy, edits, num_inference_steps, len(timesteps))
        num_tokens = int(self.tokenizer.model_max_length) if prompt_embeds is None else prompt_embeds.shape[1]
        token_weights = self.resolve_token_weights(
            prompt, energy.token_weights if energy is not None else None, num_tokens
        )

        # --- compute --------------------------------------------------------------------------------
        seeds = self._seeds(seed, num_images)
        generators = self._generators(seeds)
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            assert prompt is not None
            prompt_embeds = self.encode_text([prompt]).expand(num_images, -1, -1)
        negative = None
        if do_cfg:
            negative = negative_prompt_embeds
            if negative is None:
                negative = self.encode_text([negative_prompt or ""]).expand(num_images, -1, -1)
        if latents is None:
            latents = self._noise(generators, shape)
        else:
            latents = latents.to(self.device, self.dtype)
        latents = latents * run_scheduler.init_noise_sigma
        state = self._make_state(
            run_steps=num_inference_steps,
            num_calls=len(timesteps),
            energy=energy,
            token_weights=token_weights,
            do_cfg=do_cfg,
            edits=edit_list,
            edit_uncond=negative,
            region_mask=None,
            record_energy=record_energy,
        )
        run = _Run(
            scheduler=run_scheduler,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative,
            guidance_scale=float(guidance_scale),
            generators=generators,
            state=state,
            callback=callback,
        )
        if on_stage is not None:
            on_stage("denoising")
        latents = self._denoise(run, latents)
        if on_stage is not None:
            on_stage("decoding")
        images, latents = self._decode(latents, output_type)
        return EBCAOutput(
            images=self._format(images, output_type),
            latents=latents,
            seeds=seeds,
            energy_trace=list(state.energy_trace) if state is not None else [],
        )

    def _latent_shape(
        self, latents: object, height: int | None, width: int | None, num_images: int
    ) -> tuple[int, int, int]:
        channels, f = self.latent_channels, self.vae_scale_factor
        if latents is None:
            default_h, default_w = self.default_size
            return channels, (height or default_h) // f, (width or default_w) // f
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise InvalidInputError("must be a [num_images, channels, h, w] tensor", field="latents")
        if latents.shape[0] != num_images or latents.shape[1] != channels:
            raise InvalidInputError(
                f"shape must be ({num_images}, {channels}, h, w), got {tuple(latents.shape)}", field="latents"
            )
        h, w = latents.shape[2] * f, latents.shape[3] * f
        if (height is not None and height != h) or (width is not None and width != w):
            raise InvalidInputError(
                f"latents of shape {tuple(latents.shape)} make a {w}x{h} image, not {width}x{height}",
                field="latents",
            )
        if h % 8 or w % 8:
            raise InvalidInputError(f"latents make a {w}x{h} image; sizes must be multiples of 8", "latents")
        if not torch.isfinite(latents).all():
            raise InvalidInputError("contains NaN or infinite values", field="latents")
        return channels, latents.shape[2], latents.shape[3]

    # --- real-image editing -------------------------------------------------------------------------------
    def edit_real(
        self,
        image: ImageInput,
        source_prompt: str | None = None,
        edits: Sequence[EditorialPrompt] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        energy: EnergyConfig | None = None,
        inversion: InversionConfig | None = None,
        num_images: int = 1,
        seed: int | None = None,
        output_type: OutputType = "pil",
        callback: ProgressCallback | None = None,
        on_stage: StageCallback | None = None,
    ) -> EBCAOutput:
        """Edit a real image: DDIM inversion with ``source_prompt``, then DDIM sampling with CACAO.

        Sampling uses prompt = negative prompt = ``source_prompt`` and no BCU on the main prompt
        unless ``energy`` is given (EBCA_SPEC.md, "Tasks"). Always DDIM (eta 0), whatever scheduler
        the pipeline is set to. Inverted latents are cached per (image pixels, model, prompt, steps,
        inversion settings), so editing the same image again skips the inversion.
        """
        self._require_text_to_image("edit_real")
        self._check_common(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images=num_images,
            seed=seed,
            output_type=output_type,
            callback=callback,
            on_stage=on_stage,
        )
        inversion = inversion if inversion is not None else InversionConfig()
        if not isinstance(inversion, InversionConfig):
            raise InvalidInputError("must be an InversionConfig or None", field="inversion")
        inversion.validate()
        picture = load_image(image, "image", self.max_image_pixels)
        check_size_multiple(picture, 8, "image")
        if source_prompt is not None and not isinstance(source_prompt, str):
            raise InvalidInputError(
                f"must be a string, got {type(source_prompt).__name__}", field="source_prompt"
            )
        if source_prompt is None or not source_prompt.strip():
            if self.captioner is None:
                raise InvalidInputError(
                    "is required: no captioning model is configured to describe the image",
                    field="source_prompt",
                )
        scheduler = make_scheduler("ddim", self.scheduler.config)
        timesteps = self._timesteps(scheduler, num_inference_steps)
        edit_list = self._check_energy_and_edits(energy, edits, num_inference_steps, len(timesteps))
        if source_prompt is None or not source_prompt.strip():
            assert self.captioner is not None
            source_prompt = str(self.captioner(picture))
        token_weights = self.resolve_token_weights(
            source_prompt, energy.token_weights if energy is not None else None, 0
        )

        # --- compute --------------------------------------------------------------------------------
        seeds = self._seeds(seed, num_images)
        generators = self._generators(seeds)
        source_embeds = self.encode_text([source_prompt])
        inverted = self._invert(
            picture, source_prompt, source_embeds, scheduler, timesteps, inversion, on_stage
        )
        latents = inverted.expand(num_images, -1, -1, -1).clone()
        embeds = source_embeds.expand(num_images, -1, -1)
        do_cfg = guidance_scale > 1.0
        state = self._make_state(
            run_steps=num_inference_steps,
            num_calls=len(timesteps),
            energy=energy,
            token_weights=token_weights,
            do_cfg=do_cfg,
            edits=edit_list,
            edit_uncond=source_embeds,
            region_mask=None,
            record_energy=False,
        )
        run = _Run(
            scheduler=scheduler,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            prompt_embeds=embeds,
            negative_embeds=embeds if do_cfg else None,
            guidance_scale=float(guidance_scale),
            generators=generators,
            state=state,
            callback=callback,
        )
        if on_stage is not None:
            on_stage("denoising")
        latents = self._denoise(run, latents)
        if on_stage is not None:
            on_stage("decoding")
        images, latents = self._decode(latents, output_type)
        return EBCAOutput(images=self._format(images, output_type), latents=latents, seeds=seeds)

    def _invert(
        self,
        picture: PIL.Image.Image,
        source_prompt: str,
        source_embeds: torch.Tensor,
        scheduler: DDIMScheduler,
        timesteps: torch.Tensor,
        inversion: InversionConfig,
        on_stage: StageCallback | None,
    ) -> torch.Tensor:
        key = (
            image_sha256(picture),
            self.model_id,
            str(self.dtype),
            source_prompt,
            len(timesteps),
            inversion,
        )
        cached = self._inversion_cache.get(key)
        if cached is not None:
            self._inversion_cache.move_to_end(key)
            return cached.clone()
        if on_stage is not None:
            on_stage("inverting")

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # No classifier-free guidance during inversion (as pix2pix-zero and EBCA do).
            return self.unet(latents, t, encoder_hidden_states=source_embeds, return_dict=False)[0]

        clean = self._encode_image(picture)
        inverted = ddim_invert(
            clean,
            timesteps,
            scheduler.alphas_cumprod.to(self.device),
            scheduler.final_alpha_cumprod.to(self.device),
            predict,
            inversion,
            prediction_type=scheduler.config.prediction_type,
        )
        if self.inversion_cache_size > 0:
            self._inversion_cache[key] = inverted.clone()
            while len(self._inversion_cache) > self.inversion_cache_size:
                self._inversion_cache.popitem(last=False)
        return inverted

    def clear_inversion_cache(self) -> None:
        self._inversion_cache.clear()

    # --- inpainting -----------------------------------------------------------------------------------------
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        energy: EnergyConfig | None = None,
        num_images: int = 1,
        seed: int | None = None,
        output_type: OutputType = "pil",
        callback: ProgressCallback | None = None,
        on_stage: StageCallback | None = None,
        *,
        scheduler: str | None = None,
    ) -> EBCAOutput:
        """Text-guided inpainting: repaint where ``mask`` is white (gray level >= 128).

        Inpainting checkpoints (9-channel U-Net) get the mask and the masked-image latents as extra
        U-Net input, as in diffusers' ``StableDiffusionInpaintPipeline``; plain checkpoints use a
        mask-blended latent loop (outside the mask the image latents, re-noised to the current level,
        replace the sample after every step). Either way the mask also restricts the BCU attention
        term (EBCA_SPEC.md, "Tasks"), and the returned pixels outside the mask are exactly the input's.
        """
        self._check_common(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images=num_images,
            seed=seed,
            output_type=output_type,
            callback=callback,
            on_stage=on_stage,
        )
        if not isinstance(prompt, str):
            raise InvalidInputError(f"must be a string, got {type(prompt).__name__}", field="prompt")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InvalidInputError(
                f"must be a string or None, got {type(negative_prompt).__name__}", field="negative_prompt"
            )
        picture = load_image(image, "image", self.max_image_pixels)
        region = load_mask(mask, "mask", self.max_image_pixels)
        if region.shape != (picture.height, picture.width):
            raise InvalidInputError(
                f"mask is {region.shape[1]}x{region.shape[0]}, "
                f"but the image is {picture.width}x{picture.height}",
                field="mask",
            )
        if not region.any():
            raise InvalidInputError("mask is empty: no pixel is >= 128 (white = region to repaint)", "mask")
        if region.all():
            raise InvalidInputError("mask covers the whole image; use generate() instead", field="mask")
        check_size_multiple(picture, 8, "image")
        run_scheduler = self._scheduler_for(scheduler)
        timesteps = self._timesteps(run_scheduler, num_inference_steps)
        self._check_energy_and_edits(energy, None, num_inference_steps, len(timesteps))
        token_weights = self.resolve_token_weights(
            prompt, energy.token_weights if energy is not None else None, 0
        )

        # --- compute --------------------------------------------------------------------------------
        seeds = self._seeds(seed, num_images)
        generators = self._generators(seeds)
        do_cfg = guidance_scale > 1.0
        f = self.vae_scale_factor
        shape = (self.latent_channels, picture.height // f, picture.width // f)
        pixel_mask = torch.from_numpy(region.astype(np.float32))[None, None].to(self.device, self.dtype)
        # The mask at latent resolution, nearest-neighbour like StableDiffusionInpaintPipeline.
        latent_mask = F.interpolate(pixel_mask, size=shape[1:], mode="nearest").expand(num_images, -1, -1, -1)
        prompt_embeds = self.encode_text([prompt]).expand(num_images, -1, -1)
        negative = self.encode_text([negative_prompt or ""]).expand(num_images, -1, -1) if do_cfg else None
        noise = self._noise(generators, shape)
        latents = noise * run_scheduler.init_noise_sigma
        run = _Run(
            scheduler=run_scheduler,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative,
            guidance_scale=float(guidance_scale),
            generators=generators,
            state=None,
            callback=callback,
        )
        if self.is_inpainting:
            # Masked image: the pixels to keep, the region to repaint set to 0 (mid-gray in [-1, 1]).
            masked = pil_to_tensor(picture).to(self.device, self.dtype) * (1 - pixel_mask)
            with torch.no_grad():
                masked_latents = self.vae.encode(masked).latent_dist.mode() * self.vae.config.scaling_factor
            run.extra_unet_channels = torch.cat(
                [latent_mask, masked_latents.expand(num_images, -1, -1, -1)], 1
            )
        else:
            run.blend_mask = latent_mask
            run.blend_latents = self._encode_image(picture).expand(num_images, -1, -1, -1)
            run.blend_noise = noise
        run.state = self._make_state(
            run_steps=num_inference_steps,
            num_calls=len(timesteps),
            energy=energy,
            token_weights=token_weights,
            do_cfg=do_cfg,
            edits=[],
            edit_uncond=None,
            # The mask only matters to the BCU: without energy the plain kernels run.
            region_mask=latent_mask if energy is not None else None,
            record_energy=False,
        )
        if on_stage is not None:
            on_stage("denoising")
        latents = self._denoise(run, latents)
        if on_stage is not None:
            on_stage("decoding")
        images, latents = self._decode(latents, output_type)
        if images is not None:
            # Paste: outside the mask the input pixels come back exactly (the VAE would shift them).
            original = np.asarray(picture, dtype=np.float32)[None] / 255.0
            images = np.where(region[None, :, :, None], images, original).astype(np.float32)
        return EBCAOutput(images=self._format(images, output_type), latents=latents, seeds=seeds)
