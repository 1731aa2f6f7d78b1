"""Model loading, scheduler selection and the generated tiny models (issue 2, "Model loading")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ebca_core import (
    SCHEDULERS,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    load_pipeline,
)
from ebca_core.testing import build_tiny_model


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert tree_bytes(again) == tree_bytes(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert tree_bytes(other)[name] != tree_bytes(tiny_model_dir)[name]
    # Weights in safetensors only (no pickles), a model_index.json for StableDiffusionPipeline.
    files = tree_bytes(tiny_model_dir)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt"))]
    assert json.loads(files["model_index.json"])["_class_name"] == "StableDiffusionPipeline"


def test_loads_each_layout(
    tiny_model_dir: Path, tiny_sd2_model_dir: Path, tiny_inpaint_model_dir: Path
) -> None:
    sd1 = load_pipeline(tiny_model_dir)
    assert not sd1.is_inpainting and sd1.scheduler_name == "pndm" and sd1.default_size == (32, 32)
    assert sd1.unet.dtype == torch.float32 and sd1.unet.device.type == "cpu"
    sd2 = load_pipeline(tiny_sd2_model_dir)
    assert sd2.scheduler_name == "ddim" and sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection
    inpaint = load_pipeline(tiny_inpaint_model_dir)
    assert inpaint.is_inpainting and inpaint.unet.config.in_channels == 9
    index = json.loads((tiny_inpaint_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"


def test_inpainting_is_detected_from_the_unet_not_the_pipeline_class(
    tmp_path: Path, tiny_inpaint_model_dir: Path
) -> None:
    copy = Path(shutil.copytree(tiny_inpaint_model_dir, tmp_path / "relabelled"))
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    assert load_pipeline(copy).is_inpainting


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_generates(tiny_model_dir: Path, name: str) -> None:
    pipe = load_pipeline(tiny_model_dir, scheduler=name)
    assert pipe.scheduler_name == name
    out = pipe.generate("a red circle", num_inference_steps=3, seed=0, output_type="np")
    assert np.isfinite(out.images).all()


def test_unknown_scheduler_is_an_input_error(tiny_model_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown scheduler 'karras'") as info:
        load_pipeline(tiny_model_dir, scheduler="karras")
    assert info.value.field == "scheduler"
    pipe = load_pipeline(tiny_model_dir)
    with pytest.raises(InvalidInputError) as info:
        pipe.set_scheduler("karras")
    assert info.value.field == "scheduler"
    assert pipe.scheduler_name == "pndm", "a rejected scheduler leaves the pipeline as it was"


def test_missing_directory_names_the_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_pipeline(str(missing))
    assert str(missing) in str(info.value)


def test_hub_id_offline_says_what_to_do() -> None:
    model = "ebca-test-org/definitely-not-a-cached-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(model, local_files_only=True)
    message = str(info.value)
    assert model in message and "download" in message


def test_directory_that_is_not_a_diffusers_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(empty)
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_pipeline(broken)
    no_unet = Path(shutil.copytree(tiny_model_dir, tmp_path / "no-unet"))
    index = json.loads((no_unet / "model_index.json").read_text())
    del index["unet"]
    (no_unet / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks unet"):
        load_pipeline(no_unet)


def test_load_in_half_precision(tiny_model_dir: Path) -> None:
    pipe = load_pipeline(tiny_model_dir, dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
