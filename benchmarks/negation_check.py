"""The negation failure of issue 15, measured: "a red circle and a blue square" with "not a blue square".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/negation_check.py --seeds 8

For each setting of the "not" prompt, synthetic editing (the same seed with the editorial prompt) on
seeds whose plain image shows both objects: how often the square is gone, how often the circle is
kept (red circle, bbox IoU >= 0.5 with the original), and how many red components the detector sees
(the "several red blobs" of the report). The CACAO output is ``(O_main - alpha O_not) / (1 - alpha)``:
at alpha 0.6 that is ``2.5 O_main - 1.5 O_not`` in every pixel, the circle's included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from editing_cases import iou

from ebca_core import EditorialPrompt, load_pipeline
from ebca_shapes.detector import detect

PROMPT = "a red circle and a blue square"
CIRCLE, SQUARE = ("red", "circle"), ("blue", "square")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--seeds", type=int, default=8, help="source images wanted (seeds from 0)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    sources: list[tuple[int, tuple[int, int, int, int]]] = []
    seed = 0
    while len(sources) < args.seeds and seed < 20 * args.seeds:
        found = detect(pipe.generate(prompt=PROMPT, seed=seed, **common).images[0])
        labels = [d.label for d in found]
        if sorted(labels) == sorted([CIRCLE, SQUARE]):
            sources.append((seed, next(d.bbox for d in found if d.label == CIRCLE)))
        seed += 1
    rows = []
    for alpha, tau in ((0.6, 0.0), (0.3, 0.0), (0.6, 0.3), (0.3, 0.3), (0.9, 0.3)):
        gone = kept = blobs = 0
        for seed, box in sources:
            edit = EditorialPrompt("a blue square", alpha=alpha, direction="not", alpha_tau=tau)
            found = detect(pipe.generate(prompt=PROMPT, seed=seed, edits=[edit], **common).images[0])
            gone += SQUARE not in [d.label for d in found]
            kept += any(d.label == CIRCLE and iou(d.bbox, box) >= 0.5 for d in found)
            blobs += sum(d.colour == "red" for d in found) > 1
        n = len(sources)
        rows.append(
            {
                "alpha": alpha,
                "alpha_tau": tau,
                "n": n,
                "square_gone": gone,
                "circle_kept": kept,
                "red_split": blobs,
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
