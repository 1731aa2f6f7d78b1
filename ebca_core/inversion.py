"""DDIM inversion for real-image editing (docs/EBCA.md, "Tasks", real-image editing).

The image latents are walked up the same DDIM timestep grid the editing run later walks down, with the
source prompt and no classifier-free guidance (as pix2pix-zero and EBCA do). Optionally the predicted
noise is regularised at every step towards white Gaussian noise: an auto-correlation penalty over a
pyramid of random spatial rolls and a KL penalty to N(0, 1), each applied for a few gradient steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ebca_core.config import InversionConfig

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autocorrelation_loss(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Squared auto-correlations of each channel map with randomly rolled copies of itself.

    White noise has none at any shift; the map is average-pooled into a pyramid (down to 8x8) so that
    correlations at long ranges are penalised too. ``noise`` is ``[B, C, H, W]``.
    """
    loss = noise.new_zeros(())
    for row in noise:
        for channel in row:
            level = channel[None, None]
            while True:
                shift = int(torch.randint(1, max(2, level.shape[-1] // 2 + 1), (1,), generator=generator))
                loss = loss + (level * torch.roll(level, shifts=shift, dims=2)).mean() ** 2
                loss = loss + (level * torch.roll(level, shifts=shift, dims=3)).mean() ** 2
                if min(level.shape[-2:]) <= 8:
                    break
                level = F.avg_pool2d(level, kernel_size=2)
    return loss


def kl_to_standard_normal(noise: torch.Tensor) -> torch.Tensor:
    """KL-style penalty pulling each row's empirical mean to 0 and variance to 1."""
    flat = noise.flatten(1)
    mean, var = flat.mean(dim=1), flat.var(dim=1)
    return (mean**2 + var - 1 - torch.log(var + 1e-7)).sum()


def regularize_noise(
    noise: torch.Tensor, config: InversionConfig, generator: torch.Generator
) -> torch.Tensor:
    """Gradient steps on the predicted noise towards white N(0, 1) noise (pix2pix-zero's scheme)."""
    noise = noise.detach().float()
    with torch.enable_grad():
        for _ in range(config.num_reg_steps):
            if config.lambda_ac > 0 and config.num_ac_rolls > 0:
                for _ in range(config.num_ac_rolls):
                    var = noise.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(autocorrelation_loss(var, generator), var)
                    noise = noise - config.lambda_ac * grad / config.num_ac_rolls
            if config.lambda_kl > 0:
                var = noise.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_to_standard_normal(var), var)
                noise = noise - config.lambda_kl * grad
    return noise


@torch.no_grad()
def ddim_invert(
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    predict_noise: NoisePredictor,
    config: InversionConfig,
    prediction_type: str = "epsilon",
    generator_seed: int = 0,
) -> torch.Tensor:
    """Run DDIM backwards from clean ``latents`` to the noise at ``timesteps[0]``.

    ``timesteps`` is the sampling grid (descending, as ``DDIMScheduler.timesteps``). Inversion step k
    goes from the level below ``timesteps[-1-k]`` to that timestep, using the model's prediction at that
    timestep: the exact reverse of the DDIM update that sampling later applies at it, with the model
    evaluated at the less noisy latents (the usual DDIM inversion approximation).
    ``predict_noise(latents, t)`` returns the U-Net output (epsilon or v).
    """
    generator = torch.Generator().manual_seed(generator_seed)
    ascending = timesteps.flip(0)
    previous_levels = [*ascending[:-1].tolist()]
    x = latents
    for k, t in enumerate(ascending):
        # Noise level we are at: the timestep sampling reaches after stepping from t (or the final level).
        alpha_from = final_alpha_cumprod if k == 0 else alphas_cumprod[previous_levels[k - 1]]
        alpha_to = alphas_cumprod[int(t)]
        alpha_from = alpha_from.to(torch.float32)
        alpha_to = alpha_to.to(torch.float32)
        out = predict_noise(x, t).float()
        xf = x.float()
        if prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0 at the level the model believes it sees (alpha_to).
            eps = alpha_to.sqrt() * out + (1 - alpha_to).sqrt() * xf
        elif prediction_type == "epsilon":
            eps = out
        else:
            raise ValueError(
                f"DDIM inversion supports epsilon and v_prediction models, not {prediction_type}"
            )
        if config.regularize:
            eps = regularize_noise(eps, config, generator)
        x0 = (xf - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
        x = (alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps).to(latents.dtype)
    return x
