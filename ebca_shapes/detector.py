"""Deterministic detector for the shapes world: colour segmentation + shape classification.

    python -m ebca_shapes.detector --eval --n 2000 --seed 1

1. Colour segmentation. A pixel is foreground when it is bright and saturated enough (the
   background is black; anti-aliased edge pixels below half coverage fall out). Its colour is the
   nearest palette colour after dividing by the brightest channel, so a dimmed edge pixel keeps its
   hue; pixels far from every palette hue (orange, purple, grey, ...) are left unlabelled.
2. Connected components (8-connectivity) per colour; components under ``min_area`` pixels are noise.
3. Shape from the component's pixels inside its bounding box: the fill ratio (square ~1.0, circle
   ~pi/4, upright triangle ~0.5) together with which bbox corners are filled (a square fills all
   four, a triangle only the two bottom ones, a circle none).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from ebca_shapes.data import COLOURS, make_sample, to_array

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_PALETTE_HUES = _PALETTE / _PALETTE.max(axis=1, keepdims=True)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectorConfig:
    min_brightness: float = 100.0  # max channel, 0..255: half of the palette's brightness
    min_saturation: float = 0.4  # (max - min) / max
    max_hue_distance: float = 0.3  # Euclidean distance of max-normalised RGB to the palette hue
    min_area: int = 12  # pixels; the smallest data-set object (an 8 px triangle) covers ~28


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (ends exclusive)
    area: int
    fill: float

    @property
    def label(self) -> tuple[str, str]:
        return (self.colour, self.shape)


def colour_labels(rgb: np.ndarray, config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Per-pixel palette index (0..3) or -1 for background/unrecognised colour. ``rgb``: [H, W, 3]."""
    x = rgb.astype(np.float32)
    hi = x.max(axis=2)
    lo = x.min(axis=2)
    sat = (hi - lo) / np.maximum(hi, 1.0)
    hue = x / np.maximum(hi, 1.0)[..., None]
    dist = np.linalg.norm(hue[:, :, None, :] - _PALETTE_HUES[None, None], axis=3)
    nearest = dist.argmin(axis=2)
    ok = (hi >= config.min_brightness) & (sat >= config.min_saturation)
    ok &= dist.min(axis=2) <= config.max_hue_distance
    return np.where(ok, nearest, -1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name and fill ratio of one component, ``mask`` cropped to its bounding box."""
    h, w = mask.shape
    fill = float(mask.mean())
    k = max(1, round(min(h, w) / 5))  # corner patch side: ~1/5 of the object
    corners = {
        "tl": mask[:k, :k].mean(),
        "tr": mask[:k, -k:].mean(),
        "bl": mask[-k:, :k].mean(),
        "br": mask[-k:, -k:].mean(),
    }
    top = (corners["tl"] + corners["tr"]) / 2
    bottom = (corners["bl"] + corners["br"]) / 2
    if fill >= 0.9 or (fill >= 0.8 and min(corners.values()) >= 0.5):
        return "square", fill
    # An upright triangle: filled base corners, empty top corners, about half the bbox filled.
    if fill < 0.64 or (fill < 0.74 and bottom >= 0.5 and top <= 0.25):
        return "triangle", fill
    return "circle", fill


def detect(image: Image.Image | np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """All objects in ``image``, sorted by position (top to bottom, left to right)."""
    rgb = to_array(image) if isinstance(image, Image.Image) else np.asarray(image)
    labels = colour_labels(rgb, config)
    found: list[Detection] = []
    for ci, colour in enumerate(_PALETTE_NAMES):
        components, n = ndimage.label(labels == ci, structure=_EIGHT)
        for sl, index in zip(ndimage.find_objects(components), range(1, n + 1), strict=True):
            mask = components[sl] == index
            area = int(mask.sum())
            if area < config.min_area:
                continue
            shape, fill = classify_shape(mask)
            bbox = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            found.append(Detection(colour, shape, bbox, area, round(fill, 4)))
    found.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
    return found


@dataclass(frozen=True)
class Match:
    """How the detections of one image compare with the requested ``(colour, shape)`` objects."""

    requested: tuple[tuple[str, str], ...]
    detected: tuple[tuple[str, str], ...]
    found: int  # requested objects matched by a detection with the same colour and shape
    colour_found: int  # requested objects whose colour appears at all (any shape)

    @property
    def all_found(self) -> bool:
        return self.found == len(self.requested)

    @property
    def exact(self) -> bool:
        return Counter(self.requested) == Counter(self.detected)


def match(requested: Sequence[tuple[str, str]], detections: Iterable[Detection]) -> Match:
    detected = tuple(d.label for d in detections)
    found = sum((Counter(requested) & Counter(detected)).values())
    colour_found = sum((Counter(c for c, _ in requested) & Counter(c for c, _ in detected)).values())
    return Match(tuple(requested), detected, found, colour_found)


def degrade(image: Image.Image, noise_std: float, blur: float, rng: np.random.Generator) -> Image.Image:
    """Blur (Gaussian, radius in pixels) then add Gaussian pixel noise (std in 0..255 units).

    Generated images are softer and noisier than the data set; this is how the evaluation checks
    that the detector does not rely on the renderer's exact pixels.
    """
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise_std > 0:
        x = to_array(image).astype(np.float32) + rng.normal(0.0, noise_std, (*image.size[::-1], 3))
        image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    return image


def evaluate(
    n: int = 2000,
    seed: int = 1,
    config: DetectorConfig = DetectorConfig(),
    noise_std: float = 0.0,
    blur: float = 0.0,
) -> dict[str, object]:
    """Object precision/recall and exact-caption accuracy on ``n`` ground-truth samples."""
    tp = n_pred = n_true = exact = 0
    confusion: Counter[tuple[str, str]] = Counter()
    for i in range(n):
        sample = make_sample(seed, i)
        truth = [o.label for o in sample.objects]
        image = degrade(sample.image, noise_std, blur, np.random.default_rng([seed, i, 7]))
        result = match(truth, detect(image, config))
        tp += result.found
        n_pred += len(result.detected)
        n_true += len(truth)
        exact += result.exact
        if not result.exact:
            for t, d in zip(sorted(truth), sorted(result.detected), strict=False):
                if t != d:
                    confusion[(f"{t[0]} {t[1]}", f"{d[0]} {d[1]}")] += 1
    return {
        "samples": n,
        "seed": seed,
        "noise_std": noise_std,
        "blur": blur,
        "object_precision": tp / max(1, n_pred),
        "object_recall": tp / max(1, n_true),
        "exact_caption_accuracy": exact / n,
        "top_confusions": [f"{a} -> {b}: {k}" for (a, b), k in confusion.most_common(5)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Shapes-world detector")
    parser.add_argument("--eval", action="store_true", help="measure accuracy on ground-truth samples")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="data-set seed (the model trains on seed 0)")
    parser.add_argument("--noise-std", type=float, default=0.0, help="pixel noise added (0..255 units)")
    parser.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius (pixels)")
    parser.add_argument("images", nargs="*", help="image files to run the detector on")
    args = parser.parse_args(argv)
    if args.eval:
        print(json.dumps(evaluate(args.n, args.seed, noise_std=args.noise_std, blur=args.blur), indent=2))
    for path in args.images:
        print(path, json.dumps([asdict(d) for d in detect(Image.open(path))]))
    if not args.eval and not args.images:
        parser.error("give --eval or image paths")


if __name__ == "__main__":
    main()
