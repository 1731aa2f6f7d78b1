"""Step-size schedules (docs/EBCA.md, "Step-size schedules")."""

from __future__ import annotations

import pytest

from ebca_core.config import EditorialPrompt, EnergyConfig
from ebca_core.errors import InvalidInputError
from ebca_core.schedules import Schedule, as_schedule


def values(schedule: Schedule, calls: int, steps: int) -> list[float]:
    return [schedule(i, steps) for i in range(calls)]


def test_formulas_use_num_inference_steps_not_the_timestep_count() -> None:
    # PNDM with skip_prk_steps: T + 1 U-Net calls; the switch point is int(T * tau) with T = 10.
    assert values(Schedule.step(2.0, 0.3), 11, 10) == [0.0] * 3 + [2.0] * 8
    assert values(Schedule.reverse_step(2.0, 0.3), 11, 10) == [2.0] * 3 + [0.0] * 8
    assert values(Schedule.reverse_step(0.01, 1.0), 11, 10) == [0.01] * 10 + [0.0]
    assert values(Schedule.constant(0.5), 3, 10) == [0.5] * 3
    assert values(Schedule.linear(1.0, 0.5), 3, 10) == [1.0, 1.5, 2.0]
    assert values(Schedule.exp(1.0, 0.5), 3, 10) == [1.0, 0.5, 0.25]


def test_explicit_schedule_needs_one_value_per_call() -> None:
    sched = Schedule.explicit([0.1, 0.2, 0.3])
    assert values(sched, 3, 2) == [0.1, 0.2, 0.3]
    sched.validate(2, 3, "energy.gamma_attn")
    with pytest.raises(InvalidInputError, match="one value per U-Net call") as err:
        sched.validate(3, 4, "energy.gamma_attn")
    assert err.value.field == "energy.gamma_attn"


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (Schedule.step(1.0, 1.5), "tau"),
        (Schedule.constant(-0.1), "negative"),
        (Schedule.linear(0.1, -0.2), "negative"),
        (Schedule.explicit([0.1, float("nan")]), "finite"),
    ],
)
def test_invalid_schedules_are_rejected(schedule: Schedule, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        schedule.validate(2, 2, "x")


def test_from_kind_and_coercion() -> None:
    assert Schedule.from_kind("step", 0.5, tau=0.2) == Schedule.step(0.5, 0.2)
    assert Schedule.from_kind("exp", 0.5, ratio=0.9) == Schedule.exp(0.5, 0.9)
    with pytest.raises(InvalidInputError) as err:
        Schedule.from_kind("cosine", 0.5)
    assert err.value.field == "schedule.kind"
    assert as_schedule(0.2, "g") == Schedule.constant(0.2)
    assert as_schedule([0.1, 0.2], "g") == Schedule.explicit([0.1, 0.2])
    with pytest.raises(InvalidInputError):
        as_schedule(float("inf"), "g")
    with pytest.raises(InvalidInputError):
        as_schedule("0.1", "g")  # type: ignore[arg-type]


def test_energy_config_validation_names_the_field() -> None:
    with pytest.raises(InvalidInputError) as err:
        EnergyConfig(gamma_attn=-0.01).validate(10)
    assert err.value.field == "energy.gamma_attn"
    with pytest.raises(InvalidInputError) as err:
        EnergyConfig(0.01, 0.01, token_weights={"crown": float("nan")}).validate(10)
    assert err.value.field == "energy.token_weights.crown"


def test_editorial_prompt_defaults_switch_on_at_alpha_tau() -> None:
    edit = EditorialPrompt("monet painting", alpha=1.3, alpha_tau=0.2, gamma_attn=1e-3)
    assert values(edit.alpha_schedule(), 10, 10) == [0.0, 0.0] + [1.3] * 8
    gamma_attn, gamma_norm = edit.gamma_schedules()
    assert values(gamma_attn, 10, 10) == [0.0, 0.0] + [1e-3] * 8  # gamma_tau defaults to alpha_tau
    assert gamma_norm.is_zero(10, 10)
    assert edit.sign == 1.0 and EditorialPrompt("boat", direction="not").sign == -1.0
    with pytest.raises(InvalidInputError) as err:
        EditorialPrompt("boat", direction="or").validate(1)  # type: ignore[arg-type]
    assert err.value.field == "edits[1].direction"
    with pytest.raises(InvalidInputError) as err:
        EditorialPrompt("boat", alpha=-1.0).validate(0)
    assert err.value.field == "edits[0].alpha"
