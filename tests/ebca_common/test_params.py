"""The parameter contract's rules (ebca_common.params), each written once and used by both sides."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ebca_common import params
from ebca_common.params import REST_LIMITS, ParameterError


def refusal(fn, *args, **kwargs) -> ParameterError:
    with pytest.raises(ParameterError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("key", "index"),
    [("0", 0), ("5", 5), ("123456", 123456), (7, 7), ("cat", None), ("5x", None), ("\u00b2", None)],
)
def test_one_digit_key_rule(key: object, index: int | None) -> None:
    assert params.token_index(key) == index


@pytest.mark.parametrize(
    ("key", "weight", "reason"),
    [
        (" 5", 1.0, "one word"),  # ebca_core used to strip this into index 5; the api refused it
        ("two words", 1.0, "one word"),
        ("", 1.0, "one word"),
        ("9" * 7, 1.0, "7 digits"),
        (-1, 1.0, ">= 0"),
        (True, 1.0, "token indices or words"),
        ("cat", 0.0, "> 0"),
        ("cat", float("nan"), "finite"),
    ],
)
def test_token_weight_refusals_name_the_field(key: object, weight: float, reason: str) -> None:
    err = refusal(params.check_token_weight, key, weight, "energy.token_weights")
    assert err.field == "energy.token_weights" and reason in err.reason


def test_token_key_converts_without_checking() -> None:
    assert params.token_key("5") == 5 and params.token_key("cat") == "cat"
    assert params.token_key("9" * 5000) == "9" * 5000  # left for check_token_weight to refuse


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_blank_prompts_are_refused(value: str) -> None:
    assert refusal(params.check_prompt, value, "prompt").field == "prompt"


def test_prompt_length_follows_the_limits() -> None:
    params.check_prompt("x" * 5000, "prompt")  # the library's own: unbounded
    err = refusal(params.check_prompt, "x" * 1001, "prompt", REST_LIMITS)
    assert "1000" in err.reason


def test_schedule_formulas_switch_at_int_t_tau() -> None:
    values = [params.schedule_value("step", 2.0, 0.3, 0.0, i, 10) for i in range(11)]
    assert values == [0.0] * 3 + [2.0] * 8
    values = [params.schedule_value("reverse_step", 2.0, 0.3, 0.0, i, 10) for i in range(11)]
    assert values == [2.0] * 3 + [0.0] * 8
    assert params.schedule_value("linear", 1.0, 1.0, 0.5, 2, 10) == 2.0
    assert params.schedule_value("exp", 1.0, 1.0, 0.5, 2, 10) == 0.25
    assert params.default_ratio("exp") == 1.0 and params.default_ratio("linear") == 0.0


@pytest.mark.parametrize(
    ("ratio", "reason"), [(-0.01, "negative"), (1e200, "overflows"), (float("inf"), "not finite")]
)
def test_schedule_values_must_stay_finite_and_not_negative(ratio: float, reason: str) -> None:
    kind = "linear" if ratio < 0 else "exp"
    err = refusal(
        params.check_schedule_values,
        lambda i: params.schedule_value(kind, 0.01, 1.0, ratio, i, 5),
        5,
        "energy.gamma_attn",
    )
    assert err.field == "energy.gamma_attn" and reason in err.reason


def test_cacao_normaliser_names_the_first_bad_stage() -> None:
    params.check_cacao_normaliser([("at step 0", [("and", 1.0), ("not", 1.5)])])  # 0.5 > 0
    err = refusal(
        params.check_cacao_normaliser,
        [("at step 0", [("not", 0.5)]), ("at step 1", [("not", 1.0)]), ("at step 2", [("not", 2.0)])],
    )
    assert err.field == "edits" and "at step 1" in err.reason and "is 0 " in err.reason


def test_seed_range_counts_every_image() -> None:
    params.check_seed(2**32 - 2, 2, REST_LIMITS)
    err = refusal(params.check_seed, 2**32 - 1, 2, REST_LIMITS)
    assert err.field == "seed" and str(2**32 - 2) in err.reason


def test_unet_calls_count_pndms_extra_call() -> None:
    assert params.unet_calls("ddim", 10) == 10
    assert params.unet_calls("pndm", 10) == params.unet_calls(None, 10) == 11


def test_the_contract_and_the_intake_import_nothing_of_the_service() -> None:
    """ebca_core imports these modules: they must not pull in pydantic, Redis or the settings."""
    code = (
        "import sys, ebca_common.params, ebca_common.intake\n"
        "heavy = ('pydantic', 'redis', 'ebca_common.settings', 'ebca_common.specs', 'torch')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
