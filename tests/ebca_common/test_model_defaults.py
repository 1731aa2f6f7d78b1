"""A model's ebca_defaults.json fills the request fields a client leaves null."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ebca_common.errors import ValidationFailed
from ebca_common.model_defaults import (
    BUILTIN_DEFAULTS,
    ModelDefaults,
    configured_defaults,
    fill_defaults,
    read_model_defaults,
)
from ebca_common.settings import REPO_ROOT, Settings
from ebca_common.specs import EditSpec, check_cacao_normaliser, parse_edit, parse_generate

SHAPES = REPO_ROOT / "models" / "shapes"


def test_the_shipped_model_reads_its_file_and_other_models_the_builtin_defaults(tmp_path: Path) -> None:
    shapes = read_model_defaults(str(SHAPES))
    assert (shapes.steps, shapes.guidance_scale, shapes.scheduler) == (20, 5.0, "ddim")
    assert read_model_defaults(str(tmp_path)) == BUILTIN_DEFAULTS  # no file
    assert read_model_defaults(None) == BUILTIN_DEFAULTS  # a hub id
    assert (BUILTIN_DEFAULTS.steps, BUILTIN_DEFAULTS.guidance_scale, BUILTIN_DEFAULTS.scheduler) == (
        30,
        7.5,
        "ddim",
    )


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"num_inference_steps": 0}), json.dumps({"scheduler": "bogus"})]
)
def test_a_broken_file_falls_back_with_a_warning_naming_it(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ebca_defaults.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="ebca.models"):
        assert read_model_defaults(str(tmp_path)) == BUILTIN_DEFAULTS
    assert "ebca_defaults.json" in caplog.text and "built-in defaults" in caplog.text


def test_configured_defaults_cover_every_model_of_the_table(tmp_path: Path) -> None:
    (tmp_path / "ebca_defaults.json").write_text(json.dumps({"num_inference_steps": 12, "width": 64}))
    settings = Settings(default_model=str(SHAPES), models={"mine": str(tmp_path), "hub": "org/some-model"})
    table = configured_defaults(settings)
    assert table["shapes"].steps == 20
    assert (table["mine"].steps, table["mine"].width, table["mine"].guidance_scale) == (12, 64, 7.5)
    assert table["hub"] == BUILTIN_DEFAULTS


def test_fill_defaults_fills_only_null_fields_the_request_type_has() -> None:
    defaults = ModelDefaults(num_inference_steps=20, guidance_scale=5.0, scheduler="euler", width=64)
    native = (32, 48)  # (height, width)
    filled = fill_defaults(parse_generate({"prompt": "a red circle"}), defaults, native)
    assert (filled.steps, filled.guidance_scale, filled.scheduler) == (20, 5.0, "euler")
    assert (filled.width, filled.height) == (64, 32)  # the file's width, the native height
    given = parse_generate(
        {"prompt": "x", "steps": 7, "guidance_scale": 0.0, "scheduler": "lms", "height": 16}
    )
    kept = fill_defaults(given, defaults, native)
    assert (kept.steps, kept.guidance_scale, kept.scheduler, kept.height) == (7, 0.0, "lms", 16)
    # A real-image edit has no size or scheduler fields (the image and DDIM decide them).
    real = parse_edit({"mode": "real", "source_prompt": "a circle", "edits": [{"prompt": "blue"}]})
    filled_real = fill_defaults(real, defaults, native)
    assert (filled_real.steps, filled_real.guidance_scale) == (20, 5.0)
    assert "scheduler" not in filled_real.model_dump()


def test_the_normaliser_without_steps_checks_every_set_of_prompts_some_step_count_switches_on() -> None:
    def edits(*specs: tuple[str, float, float]) -> list[EditSpec]:
        return [
            EditSpec(prompt=f"edit {i}", direction=d, alpha=a, alpha_tau=t)
            for i, (d, a, t) in enumerate(specs)
        ]

    # "not" 0.8 alone from tau 0.2, the "and" 0.5 only from tau 0.5: 1 - 0.8 > 0 at every step count.
    check_cacao_normaliser(edits(("not", 0.8, 0.2), ("and", 0.5, 0.5)), None)
    # "not" 1.2 before its "and" partner switches on: 1 - 1.2 <= 0 for every step count that
    # separates 0.2 and 0.5 (any count >= 4), so it is refused without knowing the count...
    early_not = edits(("not", 1.2, 0.2), ("and", 0.5, 0.5))
    with pytest.raises(ValidationFailed, match="alpha_tau <= 0.2") as info:
        check_cacao_normaliser(early_not, None)
    assert info.value.field == "edits"
    # ...and with a count that separates them, the exact per-step check refuses it too.
    with pytest.raises(ValidationFailed, match="at step 1"):
        check_cacao_normaliser(early_not, 5)
