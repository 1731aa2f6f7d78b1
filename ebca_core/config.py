"""User-facing configuration objects: BCU step sizes, editorial prompts (CACAO), inversion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ebca_common import params
from ebca_common.params import LIBRARY_LIMITS, Limits
from ebca_core.errors import InvalidInputError, contract
from ebca_core.schedules import Schedule, as_schedule

GammaValue = float | Schedule | Sequence[float]


def _check_step_size(schedule: Schedule, field: str, limits: Limits) -> None:
    """A step size (its base value; every value of an explicit list) within the limit."""
    values = schedule.values if schedule.kind == "explicit" else (schedule.value,)
    with contract():
        for value in values:
            params.check_number(value, field, maximum=limits.max_step_size)


@dataclass(frozen=True)
class EnergyConfig:
    """Bayesian Context Update on the main prompt (docs/EBCA.md, "Bayesian Context Update").

    ``gamma_attn`` and ``gamma_norm`` are numbers (constant over the run), :class:`Schedule` objects,
    or explicit per-U-Net-call lists. ``token_weights`` maps token indices of the tokenized prompt
    (0 = start token) or words of the prompt to a step-size multiplier applied to that token's
    attention update on the conditional half of the batch.
    """

    gamma_attn: GammaValue = 0.0
    gamma_norm: GammaValue = 0.0
    token_weights: Mapping[int | str, float] | None = None

    def attn_schedule(self) -> Schedule:
        return as_schedule(self.gamma_attn, "energy.gamma_attn")

    def norm_schedule(self) -> Schedule:
        return as_schedule(self.gamma_norm, "energy.gamma_norm")

    def validate(
        self,
        num_inference_steps: int | None = None,
        num_calls: int | None = None,
        limits: Limits = LIBRARY_LIMITS,
    ) -> None:
        attn, norm = self.attn_schedule(), self.norm_schedule()
        if num_inference_steps is not None:
            calls = num_calls if num_calls is not None else num_inference_steps
            attn.validate(num_inference_steps, calls, "energy.gamma_attn")
            norm.validate(num_inference_steps, calls, "energy.gamma_norm")
        _check_step_size(attn, "energy.gamma_attn", limits)
        _check_step_size(norm, "energy.gamma_norm", limits)
        with contract():
            for key, weight in (self.token_weights or {}).items():
                params.check_token_weight(key, weight, f"energy.token_weights.{key}")

    def is_active(self, num_inference_steps: int, num_calls: int) -> bool:
        return not (
            self.attn_schedule().is_zero(num_calls, num_inference_steps)
            and self.norm_schedule().is_zero(num_calls, num_inference_steps)
        )


@dataclass(frozen=True)
class EditorialPrompt:
    """One CACAO editorial prompt (docs/EBCA.md, "CACAO").

    Numbers for ``alpha`` and the gammas become step schedules that switch on at ``alpha_tau`` (the
    gammas at ``gamma_tau``, which defaults to ``alpha_tau``), as in the paper's editing recipes. A
    :class:`Schedule` (or an explicit list) is used as given.
    """

    prompt: str
    alpha: float | Schedule | Sequence[float] = 1.0
    direction: Literal["and", "not"] = "and"
    alpha_tau: float = 0.0
    gamma_attn: float | Schedule | Sequence[float] = 0.0
    gamma_norm: float | Schedule | Sequence[float] = 0.0
    gamma_tau: float | None = None

    @property
    def sign(self) -> float:
        return params.direction_sign(self.direction)

    def _scheduled(self, value: float | Schedule | Sequence[float], tau: float, name: str) -> Schedule:
        if isinstance(value, int | float) and not isinstance(value, bool):
            with contract():
                params.check_number(value, name)
            return Schedule.step(float(value), tau)
        return as_schedule(value, name)

    def alpha_schedule(self) -> Schedule:
        return self._scheduled(self.alpha, self.alpha_tau, "alpha")

    def gamma_schedules(self) -> tuple[Schedule, Schedule]:
        tau = self.alpha_tau if self.gamma_tau is None else self.gamma_tau
        return (
            self._scheduled(self.gamma_attn, tau, "gamma_attn"),
            self._scheduled(self.gamma_norm, tau, "gamma_norm"),
        )

    def validate(
        self,
        index: int,
        num_inference_steps: int | None = None,
        num_calls: int | None = None,
        limits: Limits = LIBRARY_LIMITS,
    ) -> None:
        prefix = f"edits[{index}]"
        with contract():
            params.check_prompt(self.prompt, f"{prefix}.prompt", limits)
            if self.direction not in params.DIRECTIONS:
                raise InvalidInputError(
                    f"direction must be 'and' or 'not', got {self.direction!r}", field=f"{prefix}.direction"
                )
            for name, tau in (("alpha_tau", self.alpha_tau), ("gamma_tau", self.gamma_tau)):
                if tau is not None:
                    params.check_fraction(tau, f"{prefix}.{name}")
        try:
            schedules = {"alpha": self.alpha_schedule()}
            schedules["gamma_attn"], schedules["gamma_norm"] = self.gamma_schedules()
        except InvalidInputError as exc:
            raise InvalidInputError(exc.message, field=f"{prefix}.{exc.field}") from exc
        for name, sched in schedules.items():
            _check_step_size(sched, f"{prefix}.{name}", limits)
            if num_inference_steps is not None:
                calls = num_calls if num_calls is not None else num_inference_steps
                sched.validate(num_inference_steps, calls, f"{prefix}.{name}")


def check_cacao_normaliser(
    edits: Sequence[EditorialPrompt], num_inference_steps: int, num_calls: int
) -> None:
    """Reject alpha combinations whose normaliser ``1 + sum(sign * alpha)`` is not positive at some
    U-Net call of the run (docs/EBCA.md, "CACAO"; the rule: ``ebca_common.params``).
    """
    alphas = [(e.direction, e.alpha_schedule()) for e in edits]
    stages = (
        (f"at step {i}", [(direction, sched(i, num_inference_steps)) for direction, sched in alphas])
        for i in range(num_calls if alphas else 0)
    )
    with contract():
        params.check_cacao_normaliser(stages)


def check_energy_and_edits(
    energy: EnergyConfig | None,
    edits: Sequence[EditorialPrompt],
    num_inference_steps: int,
    num_calls: int,
    limits: Limits = LIBRARY_LIMITS,
) -> None:
    """Every check of a run's BCU and CACAO arguments, for a run of ``num_calls`` U-Net calls.

    The one place these rules run: :meth:`EBCAPipeline.check_inputs` calls it before any compute, and
    an :class:`~ebca_core.processor.EBCAState` built by hand (a stock diffusers pipeline) calls it too.
    """
    if energy is not None:
        energy.validate(num_inference_steps, num_calls, limits)
    for index, edit in enumerate(edits):
        edit.validate(index, num_inference_steps, num_calls, limits)
    check_cacao_normaliser(edits, num_inference_steps, num_calls)


@dataclass(frozen=True)
class InversionConfig:
    """DDIM inversion for real-image editing (docs/EBCA.md, "Tasks", real-image editing).

    ``regularize`` turns on the pix2pix-zero noise regularisation during inversion: an
    auto-correlation term (weight ``lambda_ac``, ``num_ac_rolls`` random rolls) and a KL term (weight
    ``lambda_kl``), applied for ``num_reg_steps`` gradient steps per inversion step.
    """

    regularize: bool = False
    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    num_reg_steps: int = 5
    num_ac_rolls: int = 5

    def validate(self) -> None:
        with contract():
            params.check_number(self.lambda_ac, "inversion.lambda_ac")
            params.check_number(self.lambda_kl, "inversion.lambda_kl")
        for name in ("num_reg_steps", "num_ac_rolls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"must be an integer >= 0, got {value!r}", field=f"inversion.{name}")
