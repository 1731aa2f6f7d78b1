from __future__ import annotations

import pytest

from ebca_common.errors import ValidationFailed
from ebca_common.settings import REPO_ROOT, Settings
from ebca_common.specs import (
    EditSpec,
    check_cacao_normaliser,
    check_limits,
    field_path,
    parse_edit,
    parse_generate,
)


def error_of(fn, *args) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        fn(*args)
    return info.value


def test_defaults_are_filled_in() -> None:
    request = parse_generate({"prompt": "a cat"})
    # Sampler settings stay null here: the worker fills them from the model (test_model_defaults.py).
    assert request.steps is None and request.guidance_scale is None and request.scheduler is None
    assert request.output_format == "png" and request.num_images == 1
    assert request.seed is None and request.edits == [] and request.energy is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "energy": {"gamma_norm": float("inf")}}, "energy.gamma_norm"),
        ({"prompt": "x", "edits": [{"prompt": "a"}, {"prompt": ""}]}, "edits[1].prompt"),
        ({"prompt": "x", "edits": [{"prompt": "a", "gamma_tau": 2}]}, "edits[0].gamma_tau"),
        ({"prompt": "x", "energy": {"token_weights": {"cat": -1}}}, "energy.token_weights"),
        ({"prompt": "x", "width": 2056}, "width"),
        ({}, "prompt"),
        ({"prompt": "x", "num_images": True}, "num_images"),
        ({"prompt": "x", "seed": "12"}, "seed"),
        ({"prompt": "x", "energy": {"gamma_attn": 1e308}}, "energy.gamma_attn"),
        ({"prompt": "x", "edits": [{"prompt": "a", "alpha": 11.0}]}, "edits[0].alpha"),
        ({"prompt": "x", "edits": [{"prompt": "a", "gamma_norm": 50.0}]}, "edits[0].gamma_norm"),
    ],
)
def test_generate_errors_name_the_field(body: dict, field: str) -> None:
    err = error_of(parse_generate, body)
    assert err.field == field and err.status_code == 422 and err.message.startswith(field)


def test_edit_mode_dispatch_and_errors() -> None:
    assert (
        parse_edit({"mode": "synthetic", "source_job_id": "j", "edits": [{"prompt": "a"}]}).mode
        == "synthetic"
    )
    assert error_of(parse_edit, {"prompt": "x"}).field == "mode"
    assert error_of(parse_edit, {"mode": 3}).field == "mode"
    assert error_of(parse_edit, {"mode": "real", "source_prompt": "x", "edits": []}).field == "edits"
    err = error_of(parse_edit, {"mode": "inpaint", "prompt": "x", "image_ref": {"job_id": "j", "index": -1}})
    assert err.field == "image_ref.index"


def test_field_path() -> None:
    assert field_path(("edits", 0, "alpha")) == "edits[0].alpha"
    assert field_path(("energy", "schedule", "tau")) == "energy.schedule.tau"


def test_cacao_normaliser_checks_every_step_with_taus() -> None:
    # Final sum is 1 + 1 - 1.5 > 0, but while only the "not" prompt is on (steps 0..4) it is -0.5.
    edits = [
        EditSpec(prompt="a", alpha=1.0, alpha_tau=0.5),
        EditSpec(prompt="b", alpha=1.5, direction="not", alpha_tau=0.0),
    ]
    err = error_of(check_cacao_normaliser, edits, 10)
    assert err.field == "edits" and "step 0" in err.message
    # Swapping the switch points keeps it positive throughout.
    ok = [EditSpec(prompt="a", alpha=1.0), EditSpec(prompt="b", alpha=1.5, direction="not", alpha_tau=0.5)]
    check_cacao_normaliser(ok, 10)


def test_limits_from_settings() -> None:
    settings = Settings(max_images=2, max_edits=1, default_model="models/shapes", models={"x": "/m/x"})
    assert (
        error_of(check_limits, parse_generate({"prompt": "a", "num_images": 3}), settings).field
        == "num_images"
    )
    two_edits = parse_generate({"prompt": "a", "edits": [{"prompt": "b"}, {"prompt": "c"}]})
    assert error_of(check_limits, two_edits, settings).field == "edits"
    assert error_of(check_limits, parse_generate({"prompt": "a", "model": "y"}), settings).field == "model"
    check_limits(parse_generate({"prompt": "a", "model": "x", "num_images": 2}), settings)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EBCA_DEFAULT_MODEL", "EBCA_STORAGE_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EBCA_MODELS", '{"sd15": "runwayml/stable-diffusion-v1-5", "local": "./models/other"}')
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("EBCA_MAX_QUEUE", "7")
    settings = Settings()
    assert settings.aws_access_key_id == "AKIA-test" and settings.aws_region == "eu-west-1"
    assert settings.max_queue == 7
    table = settings.model_table()
    assert table["shapes"] == str(REPO_ROOT / "models" / "shapes")  # the default model is always listed
    assert table["sd15"] == "runwayml/stable-diffusion-v1-5"  # hub ids stay as they are
    assert table["local"] == str(REPO_ROOT / "models" / "other")
    assert settings.default_model_id == "shapes"
    assert Settings(storage_url="var/x").storage_root == str(REPO_ROOT / "var" / "x")
    assert Settings(storage_url="s3://b/p").storage_is_s3


def test_bad_models_setting_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBCA_MODELS", "not json")
    with pytest.raises(ValueError, match="EBCA_MODELS"):
        Settings()


@pytest.mark.parametrize("blank", ["", "   ", "\t\n "])
@pytest.mark.parametrize(
    ("parse", "body", "field"),
    [
        (parse_generate, {"prompt": "{}"}, "prompt"),
        (parse_generate, {"prompt": "a cat", "edits": [{"prompt": "{}"}]}, "edits[0].prompt"),
        # Issue 12: these two passed the api and failed the job in the worker.
        (parse_edit, {"mode": "inpaint", "prompt": "{}"}, "prompt"),
        (
            parse_edit,
            {"mode": "real", "source_prompt": "{}", "edits": [{"prompt": "a dog"}]},
            "source_prompt",
        ),
        (
            parse_edit,
            {"mode": "synthetic", "source_job_id": "j", "edits": [{"prompt": "{}"}]},
            "edits[0].prompt",
        ),
    ],
)
def test_blank_prompts_are_refused_in_every_mode(parse, body: dict, field: str, blank: str) -> None:
    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return blank if value == "{}" else value

    err = error_of(parse, fill(body))
    assert err.field == field and err.status_code == 422
