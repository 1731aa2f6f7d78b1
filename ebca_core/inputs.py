"""``check_inputs``: every argument of a task call checked and converted before any compute.

:class:`CheckInputsMixin` gives :class:`~ebca_core.pipeline.EBCAPipeline` its one ``check_inputs``, the
only place where the arguments of :meth:`generate`, :meth:`edit_real` and :meth:`inpaint` are
validated. It raises :class:`InvalidInputError` naming the field, and returns a :class:`CallInputs`
that the shared skeleton runs without checking anything again (docs/EBCA.md, "Pipeline anatomy").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_common import intake, params
from ebca_common.params import Limits
from ebca_core.config import EditorialPrompt, EnergyConfig, InversionConfig, check_energy_and_edits
from ebca_core.errors import InvalidInputError, contract
from ebca_core.images import load_image, load_mask_image, mask_region
from ebca_core.schedulers import check_scheduler_name, make_scheduler, scheduler_name

Task = Literal["generate", "edit_real", "inpaint"]
OutputType = Literal["pil", "np", "latent"]
ProgressCallback = Callable[[int, int, torch.Tensor], None]
StageCallback = Callable[[str], None]

TASKS: tuple[str, ...] = ("generate", "edit_real", "inpaint")


@dataclass
class CallInputs:
    """The arguments of one task call after :meth:`CheckInputsMixin.check_inputs`: valid and converted."""

    task: Task
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    seed: int | None
    output_type: OutputType
    callback: ProgressCallback | None
    on_stage: StageCallback | None
    scheduler: SchedulerMixin  # a fresh one for this call
    timesteps: torch.Tensor
    energy: EnergyConfig | None
    edits: list[EditorialPrompt]
    token_weights: dict[int, float]  # resolved to token indices of the prompt
    #: The text the run is conditioned on (edit_real: the source prompt, also its negative prompt).
    prompt: str | None = None
    negative_prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None  # [num_images, N, D]
    negative_prompt_embeds: torch.Tensor | None = None
    latent_shape: tuple[int, int, int] = (0, 0, 0)  # (C, h, w)
    latents: torch.Tensor | None = None  # generate: given initial noise
    picture: PIL.Image.Image | None = None  # edit_real, inpaint: the input image (RGB)
    region: np.ndarray | None = None  # inpaint: [H, W] bool, True = repaint
    inversion: InversionConfig | None = None
    record_energy: bool = False

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)


def _check_text(value: object, name: str, limits: Limits) -> str | None:
    """An optional text (a negative prompt): None, or a string within the length limit."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"must be a string or None, got {type(value).__name__}", field=name)
    params.check_prompt_length(value, name, limits)
    return value


