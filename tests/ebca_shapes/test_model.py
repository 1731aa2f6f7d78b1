"""The shipped built-in model (models/shapes): loads like a real checkpoint and follows prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ebca_core import load_pipeline
from ebca_core.pipeline import EBCAPipeline
from ebca_shapes.data import VOCABULARY
from ebca_shapes.detector import detect
from ebca_shapes.evaluate import SINGLE_PROMPTS, load_defaults, success_rate

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes"

# Measured with the shipped weights and ebca_defaults.json (20 DDIM steps, guidance 5): 24/24 over
# these 12 prompts x 2 seeds, and 35/36 on seeds 500-502 (models/shapes/TRAINING.md). 0.85 allows
# three borderline misses (another torch build or BLAS can flip one) yet fails a model that ignores
# colour or shape (chance for the exact colour + shape is 1/12).
SINGLE_OBJECT_THRESHOLD = 0.85


@pytest.fixture(scope="module")
def pipe() -> EBCAPipeline:
    torch.set_num_threads(1)
    return load_pipeline(MODEL_DIR, device="cpu", dtype=torch.float32)


def test_shipped_model_is_a_small_safetensors_sd_checkpoint() -> None:
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in {".bin", ".ckpt", ".pt"}]
    assert sum(p.stat().st_size for p in files) < 30 * 1024 * 1024


def test_loads_through_load_pipeline(pipe: EBCAPipeline) -> None:
    assert pipe.default_size == (32, 32)
    assert pipe.scheduler_name == "ddim"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # The tokenizer round-trips the language, and a word key of a token weight resolves to that word.
    # ("triangle" is split into 5 sub-word tokens by ebca_core.testing.write_word_tokenizer's merge
    # ranks; the model was trained with that split, see models/shapes/TRAINING.md.)
    for caption in ("a red circle and a blue square", "a yellow triangle and a green circle"):
        ids = pipe.prompt_token_ids(caption)
        assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
        assert pipe.tokenizer.decode(ids, skip_special_tokens=True).strip() == caption
    assert pipe.resolve_token_weights("a red circle and a blue square", {"square": 2.5}, 16) == {7: 2.5}
    for word in VOCABULARY:
        assert pipe.tokenizer(word, add_special_tokens=False).input_ids, word


def test_sampler_defaults_are_published() -> None:
    defaults = load_defaults(MODEL_DIR)
    assert isinstance(defaults["num_inference_steps"], int) and 1 <= defaults["num_inference_steps"] <= 100
    assert 1.0 <= defaults["guidance_scale"] <= 20.0


def test_single_object_prompts_draw_the_requested_object(pipe: EBCAPipeline) -> None:
    defaults = load_defaults(MODEL_DIR)
    rate = success_rate(
        pipe,
        [[p] for p in SINGLE_PROMPTS],
        seeds=2,
        steps=int(defaults["num_inference_steps"]),
        guidance=float(defaults["guidance_scale"]),
        seed=0,
    )
    assert rate >= SINGLE_OBJECT_THRESHOLD, f"only {rate:.0%} of single-object images match their prompt"


def test_guidance_follows_the_text(pipe: EBCAPipeline) -> None:
    # Same seed, different colour words: the detector sees the requested colour each time, so the
    # text (not the noise) decides the colour.
    defaults = load_defaults(MODEL_DIR)
    steps, guidance = int(defaults["num_inference_steps"]), float(defaults["guidance_scale"])
    seen = []
    for colour in ("red", "green", "blue", "yellow"):
        out = pipe.generate(
            prompt=f"a {colour} square", num_inference_steps=steps, guidance_scale=guidance, seed=3
        )
        seen.append({d.colour for d in detect(out.images[0])})
    assert sum(c in s for c, s in zip(("red", "green", "blue", "yellow"), seen, strict=True)) >= 3
