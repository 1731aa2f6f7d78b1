"""Request models of docs/API.md, shared by the api (validation) and the worker (execution).

Static bounds live on the fields; limits that come from settings (EBCA_MAX_IMAGES, EBCA_MAX_EDITS) are
checked by :func:`check_limits`, and the CACAO normaliser by :func:`check_cacao_normaliser`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic import ValidationError as PydanticValidationError

from ebca_common.errors import ValidationFailed
from ebca_common.model_defaults import Scheduler
from ebca_common.settings import Settings

SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SEED = 2**32 - 1

_WORD = re.compile(r"^\S+$")
#: Token indices are short ASCII digit strings (a prompt has at most a few hundred tokens); longer digit
#: strings are refused here rather than failing in the worker.
MAX_TOKEN_INDEX_DIGITS = 6
#: No request field nests deeper than 3 levels (energy.schedule.kind); anything far deeper is an attack
#: or a mistake, refused before validation walks it.
MAX_JSON_DEPTH = 32


def token_weight_key(key: str) -> int | str:
    """A ``token_weights`` key as ebca_core takes it: an ASCII digit string is a token index, anything
    else a word of the prompt (validation refuses other digit characters such as ``"²"``)."""
    return int(key) if key.isascii() and key.isdigit() else key


class _Strict(BaseModel):
    # Unknown fields are a client mistake worth naming (a typo such as "step" would otherwise be ignored);
    # strict types refuse what JSON should not mean: true as 1, 16.0 as a pixel count, "7" as a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class ScheduleSpec(_Strict):
    """Step-size schedule of the BCU gammas (EBCA_SPEC.md, "Step-size schedules")."""

    kind: Literal["constant", "step", "reverse_step", "linear", "exp"] = Field(
        "reverse_step",
        description="constant: always on; step: on from int(T*tau); reverse_step: on until int(T*tau); "
        "linear: g + ratio*i; exp: g * ratio**i (i = denoising step index, T = steps).",
    )
    tau: float = Field(1.0, ge=0.0, le=1.0, description="Switch point for step kinds, a fraction of steps.")
    ratio: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Slope (linear, default 0) or factor (exp, default 1) per step.",
    )


class EnergySpec(_Strict):
    """Bayesian Context Update on the main prompt (EBCA_SPEC.md, "Bayesian Context Update")."""

    # Upper bounds: the recommended step sizes are 0.01-0.025 (EBCA_SPEC.md, "Tasks"); far larger
    # ones only drive the context to overflow and produce a black image.
    gamma_attn: float = Field(
        0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="Step size of the attention term (0..10)."
    )
    gamma_norm: float = Field(
        0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="Step size of the key-norm prior (0..10)."
    )
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec, description="How the gammas vary over the denoising steps."
    )
    token_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-token step-size multipliers; keys are words of the prompt or token indices as "
        "digit strings (0 = start token); values > 0.",
    )

    @field_validator("token_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if not _WORD.match(key):
                raise ValueError(f"key {key!r} must be one word or a token index")
            if key.isdigit() and not key.isascii():
                # "²" or "٣" would be read as an index by some code and as a word by other code.
                raise ValueError(f"key {key!r}: a token index must be written with the digits 0-9")
            if isinstance(token_weight_key(key), int) and len(key) > MAX_TOKEN_INDEX_DIGITS:
                raise ValueError(
                    f"token index {key[:12]}... has {len(key)} digits; at most {MAX_TOKEN_INDEX_DIGITS}"
                )
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"weight of {key!r} must be a finite number > 0, got {weight}")
        return value


class EditSpec(_Strict):
    """One CACAO editorial prompt (EBCA_SPEC.md, "CACAO")."""

    prompt: str = Field(..., min_length=1, max_length=1000, description="The editorial prompt.")
    alpha: float = Field(
        1.0, ge=0.0, le=10.0, allow_inf_nan=False, description="Weight of this prompt's attention (0..10)."
    )
    direction: Literal["and", "not"] = Field("and", description="and: conjunction; not: negation.")
    alpha_tau: float = Field(0.0, ge=0.0, le=1.0, description="alpha switches on at int(steps * alpha_tau).")
    gamma_attn: float = Field(
        0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="BCU attention step size (0..10)."
    )
    gamma_norm: float = Field(
        0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="BCU key-norm step size (0..10)."
    )
    gamma_tau: float | None = Field(
        None, ge=0.0, le=1.0, description="The gammas switch on at int(steps * gamma_tau); null = alpha_tau."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class ImageRef(_Strict):
    """An image stored by an earlier job: an output image, or one of its uploaded inputs."""

    job_id: str = Field(..., min_length=1, max_length=64, description="The job that holds the image.")
    index: int = Field(0, ge=0, description="Output image index (ignored when `input` is set).")
    input: Literal["image", "mask"] | None = Field(
        None, description="Refer to the job's uploaded input of this name instead of an output image."
    )


class InversionSpec(_Strict):
    regularize: bool = Field(False, description="pix2pix-zero noise regularisation during DDIM inversion.")


def _prompt_field(description: str) -> Any:
    return Field(..., min_length=1, max_length=1000, description=description)


def _timeout_field() -> Any:
    return Field(
        None,
        ge=1,
        description="Seconds from submission until the job fails with code timeout if it is not done "
        "(queued or running), 1..EBCA_MAX_JOB_SECONDS; null = EBCA_JOB_TIMEOUT_SECONDS (900).",
    )


def _size_field(name: str) -> Any:
    return Field(None, ge=8, le=2048, multiple_of=8, description=f"Image {name}; null = model's native size.")


class _Common(_Strict):
    model: str | None = Field(None, max_length=200, description="Model id from GET /models; null = default.")
    steps: int | None = Field(
        None, ge=1, le=200, description="Denoising steps; null = the model's default (else 30)."
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=50.0, description="Guidance scale; null = the model's default (else 7.5)."
    )
    num_images: int = Field(
        1, ge=1, description="Images to make; image i uses seed + i (<= EBCA_MAX_IMAGES)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of image 0; null = drawn.")
    output_format: OutputFormat = Field("png", description="Encoding of the result images.")
    energy: EnergySpec | None = Field(None, description="BCU on the main prompt; null = off.")
    timeout_seconds: int | None = _timeout_field()


class GenerateRequest(_Common):
    """Body of POST /generate."""

    prompt: str = _prompt_field("What to draw.")
    negative_prompt: str | None = Field(None, max_length=1000, description="What to avoid.")
    width: int | None = _size_field("width")
    height: int | None = _size_field("height")
    scheduler: Scheduler | None = Field(None, description="Noise scheduler; null = the model's default.")
    edits: list[EditSpec] = Field(default_factory=list, description="Editorial prompts (CACAO).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class InpaintRequest(_Common):
    """POST /edit with mode=inpaint: repaint the white part of the mask."""

    mode: Literal["inpaint"] = Field(..., description="inpaint: repaint the white region of the mask.")
    prompt: str = _prompt_field("What to paint into the masked region.")
    negative_prompt: str | None = Field(None, max_length=1000, description="What to avoid.")
    scheduler: Scheduler | None = Field(None, description="Noise scheduler; null = the model's default.")
    image_ref: ImageRef | None = Field(None, description="The image, unless uploaded as part `image`.")
    mask_ref: ImageRef | None = Field(None, description="The mask, unless uploaded as part `mask`.")


class RealEditRequest(_Common):
    """POST /edit with mode=real: invert a real image with DDIM, then re-generate it with edits."""

    mode: Literal["real"] = Field(..., description="real: edit an existing image (DDIM inversion + CACAO).")
    source_prompt: str = _prompt_field("A caption of the input image (used for inversion).")
    edits: list[EditSpec] = Field(..., min_length=1, description="Editorial prompts (at least one).")
    image_ref: ImageRef | None = Field(None, description="The image, unless uploaded as part `image`.")
    inversion: InversionSpec = Field(default_factory=InversionSpec, description="DDIM inversion options.")


class SyntheticEditRequest(_Strict):
    """POST /edit with mode=synthetic: re-run a finished generate job with editorial prompts."""

    mode: Literal["synthetic"] = Field(..., description="synthetic: re-run a generate job with edits.")
    source_job_id: str = Field(..., min_length=1, max_length=64, description="A succeeded generate job.")
    edits: list[EditSpec] = Field(..., min_length=1, description="Editorial prompts (at least one).")
    output_format: OutputFormat | None = Field(None, description="null = the source job's format.")
    timeout_seconds: int | None = _timeout_field()


EditRequest = Annotated[InpaintRequest | RealEditRequest | SyntheticEditRequest, Field(discriminator="mode")]
EDIT_MODELS: dict[str, type[BaseModel]] = {
    "inpaint": InpaintRequest,
    "real": RealEditRequest,
    "synthetic": SyntheticEditRequest,
}
edit_request_adapter: TypeAdapter[Any] = TypeAdapter(EditRequest)


def field_path(loc: tuple[int | str, ...]) -> str:
    """Dotted path of a pydantic error location: ("edits", 0, "alpha") -> "edits[0].alpha"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_pydantic(exc: PydanticValidationError, prefix: str = "") -> ValidationFailed:
    """The first error of a pydantic ValidationError as one ValidationFailed naming its field."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("body",))
    path = field_path(loc)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "field required"
    return ValidationFailed(f"{path or 'body'}: {message}", field=path or None)


def load_json(raw: bytes | str, field: str | None = None) -> Any:
    """Decode a JSON request body (or the ``request`` part of a multipart body); 422 for anything that is
    not plain JSON text, naming ``field`` (None for the whole body) or the field inside it at fault.

    Besides syntax errors this refuses what ``json.loads`` itself fails on with other exceptions
    (integers of more than 4300 digits, nesting deep enough to exhaust the recursion limit) and strings
    that are not Unicode text (lone UTF-16 surrogates such as ``"\\ud800"``, which cannot be stored
    or echoed back as UTF-8).
    """
    where = field or "body"
    if not raw.strip():
        raise ValidationFailed(f"{where}: a JSON object is required", field=field)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValidationFailed(
            f"{where}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)", field=field
        ) from None
    except UnicodeDecodeError:
        raise ValidationFailed(f"{where}: not UTF-8 text", field=field) from None
    except ValueError as exc:  # JSONDecodeError, and integers over the int/str digit limit
        raise ValidationFailed(f"{where}: invalid JSON ({exc})", field=field) from None
    _check_json_text(data, field)
    return data


def _check_json_text(data: Any, field: str | None) -> None:
    """Walk decoded JSON (iteratively: depth is what is being checked) for depth and non-text strings."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if len(loc) > MAX_JSON_DEPTH:
            raise ValidationFailed(
                f"{field or 'body'}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)", field=field
            )
        # Fields inside the JSON are named as validation names them ("prompt", not "request.prompt").
        if isinstance(value, str):
            if not _is_text(value):
                path = field_path(loc) or field
                raise ValidationFailed(
                    f"{path or 'body'}: not valid Unicode text (lone surrogate escape)", field=path
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    path = field_path(loc) or field
                    raise ValidationFailed(
                        f"{path or 'body'}: a key is not valid Unicode text (lone surrogate escape)",
                        field=path,
                    )
                stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_generate(data: Any) -> GenerateRequest:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", field=None)
    try:
        return GenerateRequest.model_validate(data)
    except PydanticValidationError as exc:
        raise from_pydantic(exc) from None


def parse_edit(data: Any) -> InpaintRequest | RealEditRequest | SyntheticEditRequest:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", field=None)
    mode = data.get("mode")
    if mode is None:
        raise ValidationFailed("mode: field required (inpaint, real or synthetic)", field="mode")
    model = EDIT_MODELS.get(mode) if isinstance(mode, str) else None
    if model is None:
        raise ValidationFailed(f"mode: must be one of inpaint, real, synthetic; got {mode!r}", field="mode")
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except PydanticValidationError as exc:
        raise from_pydantic(exc) from None


def _step_on(i: int, steps: int, tau: float) -> bool:
    # Same switch point as ebca_core's step schedule: on for i >= int(T * tau) (EBCA_SPEC.md schedules).
    return i >= int(steps * tau)


def check_cacao_normaliser(edits: list[EditSpec], steps: int | None) -> None:
    """Reject edits whose CACAO normaliser ``1 + sum(sign * alpha)`` is <= 0 at any step.

    EBCA_SPEC.md, "CACAO": the combined attention output is divided by it at every U-Net call. The
    alphas switch on at ``int(steps * alpha_tau)``, so every step 0..steps is checked (PNDM makes one
    call more than ``steps``). With ``steps`` null the model's default decides it later, so every set
    of prompts that some step count switches on together is checked: the prompts switch on in the
    order of their ``alpha_tau`` (equal ones together), so those sets are the prefixes of that order.
    """
    if not edits:
        return
    if steps is not None:
        stages = [
            (f"at step {i}", [e for e in edits if _step_on(i, steps, e.alpha_tau)]) for i in range(steps + 1)
        ]
    else:
        taus = sorted({e.alpha_tau for e in edits})
        stages = [
            (f"once the prompts with alpha_tau <= {tau:g} are on", [e for e in edits if e.alpha_tau <= tau])
            for tau in taus
        ]
    for where, active in stages:
        total = 1.0 + sum(e.alpha if e.direction == "and" else -e.alpha for e in active)
        if total <= 0:
            raise ValidationFailed(
                f"edits: the normaliser 1 + sum(sign * alpha) is {total:g} {where}; it must be > 0 "
                "(lower the alphas of the 'not' prompts)",
                field="edits",
            )


def check_limits(request: BaseModel, settings: Settings) -> None:
    """Limits that depend on configuration; raise ValidationFailed naming the field."""
    timeout = getattr(request, "timeout_seconds", None)
    if timeout is not None and timeout > settings.max_job_seconds:
        raise ValidationFailed(
            f"timeout_seconds: at most {settings.max_job_seconds} seconds (EBCA_MAX_JOB_SECONDS), "
            f"got {timeout}",
            field="timeout_seconds",
        )
    num_images = getattr(request, "num_images", None)
    if num_images is not None and num_images > settings.max_images:
        raise ValidationFailed(
            f"num_images: at most {settings.max_images} images per job (EBCA_MAX_IMAGES), got {num_images}",
            field="num_images",
        )
    seed = getattr(request, "seed", None)
    if seed is not None and num_images is not None and seed + num_images - 1 > MAX_SEED:
        raise ValidationFailed(
            f"seed: image i uses seed + i, so seed must be <= {MAX_SEED - num_images + 1} "
            f"for {num_images} images",
            field="seed",
        )
    width, height = getattr(request, "width", None), getattr(request, "height", None)
    if width is not None and height is not None and width * height > settings.max_image_pixels:
        # The same bound as uploads: one request must not tie a worker up for hours (a 2048x2048 run is
        # minutes per step on CPU), so operators can lower it.
        raise ValidationFailed(
            f"width: {width}x{height} is {width * height} pixels, over the limit of "
            f"{settings.max_image_pixels} (EBCA_MAX_IMAGE_PIXELS)",
            field="width",
        )
    edits: list[EditSpec] = getattr(request, "edits", None) or []
    if len(edits) > settings.max_edits:
        raise ValidationFailed(
            f"edits: at most {settings.max_edits} editorial prompts (EBCA_MAX_EDITS), got {len(edits)}",
            field="edits",
        )
    if edits:
        check_cacao_normaliser(edits, getattr(request, "steps", None))
    model = getattr(request, "model", None)
    if model is not None and model not in settings.model_table():
        known = ", ".join(sorted(settings.model_table()))
        raise ValidationFailed(f"model: unknown model {model!r}; known: {known}", field="model")
