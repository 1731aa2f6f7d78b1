"""ebca_core: Stable Diffusion with energy-based cross-attention (EBCA, Park et al., NeurIPS 2023).

Usable on its own as a library (torch + diffusers + transformers only)::

    import torch
    from ebca_core import EnergyConfig, load_pipeline

    pipe = load_pipeline("path/to/diffusers-dir", device="cpu", dtype=torch.float32)
    out = pipe.generate(prompt="a cat and a dog", seed=0, energy=EnergyConfig(0.01, 0.02))
"""

from __future__ import annotations

from ebca_core.config import EditorialPrompt, EnergyConfig, InversionConfig
from ebca_core.errors import EBCAError, InvalidInputError, ModelLoadError, ModelNotFoundError
from ebca_core.loading import SCHEDULERS, load_pipeline
from ebca_core.pipeline import EBCAOutput, EBCAPipeline
from ebca_core.schedules import Schedule

__all__ = [
    "SCHEDULERS",
    "EBCAError",
    "EBCAOutput",
    "EBCAPipeline",
    "EditorialPrompt",
    "EnergyConfig",
    "InvalidInputError",
    "InversionConfig",
    "ModelLoadError",
    "ModelNotFoundError",
    "Schedule",
    "load_pipeline",
]
