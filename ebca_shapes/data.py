"""Procedural "shapes world" data set: one or two coloured shapes on a black background.

Every sample is a pure function of ``(seed, index)``, so a data set needs no files: the training
script, the tests and the benchmark all regenerate exactly the same images and captions.

The caption language is deliberately tiny (see ``VOCABULARY``)::

    caption := object | object " and " object
    object  := "a " colour " " shape
    colour  := "red" | "green" | "blue" | "yellow"
    shape   := "circle" | "square" | "triangle"

Shapes are drawn at 4x the output size and box-filtered down, so edges are anti-aliased the same
way in every sample (the detector and the autoencoder see one consistent edge profile).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
VOCABULARY: tuple[str, ...] = ("a", "and", *COLOURS, *SHAPES)
IMAGE_SIZE = 32
# Longest caption "a red circle and a blue square" is 7 words; + start and end tokens = 9.
MAX_CAPTION_TOKENS = 9

_SUPERSAMPLE = 4
# Object side lengths in output pixels: large enough that a triangle is still a triangle at 32x32,
# small enough that two objects always fit side by side with a gap.
_SINGLE_SIZE = (10, 17)  # [low, high)
_PAIR_SIZE = (8, 14)
_MARGIN = 1  # keep objects off the border so their bbox is fully visible
_GAP = 2  # minimum empty pixels between the bboxes of two objects
_P_TWO_OBJECTS = 0.6


@dataclass(frozen=True)
class ShapeObject:
    """One object: its colour and shape names and its bbox ``(x0, y0, x1, y1)``, ends exclusive."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def label(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    objects: tuple[ShapeObject, ...]


def caption_for(objects: Sequence[ShapeObject] | Sequence[tuple[str, str]]) -> str:
    """The caption of a list of objects (or ``(colour, shape)`` pairs), in the given order."""
    labels = [o.label if isinstance(o, ShapeObject) else tuple(o) for o in objects]
    if not 1 <= len(labels) <= 2:
        raise ValueError(f"a caption names one or two objects, got {len(labels)}")
    return " and ".join(f"a {c} {s}" for c, s in labels)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """Inverse of :func:`caption_for`; raises ValueError naming the offending word."""
    words = caption.strip().lower().split()
    labels: list[tuple[str, str]] = []
    i = 0
    while True:
        if len(words) < i + 3:
            raise ValueError(f"caption {caption!r}: expected 'a <colour> <shape>' at word {i}")
        article, colour, shape = words[i : i + 3]
        if article != "a":
            raise ValueError(f"caption {caption!r}: expected 'a', got {article!r}")
        if colour not in COLOURS:
            raise ValueError(f"caption {caption!r}: unknown colour {colour!r}")
        if shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown shape {shape!r}")
        labels.append((colour, shape))
        i += 3
        if i == len(words):
            break
        if words[i] != "and" or len(labels) == 2:
            raise ValueError(f"caption {caption!r}: unexpected {words[i]!r} at word {i}")
        i += 1
    return labels


def render(objects: Sequence[ShapeObject], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``objects`` (bboxes in output pixels) anti-aliased on the background."""
    big = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    k = _SUPERSAMPLE
    for obj in objects:
        x0, y0, x1, y1 = (v * k for v in obj.bbox)
        # PIL's ellipse/rectangle include the end coordinate; -1 keeps the drawn area inside the bbox.
        box = (x0, y0, x1 - 1, y1 - 1)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            # Upright isosceles triangle: apex at the top centre, base on the bottom edge.
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return big.resize((size, size), Image.Resampling.BOX)


def _place(rng: np.random.Generator, side: int, size: int) -> tuple[int, int, int, int]:
    x0 = int(rng.integers(_MARGIN, size - _MARGIN - side + 1))
    y0 = int(rng.integers(_MARGIN, size - _MARGIN - side + 1))
    return (x0, y0, x0 + side, y0 + side)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def sample_objects(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[ShapeObject, ...]:
    """Draw a random scene: 1 or 2 distinct (colour, shape) objects at non-overlapping positions."""
    colours = list(COLOURS)
    n = 2 if rng.random() < _P_TWO_OBJECTS else 1
    labels: list[tuple[str, str]] = []
    while len(labels) < n:
        label = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if label not in labels:  # "a red circle and a red circle" is not in the language
            labels.append(label)
    lo, hi = _SINGLE_SIZE if n == 1 else _PAIR_SIZE
    boxes: list[tuple[int, int, int, int]] = []
    attempts = 0
    while len(boxes) < n:
        if attempts == 20:
            # A large first object in the centre can leave no room for the second: start over.
            boxes, attempts = [], 0
        attempts += 1
        box = _place(rng, int(rng.integers(lo, hi)), size)
        if all(_apart(box, other) for other in boxes):
            boxes.append(box)
    return tuple(ShapeObject(c, s, b) for (c, s), b in zip(labels, boxes, strict=True))


def make_sample(seed: int, index: int, size: int = IMAGE_SIZE) -> Sample:
    """Sample ``index`` of the data set with ``seed``: deterministic, independent of other indices."""
    rng = np.random.default_rng([seed, index])
    objects = sample_objects(rng, size)
    return Sample(image=render(objects, size), caption=caption_for(objects), objects=objects)


class ShapesDataset:
    """An indexable, endless-by-construction data set (``length`` only bounds iteration)."""

    def __init__(self, seed: int = 0, length: int = 10_000, size: int = IMAGE_SIZE) -> None:
        self.seed = seed
        self.length = length
        self.size = size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return make_sample(self.seed, index, self.size)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.length):
            yield self[i]


def to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 array ``[H, W, 3]``."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
