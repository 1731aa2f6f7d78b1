"""Measure the trained shapes model with the detector: VAE round trip and prompt following.

    python -m ebca_shapes.evaluate --model models/shapes --steps 10 20 30 --guidance 3 5 7.5

- ``vae``: detector accuracy on ground-truth images after encode -> decode through the model's VAE
  (an upper bound for anything the diffusion model can draw).
- ``grid``: for every (steps, guidance) pair, the share of single-object prompts whose object is
  detected with its colour and shape, and the share of two-object prompts with both objects. This
  is how the sampler defaults in ``ebca_defaults.json`` were chosen.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ebca_shapes.data import COLOURS, SHAPES, caption_for, make_sample, to_array
from ebca_shapes.detector import detect, match

SINGLE_PROMPTS: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]
# Held-out pairs for sampler tuning; the benchmark's prompt list is separate (benchmarks/).
PAIR_PROMPTS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("blue", "circle"), ("green", "triangle")),
    (("yellow", "square"), ("blue", "circle")),
    (("red", "triangle"), ("green", "square")),
    (("green", "circle"), ("red", "square")),
    (("yellow", "triangle"), ("red", "square")),
    (("blue", "square"), ("green", "circle")),
]


def load_defaults(model: str | Path) -> dict[str, float]:
    path = Path(model) / "ebca_defaults.json"
    return json.loads(path.read_text()) if path.exists() else {}


def success_rate(
    pipe: object,
    prompts: Sequence[Sequence[tuple[str, str]]],
    seeds: int,
    steps: int,
    guidance: float,
    seed: int = 0,
) -> float:
    """Share of images (``seeds`` per prompt) where every prompted object is detected."""
    hits = total = 0
    for objects in prompts:
        out = pipe.generate(  # type: ignore[attr-defined]
            prompt=caption_for(objects),
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images=seeds,
            seed=seed,
        )
        for image in out.images:
            hits += match(list(objects), detect(image)).all_found
            total += 1
    return hits / total


@torch.no_grad()
def vae_roundtrip(pipe: object, n: int = 500, seed: int = 1) -> dict[str, float]:
    """Detector exact-caption accuracy and pixel MSE after encode -> decode of ``n`` samples."""
    vae = pipe.vae  # type: ignore[attr-defined]
    samples = [make_sample(seed, i) for i in range(n)]
    x = torch.from_numpy(np.stack([to_array(s.image) for s in samples])).permute(0, 3, 1, 2)
    x = x.float().div(127.5).sub(1.0)
    exact = 0
    mse = 0.0
    for start in range(0, n, 100):
        batch = x[start : start + 100]
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        mse += float(((recon - batch) ** 2).sum() / batch[0].numel())
        pixels = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for s, img in zip(samples[start : start + 100], pixels, strict=True):
            exact += match([o.label for o in s.objects], detect(Image.fromarray(img))).exact
    return {"samples": n, "exact_caption_accuracy": exact / n, "pixel_mse": mse / n}


def main(argv: list[str] | None = None) -> None:
    from ebca_core import load_pipeline

    parser = argparse.ArgumentParser(description="evaluate the shapes model with the detector")
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    report: dict[str, object] = {"model": args.model, "scheduler": pipe.scheduler_name}
    report["vae"] = vae_roundtrip(pipe)
    print("vae round trip", report["vae"], flush=True)
    grid = []
    singles = [[p] for p in SINGLE_PROMPTS]
    for steps in args.steps:
        for guidance in args.guidance:
            t0 = time.time()
            one = success_rate(pipe, singles, args.seeds, steps, guidance, seed=500)
            two = success_rate(pipe, PAIR_PROMPTS, args.seeds, steps, guidance, seed=500)
            row = {"steps": steps, "guidance": guidance, "single": one, "pair": two}
            row["seconds"] = round(time.time() - t0, 1)
            grid.append(row)
            print(row, flush=True)
    report["grid"] = grid
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
