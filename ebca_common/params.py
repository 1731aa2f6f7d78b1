"""The parameter contract: every rule a generation or edit parameter obeys, each written once.

The api refuses a request that breaks one of these rules with a 422 naming the field (through the
request models of :mod:`ebca_common.specs`); ebca_core refuses a library call that breaks one with
:class:`ebca_core.InvalidInputError` naming the same field (through ``EBCAPipeline.check_inputs``);
the worker, between the two, only converts. This module imports nothing outside the standard
library, so ebca_core can use it without any of the service's dependencies and the api without torch.

The rules raise :class:`ParameterError`; each side turns it into its own error type in one place.
The mathematics behind the schedules and the CACAO normaliser is in docs/EBCA.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

#: The noise schedulers a caller may name (ebca_core.schedulers builds one class per name).
Scheduler = Literal["ddim", "pndm", "euler", "euler_ancestral", "dpm_solver", "lms"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
#: The step-size schedules a request may name (docs/EBCA.md, "Step-size schedules").
ScheduleKind = Literal["constant", "step", "reverse_step", "linear", "exp"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
#: CACAO directions: "and" adds an editorial prompt, "not" subtracts it (docs/EBCA.md, "CACAO").
Direction = Literal["and", "not"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
#: Token indices are short ASCII digit strings (a prompt has at most a few hundred tokens); a longer
#: digit string is refused rather than converted (Python refuses int() of 4300 digits and more).
MAX_TOKEN_INDEX_DIGITS = 6


class ParameterError(ValueError):
    """A parameter breaks a rule of the contract: ``field`` names it, ``reason`` says why."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


@dataclass(frozen=True)
class Limits:
    """Upper bounds a host puts on a call; ``None`` = unbounded.

    The library's own are :data:`LIBRARY_LIMITS`; the REST contract's are :data:`REST_LIMITS` with the
    operator's settings (EBCA_MAX_IMAGES, EBCA_MAX_EDITS, EBCA_MAX_IMAGE_PIXELS) filled in by
    ``ebca_common.specs.service_limits``. The same bounds hold on both sides of the queue.
    """

    max_steps: int | None = None
    max_guidance_scale: float | None = None
    #: Every gamma and alpha (the base value of a schedule): far beyond the recommended 0.01-0.025
    #: they only drive the context to overflow (docs/EBCA.md, "Tasks").
    max_step_size: float | None = None
    #: Image i of a call uses seed + i, so seed + num_images - 1 must stay within this.
    max_seed: int = 2**64 - 1
    max_size: int | None = None  # width and height of a generated image
    #: Input images and masks; also width * height of a generated image when both are given.
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int | None = None
    max_images: int | None = None
    max_edits: int = 4


LIBRARY_LIMITS = Limits()
REST_LIMITS = Limits(
    max_steps=200,
    max_guidance_scale=50.0,
    max_step_size=10.0,
    max_seed=2**32 - 1,
    max_size=2048,
    max_image_pixels=2048 * 2048,
    max_prompt_chars=1000,
    max_images=4,
    max_edits=4,
)


