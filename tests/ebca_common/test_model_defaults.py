"""A model's ebca_defaults.json fills the request fields a client leaves null."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ebca_common.errors import ValidationFailed
from ebca_common.model_defaults import (
    BUILTIN_DEFAULTS,
    PAPER_EDIT_DEFAULTS,
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


def test_edit_defaults_are_typed_per_mode_and_direction_and_sd_keeps_the_papers_values() -> None:
    paper = BUILTIN_DEFAULTS.edit
    assert paper == PAPER_EDIT_DEFAULTS
    assert (paper.real.and_.alpha, paper.real.not_.alpha, paper.real.and_.alpha_tau) == (0.75, 0.65, 0.3)
    assert (paper.synthetic.and_.alpha, paper.synthetic.and_.alpha_tau) == (1.3, 0.2)
    # The JSON shape the web page reads: {"synthetic": {"and": {...}, "not": {...}}, "real": {...}}.
    dumped = BUILTIN_DEFAULTS.model_dump(mode="json")["edit"]
    assert set(dumped) == {"synthetic", "real"}
    assert dumped["real"]["not"] == {"alpha": 0.65, "alpha_tau": 0.3, "gamma_attn": 5e-4}
    # The shipped model has its own block, read as written in its file.
    raw = json.loads((SHAPES / "ebca_defaults.json").read_text())["edit"]
    assert read_model_defaults(str(SHAPES)).model_dump(mode="json")["edit"] == raw


@pytest.mark.parametrize(
    "edit",
    [
        {"real": {"and": {"alpha": 1.0, "alpha_tau": 0.0}}},  # a mode without "not", no synthetic
        {
            "real": {"and": {"alpha": 1, "alpha_tau": 0}, "not": {"alpha": 1.2, "alpha_tau": 0}},
            "synthetic": {"and": {"alpha": 1, "alpha_tau": 0}, "not": {"alpha": 0.5, "alpha_tau": 0}},
        },  # a lone "not" at alpha 1.2 would always be refused
    ],
)
def test_an_unusable_edit_block_falls_back_to_the_builtin_defaults(
    tmp_path: Path, edit: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ebca_defaults.json").write_text(json.dumps({"num_inference_steps": 9, "edit": edit}))
    with caplog.at_level(logging.WARNING, logger="ebca.models"):
        assert read_model_defaults(str(tmp_path)) == BUILTIN_DEFAULTS
    assert "edit" in caplog.text


def test_fill_defaults_fills_null_edit_settings_by_mode_and_direction() -> None:
    real = parse_edit(
        {
            "mode": "real",
            "source_prompt": "a red circle",
            "edits": [
                {"prompt": "a blue circle"},
                {"prompt": "a red circle", "direction": "not", "alpha": 0.3},
            ],
        }
    )
    filled = fill_defaults(real, BUILTIN_DEFAULTS, (32, 32), edit_mode="real")
    first, second = filled.edits
    assert (first.alpha, first.alpha_tau, first.gamma_attn) == (0.75, 0.3, 5e-4)
    assert (second.alpha, second.alpha_tau, second.gamma_attn) == (0.3, 0.3, 5e-4)  # given alpha kept
    synthetic = parse_generate(
        {"prompt": "a red circle", "edits": [{"prompt": "a blue circle", "alpha_tau": 0.5}]}
    )
    (edit,) = fill_defaults(synthetic, BUILTIN_DEFAULTS, (32, 32), edit_mode="synthetic").edits
    assert (edit.alpha, edit.alpha_tau, edit.gamma_attn) == (1.3, 0.5, 0.0)
    # Without a mode (inpainting has no edits) nothing of the edits changes.
    (untouched,) = fill_defaults(synthetic, BUILTIN_DEFAULTS, (32, 32)).edits
    assert (untouched.alpha, untouched.gamma_attn) == (None, None)


def test_the_api_leaves_the_normaliser_of_null_alphas_to_the_worker() -> None:
    # Two "not" prompts at the default 0.65 would be refused, but only the worker knows the default;
    # explicit values are still checked at submission.
    check_cacao_normaliser([EditSpec(prompt="a", direction="not"), EditSpec(prompt="b", direction="not")], 20)
    with pytest.raises(ValidationFailed) as caught:
        check_cacao_normaliser([EditSpec(prompt="a", direction="not", alpha=1.5, alpha_tau=0.0)], 20)
    assert caught.value.field == "edits"
    # A given "not" alpha that is refused whenever it switches on (a default alpha_tau is < 1).
    with pytest.raises(ValidationFailed, match="once every prompt is on"):
        check_cacao_normaliser([EditSpec(prompt="a", direction="not", alpha=1.5)], None)
    # A null "and" alpha could outweigh it: no verdict before the defaults are known.
    check_cacao_normaliser([EditSpec(prompt="a", direction="not", alpha=1.5), EditSpec(prompt="b")], None)
