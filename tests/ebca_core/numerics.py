"""The tolerances of the numerical tests, each with the reason it has the size it has.

Why float32 results differ at all: a kernel that reorders a reduction rounds differently. A batch of
two rows picks other matrix-multiply blockings than one row; another CPU (AVX-512 vs AVX2, another
core count) picks other SIMD paths; our explicit attention and PyTorch's fused SDPA sum in other
orders. Each such op is off by a few float32 ulps (eps = 1.2e-7 relative), and a denoising run
compounds that over its steps. Measured: a batch-of-2 image vs its single run differs by 1.3e-5 max
abs on latents whose magnitude reaches 6.9 (relative 1.9e-6 to the norm) on an AMD EPYC, and less on
Intel. So every tolerance here is relative to the norm (or the dynamic range) of the tensor compared,
with margin over what was measured; an absolute 1e-6 on values of magnitude 5 is not a tolerance, it
is a bet on one CPU.

Where a claim holds by construction (the same kernels on the same inputs in the same order: gamma 0
vs stock diffusers, the same call twice) the tests use ``torch.equal`` instead.
"""

from __future__ import annotations

import numpy as np
import torch

#: One cross-attention layer in float32 (a few reordered ops): ~10 ulps, measured below 1e-6.
LAYER_RTOL = 1e-5
#: A whole float32 denoising run (4-20 steps) compared with a differently blocked one: the measured
#: worst is 1.9e-6; 1e-4 leaves 50x for other CPUs and deeper runs, and is still far below the
#: difference of two seeds (~1) or of a real change of settings (> 1e-3).
RUN_RTOL = 1e-4
#: Float64 results of mathematically equal formulas (closed form vs autograd): ~1e-15 per op.
FLOAT64_RTOL = 1e-8
#: Decoded images in [0, 1]: at most one step of an 8-bit channel, the resolution of a saved PNG.
PIXEL_ATOL = 1 / 255


def rel_diff(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms), computed in float64."""
    a = torch.as_tensor(np.asarray(actual) if isinstance(actual, np.ndarray) else actual).double()
    b = torch.as_tensor(np.asarray(expected) if isinstance(expected, np.ndarray) else expected).double()
    return float((a - b).norm() / b.norm())


def max_pixel_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference of two images in [0, 1] (compare with :data:`PIXEL_ATOL`)."""
    return float(np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)).max())
