"""Train the built-in "shapes" Stable-Diffusion-shaped model from scratch on CPU.

    python -m ebca_shapes.train --out models/shapes --seed 0 --vae-steps 600 --steps 4000

Three phases, all on the procedural data set of :mod:`ebca_shapes.data`:

1. AutoencoderKL (32x32 RGB -> 16x16x4 latents): reconstruction MSE plus a tiny KL term, so the
   latents stay close to a deterministic code (the colours and the edges must survive the round trip).
2. The latents of the whole training pool are encoded once (posterior mean) and their standard
   deviation sets ``vae.config.scaling_factor`` = 1/std, so the diffusion model sees unit-variance
   latents exactly as SD does with 0.18215.
3. UNet2DConditionModel (cross-attention at 16x16 and 8x8) and the 2-layer CLIP text encoder are
   trained jointly on epsilon prediction with SD's scaled-linear DDPM schedule (1000 steps,
   0.00085..0.012), min-SNR-5 loss weighting (converges several times faster than the plain MSE at
   this budget) and 10% caption dropout (the empty prompt) so classifier-free guidance works.
   An exponential moving average of the weights is what gets saved.

The output directory is a standard diffusers StableDiffusionPipeline directory (safetensors,
DDIM scheduler config, no safety checker). A checkpoint of the EMA weights is written every
``--checkpoint-minutes`` so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ebca_core.testing import write_word_tokenizer
from ebca_shapes.data import IMAGE_SIZE, VOCABULARY, make_sample, to_array

MODEL_MAX_LENGTH = 16  # tokens incl. start/end; the longest caption needs 9
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    pool: int = 30_000
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    steps: int = 4000
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_minutes: float = 5.0
    threads: int = 1
    log_every: int = 50
    max_minutes: float | None = None  # safety cap on the UNet phase; stops early with a checkpoint


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        # No self-attention in the VAE: shapes are local and it costs most of the VAE's CPU time.
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        # Cross-attention at 8x8 and 4x4 latents (+ the mid block): one attention cell covers 4x4
        # image pixels, enough to place 8-16 px objects; attention at 16x16 would cost 1.5-2x the
        # CPU time per step for little gain at this training budget.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=16,
    )


def make_pool(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    images = np.stack([to_array(make_sample(seed, i).image) for i in range(n)])
    captions = [make_sample(seed, i).caption for i in range(n)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, captions


def _log(path: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


def train_vae(cfg: TrainConfig, pool: torch.Tensor, log: Path) -> tuple[AutoencoderKL, float]:
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_ema = None
    for step in range(cfg.vae_steps):
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(pool), (cfg.vae_batch,), generator=gen)
        x = pool[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        # Tiny KL weight: keeps the posterior variance bounded without blurring colours or edges.
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        loss_ema = rec.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * rec.item()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            _log(log, f"vae step {step} rec_mse {rec.item():.5f} (ema {loss_ema:.5f}) kl {kl.item():.3f}")
    vae.eval()
    return vae, float(loss_ema or 0.0)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pool: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([vae.encode(pool[i : i + batch]).latent_dist.mean for i in range(0, len(pool), batch)])


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> None:
    """Write a complete diffusers directory to ``out`` atomically (via a sibling temp directory)."""
    from diffusers import StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Keep the hand-written files (TRAINING.md, ebca_defaults.json) that live next to the weights.
    if out.exists():
        for extra in out.iterdir():
            if extra.is_file() and not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and EMA weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train(cfg: TrainConfig) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    log = cfg.out.parent / f"{cfg.out.name}.train.log"
    t0 = time.time()
    _log(log, f"config {cfg}")

    tok_dir = cfg.out.with_name(cfg.out.name + ".tokenizer")
    write_word_tokenizer(tok_dir, VOCABULARY, model_max_length=MODEL_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir, ignore_errors=True)

    pool, captions = make_pool(cfg.seed, cfg.pool)
    _log(log, f"pool of {len(pool)} samples built in {time.time() - t0:.1f}s")

    t_vae = time.time()
    vae, vae_loss = train_vae(cfg, pool, log)
    vae_minutes = (time.time() - t_vae) / 60
    vae.save_pretrained(cfg.out / "vae")  # inspectable before the long phase starts
    latents = encode_pool(vae, pool)
    std = latents.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = latents / std
    _log(log, f"latents {tuple(latents.shape)} std {std:.4f} mean {latents.mean().item():.4f}")

    ids = tokenizer(
        captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt"
    ).input_ids

    torch.manual_seed(cfg.seed + 2)
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters())
    _log(log, f"unet {n_params[0] / 1e6:.2f}M params, text encoder {n_params[1] / 1e6:.2f}M params")
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = Ema([unet, text_encoder], cfg.ema_decay)
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    gen = torch.Generator().manual_seed(cfg.seed + 3)

    def checkpoint() -> None:
        ema.swap()
        save_pipeline(cfg.out, vae, text_encoder, tokenizer, unet)
        ema.swap()

    t_unet = time.time()
    last_ckpt = time.time()
    loss_ema = None
    completed = cfg.steps
    for step in range(cfg.steps):
        if step < cfg.warmup:
            lr = cfg.lr * (step + 1) / cfg.warmup
        else:
            progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        z0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        batch_ids[drop] = empty_ids
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (cfg.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        context = text_encoder(batch_ids)[0]
        pred = unet(zt, t, encoder_hidden_states=context).sample
        # min-SNR-gamma weighting for epsilon prediction: w = min(snr, gamma) / snr.
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        mse = per_sample.mean().item()
        loss_ema = mse if loss_ema is None else 0.98 * loss_ema + 0.02 * mse
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rate = (step + 1) / (time.time() - t_unet)
            _log(
                log,
                f"unet step {step} loss {loss.item():.4f} eps_mse {mse:.4f} (ema {loss_ema:.4f}) "
                f"lr {lr:.2e} {rate:.2f} steps/s",
            )
        if cfg.max_minutes is not None and time.time() - t_unet > cfg.max_minutes * 60:
            _log(log, f"stopping early at step {step + 1}: --max-minutes {cfg.max_minutes} reached")
            completed = step + 1
            break
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
            _log(log, f"checkpoint at step {step + 1} -> {cfg.out}")
    checkpoint()
    stats = {
        "vae_steps": cfg.vae_steps,
        "vae_batch": cfg.vae_batch,
        "vae_rec_mse": vae_loss,
        "vae_minutes": vae_minutes,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "steps": completed,
        "planned_steps": cfg.steps,
        "batch": cfg.batch,
        "final_eps_mse_ema": float(loss_ema or 0.0),
        "unet_minutes": (time.time() - t_unet) / 60,
        "total_minutes": (time.time() - t0) / 60,
        "unet_params": n_params[0],
        "text_encoder_params": n_params[1],
        "threads": cfg.threads,
        "seed": cfg.seed,
    }
    (cfg.out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _log(log, f"done {stats}")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=TrainConfig.pool, help="distinct training samples")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--vae-batch", type=int, default=TrainConfig.vae_batch)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="UNet/text-encoder steps")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--checkpoint-minutes", type=float, default=TrainConfig.checkpoint_minutes)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--max-minutes", type=float, default=None, help="cap on the UNet phase")
    args = parser.parse_args(argv)
    train(
        TrainConfig(
            out=args.out,
            seed=args.seed,
            pool=args.pool,
            vae_steps=args.vae_steps,
            vae_batch=args.vae_batch,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            checkpoint_minutes=args.checkpoint_minutes,
            threads=args.threads,
            max_minutes=args.max_minutes,
        )
    )


if __name__ == "__main__":
    main()
