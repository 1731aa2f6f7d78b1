"""Step-size schedules for BCU gammas and CACAO alphas (docs/EBCA.md, "Step-size schedules").

A schedule is evaluated at ``i``, the index of the U-Net call inside ``scheduler.timesteps`` (0 = the
noisiest step), with ``T = num_inference_steps``. Note that ``scheduler.timesteps`` may hold more than
``T`` entries (PNDM with ``skip_prk_steps`` has ``T + 1``), so every formula is defined for any ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ebca_common import params
from ebca_core.errors import InvalidInputError, contract

ScheduleKind = Literal["constant", "step", "reverse_step", "linear", "exp", "explicit"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "step", "reverse_step", "linear", "exp", "explicit")


@dataclass(frozen=True)
class Schedule:
    """A step-size schedule. Build one with the class methods; call it as ``schedule(i, T)``."""

    kind: ScheduleKind
    value: float = 0.0
    tau: float = 1.0
    ratio: float = 0.0
    values: tuple[float, ...] = ()

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls("constant", float(value))

    @classmethod
    def step(cls, value: float, tau: float) -> Schedule:
        """0 for ``i < int(T * tau)``, then ``value`` (switches on late)."""
        return cls("step", float(value), tau=float(tau))

    @classmethod
    def reverse_step(cls, value: float, tau: float = 1.0) -> Schedule:
        """``value`` for ``i < int(T * tau)``, then 0 (switches off; tau = 1 keeps it on)."""
        return cls("reverse_step", float(value), tau=float(tau))

    @classmethod
    def linear(cls, value: float, ratio: float) -> Schedule:
        return cls("linear", float(value), ratio=float(ratio))

    @classmethod
    def exp(cls, value: float, ratio: float) -> Schedule:
        return cls("exp", float(value), ratio=float(ratio))

    @classmethod
    def explicit(cls, values: Sequence[float]) -> Schedule:
        """One value per U-Net call (``len(scheduler.timesteps)`` values)."""
        return cls("explicit", values=tuple(float(v) for v in values))

    @classmethod
    def from_kind(cls, kind: str, value: float, tau: float = 1.0, ratio: float = 0.0) -> Schedule:
        """Build a schedule from its name, as the REST API and the CLI describe it."""
        if kind == "constant":
            return cls.constant(value)
        if kind in ("step", "reverse_step"):
            return cls.step(value, tau) if kind == "step" else cls.reverse_step(value, tau)
        if kind in ("linear", "exp"):
            return cls.linear(value, ratio) if kind == "linear" else cls.exp(value, ratio)
        raise InvalidInputError(
            f"unknown schedule kind {kind!r}; expected one of {', '.join(params.SCHEDULE_KINDS)}",
            field="schedule.kind",
        )

    # --- evaluation ---------------------------------------------------------------------------
    def __call__(self, i: int, num_inference_steps: int) -> float:
        if self.kind != "explicit":
            return params.schedule_value(self.kind, self.value, self.tau, self.ratio, i, num_inference_steps)
        if i >= len(self.values):
            raise InvalidInputError(
                f"explicit schedule has {len(self.values)} values but step {i} was requested"
            )
        return self.values[i]

    def is_zero(self, num_calls: int, num_inference_steps: int) -> bool:
        return all(self(i, num_inference_steps) == 0.0 for i in range(num_calls))

    def validate(
        self,
        num_inference_steps: int,
        num_calls: int,
        field: str,
        *,
        allow_negative: bool = False,
    ) -> None:
        """Check the schedule is usable for a run with ``num_calls`` U-Net calls; raise otherwise."""
        with contract():
            if self.kind in ("step", "reverse_step"):
                params.check_fraction(self.tau, f"{field}.tau")
            if self.kind == "explicit" and len(self.values) != num_calls:
                raise InvalidInputError(
                    f"explicit schedule needs one value per U-Net call ({num_calls}), got {len(self.values)}",
                    field=field,
                )
            params.check_schedule_values(
                lambda i: self(i, num_inference_steps), num_calls, field, allow_negative=allow_negative
            )


def as_schedule(value: float | Schedule | Sequence[float], field: str) -> Schedule:
    """Coerce a user value into a Schedule: a number is constant, a list is explicit."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise InvalidInputError("expected a number, a Schedule or a list of numbers, got a bool", field)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidInputError(f"must be finite, got {value}", field=field)
        return Schedule.constant(float(value))
    if isinstance(value, Sequence) and not isinstance(value, str):
        try:
            return Schedule.explicit([float(v) for v in value])
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("explicit schedule values must be numbers", field=field) from exc
    raise InvalidInputError(
        f"expected a number, a Schedule or a list of numbers, got {type(value).__name__}", field=field
    )
