"""Loading Stable Diffusion checkpoints (diffusers layout) and building schedulers by name."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:
    from ebca_core.pipeline import EBCAPipeline

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}

_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` built from a model's scheduler ``config``.

    A fresh object per generation keeps multistep schedulers (PNDM, DPM-Solver, LMS) from carrying
    their history from one call into the next.
    """
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise InvalidInputError(
            f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}", field="scheduler"
        )
    cls = SCHEDULERS[name]
    overrides: dict[str, Any] = {}
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        # Latent diffusion must not clip x0 to [-1, 1]; diffusers' Stable Diffusion pipelines force
        # this on load (their deprecation fix-up), and gamma = 0 must match them exactly.
        overrides["clip_sample"] = False
    return cls.from_config(config, **overrides)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The name under which :data:`SCHEDULERS` knows ``scheduler``'s class ("pndm" as a fallback)."""
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return "pndm"


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with separators or a leading dot/tilde is a
    # filesystem path the caller expected to exist.
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


def load_pipeline(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str | None = None,
    local_files_only: bool = False,
) -> EBCAPipeline:
    """Load a Stable Diffusion 1.x / 2.x (or inpainting) checkpoint into an :class:`EBCAPipeline`.

    ``model`` is a diffusers-format directory or a hub id. Hub ids are only usable where the network
    (or the local hub cache) allows; otherwise :class:`ModelNotFoundError` says what to do.
    ``local_files_only`` forbids network access for hub ids. Inpainting checkpoints (9-channel U-Net)
    are detected from the U-Net config. ``scheduler`` names one of :data:`SCHEDULERS` (default: the
    checkpoint's own scheduler).
    """
    from ebca_core.pipeline import EBCAPipeline

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InvalidInputError(
            f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}", field="scheduler"
        )
    if not isinstance(model, str | Path) or not str(model).strip():
        raise InvalidInputError("must be a model directory or a hub id", field="model")
    model_str = str(model)
    path = Path(model_str).expanduser()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {model_str!r} is a file; expected a diffusers-format directory")
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"model directory {model_str!r} has no model_index.json; expected a diffusers-format "
                "Stable Diffusion checkpoint (convert single-file checkpoints with diffusers first)"
            )
        try:
            listed = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"model directory {model_str!r}: unreadable model_index.json ({exc})"
            ) from exc
        missing = [name for name in _REQUIRED_COMPONENTS if name not in listed]
        if missing:
            raise ModelLoadError(
                f"model directory {model_str!r} is not a Stable Diffusion layout: model_index.json lacks "
                f"{', '.join(missing)}"
            )
        try:
            loaded = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        except Exception as exc:  # diffusers raises many types for a broken directory
            raise ModelLoadError(f"model directory {model_str!r} could not be loaded: {exc}") from exc
    elif _looks_like_path(model_str):
        raise ModelNotFoundError(
            f"model directory {model_str!r} does not exist; pass an existing diffusers-format directory "
            "or a hub id"
        )
    else:
        try:
            loaded = DiffusionPipeline.from_pretrained(model_str, local_files_only=local_files_only, **kwargs)
        except Exception as exc:  # offline, unknown repo, gated repo, interrupted download...
            raise ModelNotFoundError(
                f"model {model_str!r} is neither a local directory nor loadable from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}). On a machine without network, download it first (e.g. "
                f"`huggingface-cli download {model_str}`) into the hub cache or save it with "
                "`save_pretrained` and pass the directory"
            ) from exc

    components = getattr(loaded, "components", {})
    missing = [name for name in _REQUIRED_COMPONENTS if components.get(name) is None]
    if missing:
        raise ModelLoadError(
            f"model {model_str!r} is not a Stable Diffusion layout (no {', '.join(missing)})"
        )
    pipe = EBCAPipeline(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        scheduler=components["scheduler"],
        model_id=model_str,
        device=device,
        dtype=dtype,
    )
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    return pipe
