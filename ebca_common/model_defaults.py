"""A model's own defaults: what fills the request fields a client leaves null.

A model directory may hold ``ebca_defaults.json`` (the built-in model ships one: 20 DDIM steps at
guidance 5, what it was trained and measured with). A model without the file, or a hub id, gets the
built-in defaults, which suit Stable Diffusion 1.x / 2.x. The worker resolves them when it starts a
job (it has the model; the api may not: in the compose stack the api container has no model files),
so the job record's ``request`` and every image's ``settings`` show the values actually used. Workers
publish the defaults of the models they serve to the job store, where ``GET /models`` reads them.

The ``edit`` block holds the CACAO settings an editorial prompt takes when it leaves ``alpha``,
``alpha_tau`` or ``gamma_attn`` null, per editing mode (real-image or synthetic) and direction. A model
without one gets the paper's values for Stable Diffusion (docs/EBCA.md, "Tasks"); the built-in model's
were chosen by ``benchmarks/bench_editing.py`` (docs/SHAPES.md, "Editing benchmark").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ebca_common.params import REST_LIMITS, Scheduler
from ebca_common.settings import Settings, looks_like_path

log = logging.getLogger("ebca.models")

DEFAULTS_FILE = "ebca_defaults.json"


EditMode = Literal["real", "synthetic"]
_STEP = REST_LIMITS.max_step_size


class EditSetting(BaseModel):
    """What an editorial prompt of one mode and direction uses for the fields it leaves null."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(..., ge=0.0, le=_STEP, allow_inf_nan=False, description="Weight of the prompt.")
    # < 1: every prompt is then on at the last step, which the api's normaliser check relies on.
    alpha_tau: float = Field(..., ge=0.0, lt=1.0, description="alpha switches on at int(steps * alpha_tau).")
    gamma_attn: float = Field(
        0.0, ge=0.0, le=_STEP, allow_inf_nan=False, description="The prompt's own BCU attention step size."
    )


class EditDirections(BaseModel):
    """The settings of an "and" and of a "not" editorial prompt (JSON keys ``and``, ``not``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    and_: EditSetting = Field(..., alias="and")
    not_: EditSetting = Field(..., alias="not")

    @model_validator(mode="after")
    def _lone_negation_runs(self) -> EditDirections:
        # A single "not" prompt with default settings must pass the CACAO normaliser 1 - alpha > 0.
        if self.not_.alpha >= 1.0:
            raise ValueError(
                f"not.alpha must be < 1 (a lone negation needs 1 - alpha > 0), got {self.not_.alpha}"
            )
        return self

    def of(self, direction: str) -> EditSetting:
        return self.not_ if direction == "not" else self.and_


class EditDefaults(BaseModel):
    """Editing defaults per mode: real-image editing (inversion + CACAO) and synthetic editing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    synthetic: EditDirections
    real: EditDirections


#: The paper's recommendations for Stable Diffusion (docs/EBCA.md, "Tasks"). The paper gives no
#: synthetic negation weight, and its synthetic 1.3 would make a lone "not" divide by 1 - 1.3 < 0;
#: the real-image negation weight stands in for it.
PAPER_EDIT_DEFAULTS = EditDefaults(
    real=EditDirections(
        and_=EditSetting(alpha=0.75, alpha_tau=0.3, gamma_attn=5e-4),
        not_=EditSetting(alpha=0.65, alpha_tau=0.3, gamma_attn=5e-4),
    ),
    synthetic=EditDirections(
        and_=EditSetting(alpha=1.3, alpha_tau=0.2, gamma_attn=0.0),
        not_=EditSetting(alpha=0.65, alpha_tau=0.2, gamma_attn=0.0),
    ),
)


