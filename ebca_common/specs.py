"""Request models of docs/API.md, shared by the api (validation) and the worker (execution).

Every rule a field obeys is the parameter contract's (:mod:`ebca_common.params`), the one ebca_core
applies to library callers: the static bounds on the fields come from ``params.REST_LIMITS``, the
blank-prompt and token-weight rules are its functions. Limits that come from settings
(EBCA_MAX_IMAGES, EBCA_MAX_EDITS, EBCA_MAX_IMAGE_PIXELS) and rules that need the step count (the
CACAO normaliser, the values of the energy schedule) are checked by :func:`check_limits`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic import ValidationError as PydanticValidationError

from ebca_common import params
from ebca_common.errors import ValidationFailed
from ebca_common.jobs import WEBHOOK_EVENTS, WebhookEvent, WebhookSpec
from ebca_common.params import REST_LIMITS, Direction, Limits, ParameterError, ScheduleKind, Scheduler
from ebca_common.settings import Settings

SCHEDULERS: tuple[str, ...] = params.SCHEDULERS
OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SEED = REST_LIMITS.max_seed
MAX_TOKEN_INDEX_DIGITS = params.MAX_TOKEN_INDEX_DIGITS
#: No request field nests deeper than 3 levels (energy.schedule.kind); anything far deeper is an attack
#: or a mistake, refused before validation walks it.
MAX_JSON_DEPTH = 32
_STEP = REST_LIMITS.max_step_size


def _prompt(value: str) -> str:
    return params.check_prompt(value, "", REST_LIMITS)  # pydantic names the field


#: Every prompt of a request (prompt, source_prompt, edits[].prompt): non-blank, at most 1000 characters.
Prompt = Annotated[str, AfterValidator(_prompt)]


def _prompt_field(description: str) -> Any:
    return Field(..., min_length=1, max_length=REST_LIMITS.max_prompt_chars, description=description)


def _step_size_field(default: float, description: str) -> Any:
    return Field(default, ge=0.0, le=_STEP, allow_inf_nan=False, description=f"{description} (0..{_STEP:g}).")


def _fraction_field(default: float | None, description: str) -> Any:
    return Field(default, ge=0.0, le=1.0, description=description)


class _Strict(BaseModel):
    # Unknown fields are a client mistake worth naming (a typo such as "step" would otherwise be ignored);
    # strict types refuse what JSON should not mean: true as 1, 16.0 as a pixel count, "7" as a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class ScheduleSpec(_Strict):
    """Step-size schedule of the BCU gammas (docs/EBCA.md, "Step-size schedules")."""

    kind: ScheduleKind = Field(
        "reverse_step",
        description="constant: always on; step: on from int(T*tau); reverse_step: on until int(T*tau); "
        "linear: g + ratio*i; exp: g * ratio**i (i = denoising step index, T = steps).",
    )
    tau: float = _fraction_field(1.0, "Switch point for step kinds, a fraction of steps.")
    ratio: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Slope (linear, default 0) or factor (exp, default 1) per step.",
    )

    def value(self, gamma: float, i: int, steps: int) -> float:
        """The step size at U-Net call ``i`` for base value ``gamma`` (the contract's formula)."""
        ratio = self.ratio if self.ratio is not None else params.default_ratio(self.kind)
        return params.schedule_value(self.kind, gamma, self.tau, ratio, i, steps)


class EnergySpec(_Strict):
    """Bayesian Context Update on the main prompt (docs/EBCA.md, "Bayesian Context Update")."""

    gamma_attn: float = _step_size_field(0.0, "Step size of the attention term")
    gamma_norm: float = _step_size_field(0.0, "Step size of the key-norm prior")
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
            params.check_token_weight(key, weight, "")  # pydantic names the field
            if key.isdigit() and not key.isascii():
                # The contract reads "²" or "٣" as a word, which only the worker's tokenizer can look
                # for; a key of nothing but such digits is almost surely a mistaken index: say so now.
                raise ValueError(f"key {key!r}: a token index must be written with the digits 0-9")
        return value


class EditSpec(_Strict):
    """One CACAO editorial prompt (docs/EBCA.md, "CACAO").

    ``alpha``, ``alpha_tau`` and ``gamma_attn`` may be null: the worker fills them with the model's
    edit defaults for the editing mode (real or synthetic) and this prompt's direction
    (``ebca_common.model_defaults``, listed by GET /models), so the stored request shows the values used.
    """

    prompt: Prompt = _prompt_field("The editorial prompt.")
    alpha: float | None = _step_size_field(
        None, "Weight of this prompt's attention; null = the model's default"
    )
    direction: Direction = Field("and", description="and: conjunction; not: negation.")
    alpha_tau: float | None = _fraction_field(
        None, "alpha switches on at int(steps * alpha_tau); null = the model's default."
    )
    gamma_attn: float | None = _step_size_field(None, "BCU attention step size; null = the model's default")
    gamma_norm: float = _step_size_field(0.0, "BCU key-norm step size")
    gamma_tau: float | None = _fraction_field(
        None, "The gammas switch on at int(steps * gamma_tau); null = alpha_tau."
    )


class ImageRef(_Strict):
    """An image stored by an earlier job: an output image, or one of its uploaded inputs."""

    job_id: str = Field(..., min_length=1, max_length=64, description="The job that holds the image.")
    index: int = Field(0, ge=0, description="Output image index (ignored when `input` is set).")
    input: Literal["image", "mask"] | None = Field(
        None, description="Refer to the job's uploaded input of this name instead of an output image."
    )


class InversionSpec(_Strict):
    regularize: bool = Field(False, description="pix2pix-zero noise regularisation during DDIM inversion.")


def _timeout_field() -> Any:
    return Field(
        None,
        ge=1,
        description="Seconds from submission until the job fails with code timeout if it is not done "
        "(queued or running), 1..EBCA_MAX_JOB_SECONDS; null = EBCA_JOB_TIMEOUT_SECONDS (900).",
    )


#: Longest webhook URL (receivers' URLs carry a path and maybe a token; more is a mistake).
MAX_WEBHOOK_URL = 2000


def _webhook_url(value: str) -> str:
    """The shape of a webhook URL: http(s), a host, no user info. Whether http and private hosts are
    allowed depends on EBCA_WEBHOOK_ALLOW_PRIVATE (:func:`check_webhook`)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password (put a token in the path or query)")
    if not value.isascii() or any(c.isspace() for c in value):
        raise ValueError("must be ASCII without white space (percent-encode the rest)")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


WebhookUrl = Annotated[str, Field(max_length=MAX_WEBHOOK_URL), AfterValidator(_webhook_url)]


def _webhook_fields() -> tuple[Any, Any]:
    url = Field(
        None,
        description="Deliver this job's events to this https URL, signed (docs/API.md, Webhooks).",
    )
    events = Field(
        None,
        min_length=1,
        description="Which events to deliver: start, progress, completed; null = all three.",
    )
    return url, events


_WEBHOOK, _WEBHOOK_EVENTS = _webhook_fields()


class _Webhooked(_Strict):
    webhook: WebhookUrl | None = _WEBHOOK
    webhook_events: list[WebhookEvent] | None = _WEBHOOK_EVENTS

    def webhook_spec(self) -> WebhookSpec | None:
        """The webhook as the job keeps it (events deduplicated, in the contract's order)."""
        if self.webhook is None:
            return None
        chosen = set(self.webhook_events or WEBHOOK_EVENTS)
        return WebhookSpec(url=self.webhook, events=[e for e in WEBHOOK_EVENTS if e in chosen])


def _size_field(name: str) -> Any:
    return Field(
        None,
        ge=8,
        le=REST_LIMITS.max_size,
        multiple_of=8,
        description=f"Image {name}; null = model's native size.",
    )


class _Common(_Webhooked):
    model: str | None = Field(None, max_length=200, description="Model id from GET /models; null = default.")
    steps: int | None = Field(
        None,
        ge=1,
        le=REST_LIMITS.max_steps,
        description="Denoising steps; null = the model's default (else 30).",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=REST_LIMITS.max_guidance_scale,
        description="Guidance scale; null = the model's default (else 7.5).",
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

    prompt: Prompt = _prompt_field("What to draw.")
    negative_prompt: str | None = Field(
        None, max_length=REST_LIMITS.max_prompt_chars, description="What to avoid."
    )
    width: int | None = _size_field("width")
    height: int | None = _size_field("height")
    scheduler: Scheduler | None = Field(None, description="Noise scheduler; null = the model's default.")
    edits: list[EditSpec] = Field(default_factory=list, description="Editorial prompts (CACAO).")


class InpaintRequest(_Common):
    """POST /edit with mode=inpaint: repaint the white part of the mask."""

    mode: Literal["inpaint"] = Field(..., description="inpaint: repaint the white region of the mask.")
    prompt: Prompt = _prompt_field("What to paint into the masked region.")
    negative_prompt: str | None = Field(
        None, max_length=REST_LIMITS.max_prompt_chars, description="What to avoid."
    )
    scheduler: Scheduler | None = Field(None, description="Noise scheduler; null = the model's default.")
    image_ref: ImageRef | None = Field(None, description="The image, unless uploaded as part `image`.")
    mask_ref: ImageRef | None = Field(None, description="The mask, unless uploaded as part `mask`.")


class RealEditRequest(_Common):
    """POST /edit with mode=real: invert a real image with DDIM, then re-generate it with edits."""

    mode: Literal["real"] = Field(..., description="real: edit an existing image (DDIM inversion + CACAO).")
    source_prompt: Prompt = _prompt_field("A caption of the input image (used for inversion).")
    edits: list[EditSpec] = Field(..., min_length=1, description="Editorial prompts (at least one).")
    image_ref: ImageRef | None = Field(None, description="The image, unless uploaded as part `image`.")
    inversion: InversionSpec = Field(default_factory=InversionSpec, description="DDIM inversion options.")


class SyntheticEditRequest(_Webhooked):
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


_Model = TypeVar("_Model", bound=BaseModel)


def parse_model(model: type[_Model], data: Any) -> _Model:
    """Decoded JSON as ``model``; 422 naming the first field at fault."""
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", field=None)
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise from_pydantic(exc) from None


def parse_generate(data: Any) -> GenerateRequest:
    return parse_model(GenerateRequest, data)


def parse_edit(data: Any) -> InpaintRequest | RealEditRequest | SyntheticEditRequest:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", field=None)
    mode = data.get("mode")
    if mode is None:
        raise ValidationFailed("mode: field required (inpaint, real or synthetic)", field="mode")
    model = EDIT_MODELS.get(mode) if isinstance(mode, str) else None
    if model is None:
        raise ValidationFailed(f"mode: must be one of inpaint, real, synthetic; got {mode!r}", field="mode")
    return parse_model(model, data)  # type: ignore[return-value]


def stored_request(model: type[_Model], data: dict[str, Any]) -> _Model:
    """A request the api validated and stored, as its model again, without checking it a second time
    (ebca_core checks the same rules on the worker's side of the queue)."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name not in data:
            continue
        value = data[name]
        nested = _nested_model(info.annotation)
        if nested is not None and isinstance(value, dict):
            value = stored_request(nested, value)
        elif nested is not None and isinstance(value, list):
            value = [stored_request(nested, v) if isinstance(v, dict) else v for v in value]
        values[name] = value
    return model.model_construct(**values)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The request model inside a field's type (``EnergySpec | None``, ``list[EditSpec]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def service_limits(settings: Settings) -> Limits:
    """The REST contract's bounds with this deployment's settings: what the api enforces, and what
    the worker hands its pipelines, so both sides of the queue refuse the same requests."""
    return replace(
        REST_LIMITS,
        max_images=settings.max_images,
        max_edits=settings.max_edits,
        max_image_pixels=settings.max_image_pixels,
    )


def _refused(exc: ParameterError) -> ValidationFailed:
    return ValidationFailed(str(exc), field=exc.field)


def _normaliser_stages(
    edits: list[EditSpec], steps: int | None, scheduler: str | None
) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """The alphas in effect at every point of the run (docs/EBCA.md, "CACAO")."""
    if steps is not None:
        for i in range(params.unet_calls(scheduler, steps)):
            on = [e for e in edits if i >= params.switch_index(steps, e.alpha_tau)]
            yield f"at step {i}", [(e.direction, e.alpha) for e in on]
        return
    # Null steps: the model's default decides them later, so every set of prompts that some step count
    # switches on together is checked. They switch on in the order of their alpha_tau (equal ones
    # together), so those sets are the prefixes of that order.
    for tau in sorted({e.alpha_tau for e in edits}):
        on = [e for e in edits if e.alpha_tau <= tau]
        yield f"once the prompts with alpha_tau <= {tau:g} are on", [(e.direction, e.alpha) for e in on]


def _sure_stages(edits: list[EditSpec]) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """With null alphas or alpha_tau (the model's defaults, which the worker knows and ebca_core checks
    once filled in): only what is refused whatever the defaults are. Every prompt whose alpha_tau is
    null or < 1 is on at the last step (a default alpha_tau is < 1); a null "not" alpha counts as 0,
    which can only raise the normaliser; a null "and" alpha can make it anything, so no verdict."""
    last = [e for e in edits if e.alpha_tau is None or e.alpha_tau < 1.0]
    if any(e.alpha is None and e.direction == "and" for e in last):
        return
    yield "once every prompt is on", [(e.direction, e.alpha or 0.0) for e in last]


def check_cacao_normaliser(edits: list[EditSpec], steps: int | None, scheduler: str | None = None) -> None:
    """Reject edits whose CACAO normaliser ``1 + sum(sign * alpha)`` is <= 0 at some U-Net call.

    The alphas switch on at ``int(steps * alpha_tau)``; every call of the run is checked (PNDM, or a
    scheduler not known yet, makes one call more than ``steps``).
    """
    if not edits:
        return
    complete = all(e.alpha is not None and e.alpha_tau is not None for e in edits)
    stages = _normaliser_stages(edits, steps, scheduler) if complete else _sure_stages(edits)
    try:
        params.check_cacao_normaliser(stages)
    except ParameterError as exc:
        raise _refused(exc) from None


def check_energy_schedule(energy: EnergySpec | None, steps: int | None, scheduler: str | None) -> None:
    """Both gammas follow the one schedule; its value at every U-Net call must be finite and not
    negative (a linear slope or an exponential factor can break that). Null steps: every step count
    up to the most a request may ask for."""
    if energy is None or energy.schedule.kind not in ("linear", "exp"):
        return  # the other kinds only take the values 0 and the gamma
    run_steps = steps if steps is not None else REST_LIMITS.max_steps
    assert run_steps is not None
    calls = params.unet_calls(scheduler if steps is not None else None, run_steps)
    try:
        for name in ("gamma_attn", "gamma_norm"):
            gamma = getattr(energy, name)
            params.check_schedule_values(
                lambda i, g=gamma: energy.schedule.value(g, i, run_steps), calls, f"energy.{name}"
            )
    except ParameterError as exc:
        raise _refused(exc) from None


def private_host(host: str) -> bool:
    """Whether a host name or address is loopback, private, link-local or otherwise not public (for
    a name: only what it says itself, ``localhost``; the dispatcher checks what it resolves to)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return not address.is_global


def check_webhook(request: BaseModel, settings: Settings) -> None:
    """A webhook must be https to a public host unless EBCA_WEBHOOK_ALLOW_PRIVATE; webhook_events
    needs a webhook."""
    url = getattr(request, "webhook", None)
    if url is None:
        if getattr(request, "webhook_events", None) is not None:
            raise ValidationFailed("webhook_events: given without a webhook", field="webhook_events")
        return
    if settings.webhook_allow_private:
        return
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValidationFailed("webhook: must be an https URL (EBCA_WEBHOOK_ALLOW_PRIVATE is off)",
                               field="webhook")  # fmt: skip
    if private_host(parts.hostname or ""):
        raise ValidationFailed(
            f"webhook: {parts.hostname} is a loopback or private address (EBCA_WEBHOOK_ALLOW_PRIVATE is off)",
            field="webhook",
        )


def check_limits(request: BaseModel, settings: Settings) -> None:
    """The rules that depend on configuration or on more than one field; raise ValidationFailed."""
    limits = service_limits(settings)
    check_webhook(request, settings)
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
    try:
        if num_images is not None:
            params.check_seed(getattr(request, "seed", None), num_images, limits)
        # The same bound as uploads: one request must not tie a worker up for hours (a 2048x2048 run is
        # minutes per step on CPU), so operators can lower it (EBCA_MAX_IMAGE_PIXELS).
        params.check_image_area(getattr(request, "width", None), getattr(request, "height", None), limits)
    except ParameterError as exc:
        raise _refused(exc) from None
    edits: list[EditSpec] = getattr(request, "edits", None) or []
    if len(edits) > settings.max_edits:
        raise ValidationFailed(
            f"edits: at most {settings.max_edits} editorial prompts (EBCA_MAX_EDITS), got {len(edits)}",
            field="edits",
        )
    steps = getattr(request, "steps", None)
    # A real-image edit always samples with DDIM; null = the model's default scheduler.
    scheduler = "ddim" if isinstance(request, RealEditRequest) else getattr(request, "scheduler", None)
    check_energy_schedule(getattr(request, "energy", None), steps, scheduler)
    check_cacao_normaliser(edits, steps, scheduler)
    model = getattr(request, "model", None)
    if model is not None and model not in settings.model_table():
        known = ", ".join(sorted(settings.model_table()))
        raise ValidationFailed(f"model: unknown model {model!r}; known: {known}", field="model")
