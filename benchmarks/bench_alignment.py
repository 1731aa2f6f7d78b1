"""Semantic-alignment benchmark on the built-in shapes model: vanilla vs EBCA.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_alignment.py --model models/shapes

A fixed set of two-object prompts ("a red circle and a blue square") is generated with the same
seeds under every setting: vanilla (no Bayesian Context Update) and EBCA with a few
(gamma_attn, gamma_norm) pairs, with and without a token weight on the second object's noun
(docs/EBCA.md, "Tasks": multi-concept generation, reverse_step tau = 1, i.e. always on). The
deterministic detector of :mod:`ebca_shapes.detector` scores every image:

- success: every prompted object appears with its colour and shape (extra objects allowed);
- recall of the first / second object of the prompt (concept neglect usually hits one of them);
- colour recall: the prompted colour appears at all, whatever the shape;
- exact: the detected objects are exactly the prompted ones.

Seeds are shared across settings, so differences are paired: the table also counts the images a
setting fixes (vanilla failed, EBCA succeeded) and breaks (the reverse).

Writes results/bench_alignment.json, results/bench_alignment.md and a contact sheet
results/bench_alignment.png (vanilla vs the best EBCA setting, first seed of every prompt).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ebca_core import EnergyConfig, load_pipeline
from ebca_shapes.data import caption_for
from ebca_shapes.detector import detect, match

# Two distinct colours and two distinct shapes per prompt, every colour and shape in both slots.
PROMPTS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("red", "circle"), ("blue", "square")),
    (("blue", "square"), ("yellow", "triangle")),
    (("green", "triangle"), ("red", "circle")),
    (("yellow", "circle"), ("green", "square")),
    (("red", "square"), ("green", "triangle")),
    (("blue", "triangle"), ("yellow", "circle")),
    (("green", "circle"), ("yellow", "square")),
    (("yellow", "triangle"), ("blue", "circle")),
    (("red", "triangle"), ("yellow", "square")),
    (("blue", "circle"), ("red", "triangle")),
    (("green", "square"), ("blue", "triangle")),
    (("yellow", "square"), ("red", "circle")),
]


@dataclass(frozen=True)
class Setting:
    name: str
    gamma_attn: float
    gamma_norm: float
    second_noun_weight: float | None = None

    def energy(self, second_noun: str) -> EnergyConfig | None:
        if self.gamma_attn == 0 and self.gamma_norm == 0 and self.second_noun_weight is None:
            return None
        # Weighted by word: the two nouns of a prompt always differ, so this hits the second noun
        # only, and all of its tokens if the tokenizer splits it (see models/shapes/TRAINING.md).
        weights = {second_noun: self.second_noun_weight} if self.second_noun_weight else None
        return EnergyConfig(self.gamma_attn, self.gamma_norm, token_weights=weights)


def default_settings(gammas: list[float], weights: list[float]) -> list[Setting]:
    settings = [Setting("vanilla", 0.0, 0.0)]
    for g in gammas:
        settings.append(Setting(f"ebca {g:g}/{g:g}", g, g))
        for w in weights:
            settings.append(Setting(f"ebca {g:g}/{g:g} + w{w:g}", g, g, w))
    return settings


def sign_test_p(fixed: int, broken: int) -> float:
    """Two-sided exact sign test on the discordant pairs: is EBCA's fixed/broken split 50/50?"""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    defaults_path = Path(args.model) / "ebca_defaults.json"
    defaults = json.loads(defaults_path.read_text()) if defaults_path.exists() else {}
    steps = args.steps or int(defaults.get("num_inference_steps", 25))
    guidance = args.guidance or float(defaults.get("guidance_scale", 5.0))
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    prompts = PROMPTS[: args.prompts]
    settings = default_settings(args.gammas, args.weights)

    results: list[dict[str, object]] = []
    per_image: dict[str, list[list[bool]]] = {}
    sheets: dict[str, list[Image.Image]] = {}
    t_start = time.time()
    for setting in settings:
        t0 = time.time()
        success = first = second = colour = exact = total = 0
        grid: list[list[bool]] = []
        firsts: list[Image.Image] = []
        for objects in prompts:
            prompt = caption_for(objects)
            out = pipe.generate(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images=args.seeds,
                seed=args.seed,
                energy=setting.energy(objects[1][1]),
            )
            row: list[bool] = []
            for image in out.images:
                found = detect(image)
                m = match(list(objects), found)
                labels = set(m.detected)
                success += m.all_found
                first += objects[0] in labels
                second += objects[1] in labels
                colour += m.colour_found
                exact += m.exact
                total += 1
                row.append(m.all_found)
            grid.append(row)
            firsts.append(out.images[0])
        per_image[setting.name] = grid
        sheets[setting.name] = firsts
        seconds = time.time() - t0
        rate = success / total
        results.append(
            {
                "setting": setting.name,
                "gamma_attn": setting.gamma_attn,
                "gamma_norm": setting.gamma_norm,
                "second_noun_weight": setting.second_noun_weight,
                "images": total,
                "success_rate": rate,
                "success_ci95": _ci95(rate, total),
                "recall_first": first / total,
                "recall_second": second / total,
                "object_recall": (first + second) / (2 * total),
                "colour_recall": colour / (2 * total),
                "exact_rate": exact / total,
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"{setting.name:<22} success {rate:6.1%}  first {first / total:6.1%}  "
            f"second {second / total:6.1%}  colour {colour / (2 * total):6.1%}  ({seconds:.0f}s)",
            flush=True,
        )

    base = per_image["vanilla"]
    for r in results:
        grid = per_image[str(r["setting"])]
        pairs = [
            (b, e) for brow, erow in zip(base, grid, strict=True) for b, e in zip(brow, erow, strict=True)
        ]
        r["fixed_vs_vanilla"] = sum(1 for b, e in pairs if not b and e)
        r["broken_vs_vanilla"] = sum(1 for b, e in pairs if b and not e)
        r["sign_test_p"] = round(sign_test_p(int(r["fixed_vs_vanilla"]), int(r["broken_vs_vanilla"])), 4)
        r["per_prompt_success"] = {
            caption_for(objects): sum(row) / len(row) for objects, row in zip(prompts, grid, strict=True)
        }

    best = max(results[1:], key=lambda r: float(r["success_rate"])) if len(results) > 1 else results[0]
    return {
        "command": args.command,
        "model": str(args.model),
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "scheduler": pipe.scheduler_name,
        "prompts": [caption_for(p) for p in prompts],
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "total_seconds": round(time.time() - t_start, 1),
        "best_setting": best["setting"],
        "results": results,
        "_sheets": (sheets["vanilla"], sheets[str(best["setting"])], str(best["setting"])),
    }


def _p_text(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.3g}"


def write_markdown(report: dict[str, object], path: Path) -> None:
    lines = [
        "# Semantic alignment: vanilla vs EBCA on the shapes model",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{len(report['prompts'])} two-object prompts x {len(report['seeds'])} seeds "
        f"(seeds {report['seeds'][0]}..{report['seeds'][-1]}), {report['num_inference_steps']} "
        f"{report['scheduler']} steps, guidance {report['guidance_scale']}; token weight on the second "
        f"object's noun (by word). Total "
        f"{report['total_seconds']} s on {report['threads']} CPU thread(s).",
        "",
        "| setting | success (both objects) | 95% CI | first obj recall | second obj recall "
        "| colour recall | exact | fixed / broken vs vanilla | sign test p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:  # type: ignore[union-attr]
        lines.append(
            f"| {r['setting']} | {r['success_rate']:.1%} | +-{r['success_ci95']:.1%} | "
            f"{r['recall_first']:.1%} | {r['recall_second']:.1%} | {r['colour_recall']:.1%} | "
            f"{r['exact_rate']:.1%} | {r['fixed_vs_vanilla']} / {r['broken_vs_vanilla']} | "
            f"{_p_text(float(r['sign_test_p']))} |"
        )
    lines += ["", "Per-prompt success rate:", ""]
    results = report["results"]  # type: ignore[assignment]
    header = "| prompt | " + " | ".join(str(r["setting"]) for r in results) + " |"
    lines += [header, "|---" * (len(results) + 1) + "|"]
    for prompt in report["prompts"]:  # type: ignore[union-attr]
        cells = " | ".join(f"{r['per_prompt_success'][prompt]:.0%}" for r in results)
        lines.append(f"| {prompt} | {cells} |")
    path.write_text("\n".join(lines) + "\n")


def write_sheet(vanilla: list[Image.Image], ebca: list[Image.Image], path: Path, scale: int = 3) -> None:
    """Two rows: vanilla and the best EBCA setting, first seed of every prompt, upscaled."""
    w, h = vanilla[0].size
    sheet = Image.new("RGB", (len(vanilla) * w * scale, 2 * h * scale + 2), (128, 128, 128))
    for i, (a, b) in enumerate(zip(vanilla, ebca, strict=True)):
        sheet.paste(a.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, 0))
        sheet.paste(
            b.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, h * scale + 2)
        )
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vanilla vs EBCA semantic alignment on the shapes model")
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt (seeds seed..seed+N-1)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=0, help="0: the model's ebca_defaults.json")
    parser.add_argument("--guidance", type=float, default=0.0, help="0: the model's ebca_defaults.json")
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument(
        "--weights", type=float, nargs="*", default=[2.5], help="token weights on the second noun"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/bench_alignment"))
    args = parser.parse_args(argv)
    args.command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_alignment.py " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    report = run(args)
    vanilla, ebca, _ = report.pop("_sheets")  # type: ignore[misc]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    write_sheet(vanilla, ebca, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