class ModelDefaults(BaseModel):
    """Sampler defaults of one model. The file's keys are ebca_core's argument names
    (``num_inference_steps``); the request's (``steps``) are accepted too."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    steps: int = Field(
        30,
        ge=1,
        le=REST_LIMITS.max_steps,
        validation_alias=AliasChoices("num_inference_steps", "steps"),
        description="Denoising steps.",
    )
    guidance_scale: float = Field(
        7.5, ge=0.0, le=REST_LIMITS.max_guidance_scale, description="Classifier-free guidance scale."
    )
    scheduler: Scheduler = Field("ddim", description="Noise scheduler.")
    width: int | None = Field(
        None, ge=8, le=REST_LIMITS.max_size, multiple_of=8, description="null = the native size."
    )
    height: int | None = Field(
        None, ge=8, le=REST_LIMITS.max_size, multiple_of=8, description="null = the native size."
    )
    edit: EditDefaults = Field(
        PAPER_EDIT_DEFAULTS, description="CACAO settings for editorial prompts that leave them null."
    )


#: What a model without ``ebca_defaults.json`` uses (Stable Diffusion's customary settings).
BUILTIN_DEFAULTS = ModelDefaults()


def read_model_defaults(directory: str | None) -> ModelDefaults:
    """The defaults of the model in ``directory`` (None for a hub id: the built-in defaults).

    A missing file means the built-in defaults. A file that is unreadable or invalid also falls back
    to them, with a warning naming the file and the problem: a typo in it must not take the model
    out of service, but the operator has to hear about it.
    """
    if directory is None:
        return BUILTIN_DEFAULTS
    path = Path(directory) / DEFAULTS_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return BUILTIN_DEFAULTS
    except OSError as exc:
        log.warning("%s: unreadable (%s); using the built-in defaults", path, exc)
        return BUILTIN_DEFAULTS
    try:
        return ModelDefaults.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        log.warning("%s: invalid (%s); using the built-in defaults", path, exc)
        return BUILTIN_DEFAULTS


def defaults_of(location: str) -> ModelDefaults:
    """The defaults of a model as ``Settings.model_table`` locates it (a directory or a hub id)."""
    return read_model_defaults(location if looks_like_path(location) else None)


def configured_defaults(settings: Settings) -> dict[str, ModelDefaults]:
    """The defaults of every model in the settings' model table, read from their directories."""
    return {model_id: defaults_of(location) for model_id, location in settings.model_table().items()}


_Request = TypeVar("_Request", bound=BaseModel)


def fill_defaults(
    request: _Request,
    defaults: ModelDefaults,
    native_size: tuple[int, int],
    edit_mode: EditMode | None = None,
) -> _Request:
    """``request`` with its null sampler fields taken from ``defaults``; a null width/height of a
    text-to-image request becomes the model's default size, else its native ``(height, width)``.
    With ``edit_mode``, the null ``alpha``, ``alpha_tau`` and ``gamma_attn`` of every editorial prompt
    take the model's edit defaults for that mode and the prompt's direction.

    Only fields the request type has are filled (an inpaint or real-image edit takes its size from
    the input image; a real-image edit always samples with DDIM).
    """
    fields = type(request).model_fields
    native_height, native_width = native_size
    wanted = {
        "steps": defaults.steps,
        "guidance_scale": defaults.guidance_scale,
        "scheduler": defaults.scheduler,
        "width": defaults.width or native_width,
        "height": defaults.height or native_height,
    }
    updates: dict[str, object] = {
        name: value for name, value in wanted.items() if name in fields and getattr(request, name) is None
    }
    edits = getattr(request, "edits", None)
    if edit_mode is not None and edits:
        per_direction = getattr(defaults.edit, edit_mode)
        updates["edits"] = [_fill_edit(edit, per_direction.of(edit.direction)) for edit in edits]
    return request.model_copy(update=updates) if updates else request


def _fill_edit(edit: BaseModel, setting: EditSetting) -> BaseModel:
    """One editorial prompt with its null alpha, alpha_tau and gamma_attn taken from ``setting``."""
    wanted = setting.model_dump()
    updates = {name: value for name, value in wanted.items() if getattr(edit, name) is None}
    return edit.model_copy(update=updates) if updates else edit