# --- numbers --------------------------------------------------------------------------------------------
def check_number(
    value: object,
    field: str,
    *,
    minimum: float | None = 0.0,
    maximum: float | None = None,
    positive: bool = False,
    integer: bool = False,
) -> float:
    """A finite number (an int when ``integer``) in ``[minimum, maximum]`` (``> 0`` when ``positive``)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParameterError(f"must be an integer, got {type(value).__name__}", field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParameterError(f"must be a number, got {type(value).__name__}", field)
    if not math.isfinite(value):
        raise ParameterError(f"must be finite, got {value}", field)
    if positive and value <= 0:
        raise ParameterError(f"must be > 0, got {value}", field)
    if minimum is not None and value < minimum:
        raise ParameterError(f"must be >= {minimum}, got {value}", field)
    if maximum is not None and value > maximum:
        raise ParameterError(f"must be <= {maximum}, got {value}", field)
    return value


def check_fraction(value: object, field: str) -> float:
    """A switch point ``tau``: a number in [0, 1]."""
    check_number(value, field)
    if value > 1:  # type: ignore[operator]
        raise ParameterError(f"must be in [0, 1], got {value}", field)
    return float(value)  # type: ignore[arg-type]


def check_seed(seed: object, num_images: int, limits: Limits) -> None:
    """Image i uses seed + i, so every one of them must be a valid seed."""
    if seed is None:
        return
    check_number(seed, "seed", minimum=0, integer=True)
    top = limits.max_seed - num_images + 1
    if seed > top:  # type: ignore[operator]
        raise ParameterError(
            f"image i uses seed + i, so seed must be <= {top} for {num_images} images, got {seed}", "seed"
        )


def check_image_area(width: int | None, height: int | None, limits: Limits) -> None:
    """A generated image of both given sides stays within the pixel limit (uploads do too)."""
    if width is not None and height is not None and width * height > limits.max_image_pixels:
        raise ParameterError(
            f"{width}x{height} is {width * height} pixels, over the limit of {limits.max_image_pixels}",
            "width",
        )


# --- prompts -------------------------------------------------------------------------------------------
def check_prompt(value: object, field: str, limits: Limits = LIBRARY_LIMITS) -> str:
    """A prompt: a string with something in it other than white space, within the length limit."""
    if not isinstance(value, str):
        raise ParameterError(f"must be a string, got {type(value).__name__}", field)
    if not value.strip():
        raise ParameterError("must be a non-empty string, not only white space", field)
    check_prompt_length(value, field, limits)
    return value


def check_prompt_length(value: str, field: str, limits: Limits) -> None:
    if limits.max_prompt_chars is not None and len(value) > limits.max_prompt_chars:
        raise ParameterError(f"must be at most {limits.max_prompt_chars} characters, got {len(value)}", field)


# --- token weights ---------------------------------------------------------------------------------------
def token_index(key: object, field: str = "energy.token_weights") -> int | None:
    """The one digit-key rule: an int, or a string of the ASCII digits 0-9, is a token index (0 = the
    start token); anything else is a word of the prompt (``"²".isdigit()`` is true, but it is a word).
    """
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        if len(key) > MAX_TOKEN_INDEX_DIGITS:
            raise ParameterError(
                f"token index {key[:12]}... has {len(key)} digits; at most {MAX_TOKEN_INDEX_DIGITS}", field
            )
        return int(key)
    return None


def token_key(key: str) -> int | str:
    """A ``token_weights`` key as ebca_core resolves it: a token index, else the key itself (also an
    over-long digit string, which :func:`check_token_weight` refuses: converting does not check)."""
    try:
        index = token_index(key)
    except ParameterError:
        return key
    return key if index is None else index


def check_token_weight(key: object, weight: object, field: str) -> int | str:
    """One ``token_weights`` entry; returns the key as ebca_core resolves it (an index or a word).

    A key is a token index (:func:`token_index`) >= 0 or one word of the prompt (no white space);
    the weight is a finite multiplier > 0.
    """
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise ParameterError("keys must be token indices or words", field)
    index = token_index(key, field)
    if index is None and (not key or any(c.isspace() for c in str(key))):
        raise ParameterError(f"key {key!r} must be one word or a token index", field)
    if index is not None and index < 0:
        raise ParameterError("token index must be >= 0", field)
    check_number(weight, field, positive=True)
    return key if index is None else index  # type: ignore[return-value]


# --- schedules ---------------------------------------------------------------------------------------
def switch_index(num_inference_steps: int, tau: float) -> int:
    """The U-Net call at which a step schedule switches: ``int(T * tau)`` (docs/EBCA.md, schedules)."""
    return int(num_inference_steps * tau)


def default_ratio(kind: str) -> float:
    """The ratio of a ``linear`` (0: constant) or ``exp`` (1: constant) schedule given none."""
    return 1.0 if kind == "exp" else 0.0


def schedule_value(
    kind: str, value: float, tau: float, ratio: float, i: int, num_inference_steps: int
) -> float:
    """The value of a named schedule at U-Net call ``i`` (docs/EBCA.md, "Step-size schedules")."""
    if kind == "constant":
        return value
    if kind == "step":
        return 0.0 if i < switch_index(num_inference_steps, tau) else value
    if kind == "reverse_step":
        return value if i < switch_index(num_inference_steps, tau) else 0.0
    if kind == "linear":
        return value + ratio * i
    if kind == "exp":
        return value * ratio**i
    raise ParameterError(
        f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}", "schedule.kind"
    )


def check_schedule_values(
    schedule: Callable[[int], float], num_calls: int, field: str, *, allow_negative: bool = False
) -> None:
    """A schedule is usable when its value at every U-Net call is finite and not negative."""
    for i in range(num_calls):
        try:
            v = schedule(i)
        except OverflowError:
            raise ParameterError(f"schedule overflows at step {i}", field) from None
        if not math.isfinite(v):
            raise ParameterError(f"schedule value at step {i} is not finite ({v})", field)
        if v < 0 and not allow_negative:
            raise ParameterError(f"schedule value at step {i} is negative ({v})", field)


def unet_calls(scheduler: str | None, num_inference_steps: int) -> int:
    """U-Net calls of a run: PNDM (with ``skip_prk_steps``, as every Stable Diffusion config has it)
    makes one more than the steps; an unknown scheduler (null: the model's default) counts as PNDM."""
    return num_inference_steps if scheduler not in (None, "pndm") else num_inference_steps + 1


# --- CACAO -------------------------------------------------------------------------------------------
def direction_sign(direction: str) -> float:
    return 1.0 if direction == "and" else -1.0


def check_cacao_normaliser(stages: Iterable[tuple[str, Iterable[tuple[str, float]]]]) -> None:
    """Refuse edits whose normaliser ``1 + sum(sign * alpha)`` is not positive (docs/EBCA.md, "CACAO").

    ``stages``: ``(where, [(direction, alpha), ...])`` for every point of the run with the alphas in
    effect there ("at step 3"); the first stage at fault is named.
    """
    for where, terms in stages:
        total = 1.0 + sum(direction_sign(direction) * alpha for direction, alpha in terms)
        if total <= 0.0:
            raise ParameterError(
                f"the CACAO normaliser 1 + sum(sign * alpha) is {total:g} {where}; it must be > 0 "
                "(lower the alphas of the 'not' prompts)",
                "edits",
            )
