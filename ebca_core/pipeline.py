"""The EBCA pipeline: generation, composition/synthetic editing, real-image editing and inpainting.

One :class:`EBCAPipeline` holds the components of a Stable Diffusion checkpoint (U-Net, VAE, CLIP text
encoder and tokenizer, scheduler config) and runs the denoising loop itself, the way diffusers'
``StableDiffusionPipeline.__call__`` does, with the EBCA processors of :mod:`ebca_core.processor`
installed for the duration of one call. The three tasks share one skeleton (docs/EBCA.md, "Pipeline
anatomy"): :meth:`~EBCAPipeline.check_inputs` validates every argument before any compute and raises
:class:`InvalidInputError` naming the offending field; then seeds, conditioning, latents, EBCA state,
denoising, decoding and output run in that order, with the task-specific parts in
:mod:`ebca_core.tasks`.

Reproducibility: image ``i`` of a call uses its own CPU generator seeded ``seed + i`` for its initial
noise (and for the noise of stochastic schedulers), so a batch of N equals N single runs.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_common.params import LIBRARY_LIMITS, Limits, token_index
from ebca_core.config import EditorialPrompt, EnergyConfig, InversionConfig
from ebca_core.denoising import DenoiseRun, ProgressCallback, denoise
from ebca_core.errors import InvalidInputError
from ebca_core.images import ImageInput, numpy_to_pil, tensor_to_numpy
from ebca_core.inputs import CallInputs, CheckInputsMixin, OutputType, StageCallback
from ebca_core.processor import EBCAState, RowEnergy
from ebca_core.schedulers import make_scheduler, scheduler_name
from ebca_core.tasks import TaskStepsMixin

__all__ = ["BatchPart", "EBCAOutput", "EBCAPipeline", "OutputType", "ProgressCallback", "StageCallback"]


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


@dataclass(frozen=True)
class BatchPart:
    """One request's share of :meth:`EBCAPipeline.generate_batch`: what may differ between the requests
    of one batch (the sampler settings and the image size are the batch's)."""

    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = None
    energy: EnergyConfig | None = None


class _Limit:
    """A pipeline attribute that reads and writes one field of the pipeline's ``limits``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        return self if pipe is None else getattr(pipe.limits, self.name)

    def __set__(self, pipe: Any, value: int) -> None:
        pipe.limits = dataclasses.replace(pipe.limits, **{self.name: value})


class EBCAPipeline(CheckInputsMixin, TaskStepsMixin):
    """Stable Diffusion with energy-based cross-attention. Build one with :func:`load_pipeline`.

    Attributes a host may tune: ``limits`` (upper bounds on every argument, an
    :class:`ebca_common.params.Limits`; the REST service sets its own), among them ``max_edits``
    (most editorial prompts per call) and ``max_image_pixels`` (largest input image or mask);
    ``captioner`` (``image -> caption`` used by :meth:`edit_real` when no source prompt is given;
    ``None`` = a source prompt is required); ``inversion_cache_size`` (inverted latents kept for
    :meth:`edit_real`).
    """

    #: Most editorial prompts per call, and the largest input image or mask (fields of ``limits``).
    max_edits = _Limit()
    max_image_pixels = _Limit()

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
        #: Upper bounds on a call's arguments (the library's own: unbounded but for edits and pixels).
        self.limits: Limits = LIBRARY_LIMITS
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
            index = token_index(key)  # the one digit-key rule (ebca_common.params)
            if index is not None:
                key = index
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

    # --- the three tasks -------------------------------------------------------------------------------
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
        editing, docs/EBCA.md "Tasks"). ``latents`` (``[num_images, C, h, w]``, unscaled noise as in
        diffusers) replaces the seeded initial noise. ``scheduler`` overrides the pipeline's scheduler
        for this call only. ``callback(step, total, latents)`` runs after every denoising step (steps
        1..total) and may raise to abort; ``on_stage`` receives "denoising" then "decoding".
        """
        inputs = self.check_inputs("generate", **_arguments(locals()))
        return self._run(inputs)

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
        unless ``energy`` is given (docs/EBCA.md, "Tasks"). Always DDIM (eta 0), whatever scheduler
        the pipeline is set to. Inverted latents are cached per (image pixels, model, prompt, steps,
        inversion settings), so editing the same image again skips the inversion.
        """
        inputs = self.check_inputs("edit_real", **_arguments(locals()))
        return self._run(inputs)

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
        term (docs/EBCA.md, "Masked BCU"), and the returned pixels outside the mask are exactly the
        input's.
        """
        inputs = self.check_inputs("inpaint", **_arguments(locals()))
        return self._run(inputs)

    def generate_batch(
        self,
        parts: Sequence[BatchPart],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        output_type: OutputType = "pil",
        callback: ProgressCallback | None = None,
        on_stage: StageCallback | None = None,
        *,
        scheduler: str | None = None,
    ) -> list[EBCAOutput]:
        """Several generate requests as one batch: one output per part, in order.

        Each part has its own prompt, negative prompt, seeds (image i of a part uses its seed + i) and
        energy settings (gammas, schedules, token weights, kept per row by the processor state); the
        steps, guidance, size and scheduler are shared. Image i of a part equals that part run alone
        through :meth:`generate` to float32 round-off (batched kernels block their sums differently).
        Every part is checked by :meth:`check_inputs` first; an :class:`InvalidInputError` of part k
        names the field as ``parts[k].<field>``. No CACAO edits: their shared unconditional context
        would couple the rows of different requests.
        """
        if not parts:
            raise InvalidInputError("give at least one part", field="parts")
        checked = []
        for index, part in enumerate(parts):
            try:
                checked.append(
                    self.check_inputs(
                        "generate",
                        prompt=part.prompt,
                        negative_prompt=part.negative_prompt,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        height=height,
                        width=width,
                        num_images=part.num_images,
                        seed=part.seed,
                        energy=part.energy,
                        output_type=output_type,
                        callback=callback,
                        on_stage=on_stage,
                        scheduler=scheduler,
                    )
                )
            except InvalidInputError as exc:
                where = f"parts[{index}]" + (f".{exc.field}" if exc.field else "")
                raise InvalidInputError(exc.message, field=where) from exc
        if len(checked) == 1:
            return [self._run(checked[0])]
        return self._run_batch(checked)

    def _run_batch(self, parts: list[CallInputs]) -> list[EBCAOutput]:
        """The skeleton of :meth:`_run` for the checked parts of one batch (generate only)."""
        first = parts[0]
        part_seeds = [_seeds(p.seed, p.num_images) for p in parts]
        generators = _generators([seed for seeds in part_seeds for seed in seeds])
        prompt_embeds, negative_embeds = self._batch_conditioning(parts)
        run = _denoise_run(first, prompt_embeds, negative_embeds, generators)
        latents = self._noise(generators, first.latent_shape) * first.scheduler.init_noise_sigma
        if any(p.energy is not None for p in parts):
            run.state = EBCAState(
                num_inference_steps=first.num_inference_steps,
                num_unet_calls=len(first.timesteps),
                do_cfg=first.do_cfg,
                row_energies=[RowEnergy(p.num_images, p.energy, p.token_weights) for p in parts],
                _checked=True,
            )
        first.stage("denoising")
        latents = denoise(self.unet, run, latents)
        first.stage("decoding")
        images = self._decode(latents, first.output_type)
        outputs, start = [], 0
        for part, seeds in zip(parts, part_seeds, strict=True):
            rows = slice(start, start + part.num_images)
            start += part.num_images
            mine = images[rows] if images is not None else None
            outputs.append(EBCAOutput(_format(mine, first.output_type), latents[rows], seeds))
        return outputs

    def _batch_conditioning(self, parts: list[CallInputs]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt and negative embeddings of every row of a batch: each distinct text encoded once."""
        texts = sorted({p.prompt or "" for p in parts} | {p.negative_prompt or "" for p in parts})
        encoded = dict(zip(texts, self.encode_text(texts), strict=True))

        def rows(text_of: Callable[[CallInputs], str | None]) -> torch.Tensor:
            return torch.cat([encoded[text_of(p) or ""].expand(p.num_images, -1, -1) for p in parts])

        prompt = rows(lambda p: p.prompt)
        return prompt, rows(lambda p: p.negative_prompt) if parts[0].do_cfg else None

    # --- the skeleton shared by the tasks ----------------------------------------------------------
    def _run(self, inputs: CallInputs) -> EBCAOutput:
        """Steps 2-8 of every task (docs/EBCA.md, "Pipeline anatomy"); step 1 is check_inputs."""
        # 2. Seeds: image i draws its noise from its own CPU generator seeded seed + i.
        seeds = _seeds(inputs.seed, inputs.num_images)
        generators = _generators(seeds)
        # 3. Conditioning: the text embeddings of every row.
        prompt_embeds, negative_embeds = self._conditioning(inputs)
        run = _denoise_run(inputs, prompt_embeds, negative_embeds, generators)
        # 4. Latents: seeded noise, given latents or the inverted image, and the task's U-Net input.
        latents, region_mask = self._prepare_latents(inputs, run)
        # 5. EBCA state: energy, token weights and editorial prompts of this call (None = plain run).
        run.state = self._make_state(inputs, negative_embeds, region_mask)
        # 6. Denoising.
        inputs.stage("denoising")
        latents = denoise(self.unet, run, latents)
        # 7. Decoding.
        inputs.stage("decoding")
        images = self._decode(latents, inputs.output_type)
        # 8. Output.
        images = self._finish(inputs, images)
        return EBCAOutput(
            images=_format(images, inputs.output_type),
            latents=latents,
            seeds=seeds,
            energy_trace=list(run.state.energy_trace) if run.state is not None else [],
        )

    def _conditioning(self, inputs: CallInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt and (with guidance) negative embeddings, ``[num_images, N, D]`` each."""
        n = inputs.num_images
        prompt = inputs.prompt_embeds
        if prompt is None:
            assert inputs.prompt is not None
            prompt = self.encode_text([inputs.prompt]).expand(n, -1, -1)
        if not inputs.do_cfg:
            return prompt, None
        if inputs.negative_prompt_embeds is not None:
            return prompt, inputs.negative_prompt_embeds
        if inputs.prompt_embeds is None and inputs.negative_prompt == inputs.prompt:
            return prompt, prompt  # the same text has the same embeddings (real-image editing)
        return prompt, self.encode_text([inputs.negative_prompt or ""]).expand(n, -1, -1)

    def _make_state(
        self, inputs: CallInputs, negative_embeds: torch.Tensor | None, region_mask: torch.Tensor | None
    ) -> EBCAState | None:
        """The per-call processor state, or None when the plain diffusers path runs (no processors)."""
        energy, edits = inputs.energy, inputs.edits
        if energy is None and not edits and region_mask is None and not inputs.record_energy:
            return None
        edit_embeds = self.encode_text([e.prompt for e in edits]) if edits else None
        return EBCAState(
            num_inference_steps=inputs.num_inference_steps,
            num_unet_calls=len(inputs.timesteps),
            energy=energy,
            token_weights=inputs.token_weights,
            do_cfg=inputs.do_cfg,
            edits=edits,
            edit_embeds=edit_embeds,
            # The shared unconditional editorial context starts from the negative prompt's embedding.
            edit_uncond_embeds=negative_embeds,
            region_mask=region_mask,
            record_energy=inputs.record_energy,
            _checked=True,
        )

    def _decode(self, latents: torch.Tensor, output_type: str) -> np.ndarray | None:
        if output_type == "latent":
            return None
        with torch.no_grad():
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return tensor_to_numpy(decoded)


def _arguments(values: dict[str, Any]) -> dict[str, Any]:
    """A task method's arguments (its ``locals()`` on entry, before any other name) for check_inputs."""
    return {name: value for name, value in values.items() if name != "self"}


def _seeds(seed: int | None, num_images: int) -> list[int]:
    base = secrets.randbelow(2**32) if seed is None else seed
    return [base + i for i in range(num_images)]


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on every device.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _format(images: np.ndarray | None, output_type: str) -> list[PIL.Image.Image] | np.ndarray | None:
    if images is None:
        return None
    return numpy_to_pil(images) if output_type == "pil" else images


def _denoise_run(
    inputs: CallInputs,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    generators: list[torch.Generator],
) -> DenoiseRun:
    """The denoising loop's inputs for a call (or a batch: ``inputs`` is its first part, whose sampling
    settings every part shares); the EBCA state is added by the caller."""
    return DenoiseRun(
        scheduler=inputs.scheduler,
        timesteps=inputs.timesteps,
        num_inference_steps=inputs.num_inference_steps,
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        guidance_scale=inputs.guidance_scale,
        generators=generators,
        state=None,
        callback=inputs.callback,
    )