class CheckInputsMixin:
    """``check_inputs`` for :class:`~ebca_core.pipeline.EBCAPipeline` (which provides these attributes)."""

    scheduler: SchedulerMixin
    unet: Any
    tokenizer: Any
    model_id: str
    device: torch.device
    dtype: torch.dtype
    limits: Limits
    captioner: Callable[[PIL.Image.Image], str] | None
    is_inpainting: bool
    latent_channels: int
    vae_scale_factor: int
    default_size: tuple[int, int]
    resolve_token_weights: Callable[..., dict[int, float]]

    def check_inputs(
        self,
        task: Task,
        *,
        prompt: object = None,
        negative_prompt: object = None,
        num_inference_steps: object = 50,
        guidance_scale: object = 7.5,
        height: object = None,
        width: object = None,
        num_images: object = 1,
        seed: object = None,
        latents: object = None,
        energy: object = None,
        edits: object = None,
        output_type: object = "pil",
        callback: object = None,
        on_stage: object = None,
        prompt_embeds: object = None,
        negative_prompt_embeds: object = None,
        scheduler: object = None,
        record_energy: bool = False,
        image: object = None,
        mask: object = None,
        source_prompt: object = None,
        inversion: object = None,
    ) -> CallInputs:
        """Validate and convert the arguments of one ``task`` call; raise :class:`InvalidInputError`.

        The rules are those of the parameter contract (:mod:`ebca_common.params`, the same the REST
        api applies) within this pipeline's :attr:`limits`. Nothing is computed with the model here:
        the only work is decoding input images and tokenizing the prompt for word token weights. The
        ``captioner``, if it has to describe the image, runs last, once everything else is valid.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        with contract():
            if task != "inpaint":
                self._require_text_to_image(task)
            inputs = self._check_common(
                task, num_inference_steps, guidance_scale, num_images, seed, output_type, callback, on_stage
            )
            inputs.record_energy = bool(record_energy) and task == "generate"
            if task == "generate":
                self._check_generate_text(
                    inputs, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
                )
                inputs.latent_shape = self._latent_shape(latents, height, width, inputs.num_images)
                inputs.latents = latents  # type: ignore[assignment]
            elif task == "edit_real":
                self._check_real_edit(inputs, image, source_prompt, inversion)
            else:
                self._check_inpaint(inputs, prompt, negative_prompt, image, mask)
            # Real-image editing always samples with DDIM (docs/EBCA.md, "Tasks").
            inputs.scheduler = self._scheduler_for("ddim" if task == "edit_real" else scheduler)
            inputs.scheduler.set_timesteps(inputs.num_inference_steps, device=self.device)
            inputs.timesteps = inputs.scheduler.timesteps
            inputs.energy, inputs.edits = self._check_energy_and_edits(
                energy, edits, inputs.num_inference_steps, len(inputs.timesteps)
            )
            if task == "edit_real" and inputs.prompt is None:
                assert self.captioner is not None and inputs.picture is not None
                inputs.prompt = inputs.negative_prompt = str(self.captioner(inputs.picture))
            embeds = inputs.prompt_embeds
            num_tokens = int(self.tokenizer.model_max_length) if embeds is None else embeds.shape[1]
            weights = inputs.energy.token_weights if inputs.energy is not None else None
            inputs.token_weights = self.resolve_token_weights(inputs.prompt, weights, num_tokens)
        return inputs

    # --- the parts of check_inputs ------------------------------------------------------------------
    def _check_common(
        self,
        task: Task,
        num_inference_steps: object,
        guidance_scale: object,
        num_images: object,
        seed: object,
        output_type: object,
        callback: object,
        on_stage: object,
    ) -> CallInputs:
        """The arguments every task takes, as a :class:`CallInputs` the task checks then complete."""
        limits = self.limits
        max_steps = int(self.scheduler.config.num_train_timesteps)
        if limits.max_steps is not None:
            max_steps = min(max_steps, limits.max_steps)
        steps = params.check_number(
            num_inference_steps, "num_inference_steps", minimum=1, maximum=max_steps, integer=True
        )
        guidance = params.check_number(guidance_scale, "guidance_scale", maximum=limits.max_guidance_scale)
        images = params.check_number(
            num_images, "num_images", minimum=1, maximum=limits.max_images, integer=True
        )
        params.check_seed(seed, int(images), limits)
        if output_type not in ("pil", "np", "latent"):
            raise InvalidInputError(
                f"must be 'pil', 'np' or 'latent', got {output_type!r}", field="output_type"
            )
        if callback is not None and not callable(callback):
            raise InvalidInputError("must be callable(step, total, latents) or None", field="callback")
        if on_stage is not None and not callable(on_stage):
            raise InvalidInputError("must be callable(stage) or None", field="on_stage")
        return CallInputs(
            task=task,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            num_images=int(images),
            seed=seed,  # type: ignore[arg-type]
            output_type=output_type,  # type: ignore[arg-type]
            callback=callback,  # type: ignore[arg-type]
            on_stage=on_stage,  # type: ignore[arg-type]
            scheduler=self.scheduler,
            timesteps=torch.empty(0),
            energy=None,
            edits=[],
            token_weights={},
        )

    def _require_text_to_image(self, task: str) -> None:
        if self.is_inpainting:
            raise InvalidInputError(
                f"{self.model_id!r} is an inpainting checkpoint (9-channel U-Net); it only supports "
                f"inpaint(), not {task}()",
                field="model",
            )

    def _scheduler_for(self, name: object) -> SchedulerMixin:
        if name is None:
            return make_scheduler(scheduler_name(self.scheduler), self.scheduler.config)
        return make_scheduler(check_scheduler_name(name), self.scheduler.config)

    def _check_generate_text(
        self,
        inputs: CallInputs,
        prompt: object,
        negative_prompt: object,
        prompt_embeds: object,
        negative_prompt_embeds: object,
    ) -> None:
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidInputError("give exactly one of prompt and prompt_embeds", field="prompt")
        if prompt is not None:
            inputs.prompt = params.check_prompt(prompt, "prompt", self.limits)
        inputs.negative_prompt = _check_text(negative_prompt, "negative_prompt", self.limits)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InvalidInputError(
                "give at most one of negative_prompt and negative_prompt_embeds", field="negative_prompt"
            )
        embeds = self._check_embeds(prompt_embeds, "prompt_embeds", inputs.num_images)
        negative = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds", inputs.num_images)
        if embeds is not None and negative is not None and embeds.shape != negative.shape:
            raise InvalidInputError(
                f"shape {tuple(negative.shape)} differs from prompt_embeds {tuple(embeds.shape)}",
                field="negative_prompt_embeds",
            )
        inputs.prompt_embeds, inputs.negative_prompt_embeds = embeds, negative

    def _check_real_edit(
        self, inputs: CallInputs, image: object, source_prompt: object, inversion: object
    ) -> None:
        inversion = inversion if inversion is not None else InversionConfig()
        if not isinstance(inversion, InversionConfig):
            raise InvalidInputError("must be an InversionConfig or None", field="inversion")
        inversion.validate()
        inputs.inversion = inversion
        inputs.picture = load_image(image, "image", self.limits.max_image_pixels)  # type: ignore[arg-type]
        intake.check_size_multiple(inputs.picture, 8, "image")
        if source_prompt is not None and not isinstance(source_prompt, str):
            raise InvalidInputError(
                f"must be a string, got {type(source_prompt).__name__}", field="source_prompt"
            )
        source = source_prompt
        if source is None or not source.strip():
            if self.captioner is None:
                raise InvalidInputError(
                    "is required: no captioning model is configured to describe the image",
                    field="source_prompt",
                )
            source = None  # check_inputs captions the image once everything else is valid
        else:
            params.check_prompt(source, "source_prompt", self.limits)
        # Sampling runs with prompt = negative prompt = the source prompt (docs/EBCA.md, "Tasks").
        inputs.prompt = inputs.negative_prompt = source

    def _check_inpaint(
        self, inputs: CallInputs, prompt: object, negative_prompt: object, image: object, mask: object
    ) -> None:
        inputs.prompt = params.check_prompt(prompt, "prompt", self.limits)
        inputs.negative_prompt = _check_text(negative_prompt, "negative_prompt", self.limits)
        picture = load_image(image, "image", self.limits.max_image_pixels)  # type: ignore[arg-type]
        mask_image = load_mask_image(mask, "mask", self.limits.max_image_pixels)  # type: ignore[arg-type]
        intake.check_mask(picture, mask_image)
        intake.check_size_multiple(picture, 8, "image")
        f = self.vae_scale_factor
        inputs.picture, inputs.region = picture, mask_region(mask_image)
        inputs.latent_shape = (self.latent_channels, picture.height // f, picture.width // f)

    def _check_size(self, value: object, name: str) -> int | None:
        if value is None:
            return None
        params.check_number(value, name, minimum=8, maximum=self.limits.max_size, integer=True)
        if value % 8:  # type: ignore[operator]
            raise InvalidInputError(f"must be a multiple of 8, got {value}", field=name)
        return int(value)  # type: ignore[call-overload]

    def _latent_shape(
        self, latents: object, height: object, width: object, num_images: int
    ) -> tuple[int, int, int]:
        height, width = self._check_size(height, "height"), self._check_size(width, "width")
        params.check_image_area(width, height, self.limits)
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

    def _check_energy_and_edits(
        self, energy: object, edits: object, num_inference_steps: int, num_calls: int
    ) -> tuple[EnergyConfig | None, list[EditorialPrompt]]:
        if energy is not None and not isinstance(energy, EnergyConfig):
            raise InvalidInputError(f"must be an EnergyConfig or None, got {type(energy).__name__}", "energy")
        edit_list: list[EditorialPrompt] = []
        if edits is not None:
            if isinstance(edits, EditorialPrompt | str) or not isinstance(edits, Sequence):
                raise InvalidInputError("must be a list of EditorialPrompt", field="edits")
            if len(edits) > self.limits.max_edits:
                raise InvalidInputError(
                    f"at most {self.limits.max_edits} editorial prompts are allowed, got {len(edits)}",
                    field="edits",
                )
            for index, edit in enumerate(edits):
                if not isinstance(edit, EditorialPrompt):
                    raise InvalidInputError(
                        f"must be an EditorialPrompt, got {type(edit).__name__}", field=f"edits[{index}]"
                    )
            edit_list = list(edits)
        check_energy_and_edits(energy, edit_list, num_inference_steps, num_calls, self.limits)
        return energy, edit_list
