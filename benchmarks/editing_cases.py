"""Edit cases and scoring of the editing benchmark (``benchmarks/bench_editing.py``).

A *source* is an image with its caption and the detector's boxes of its objects. An *edit case* turns
a source into what CACAO is asked (editorial prompts by direction), what the prompt-swap and SDEdit
baselines are asked (the target caption), and what the detector must see afterwards:

- colour swap: the first object of the caption changes colour ("a red circle" -> "a blue circle"):
  "and" the new object, "not" the old one;
- shape swap: the first object changes shape (circle <-> square, triangle -> square), same prompts;
- add: a single-object source gets a second object ("and" it);
- remove: a two-object source loses its second object ("not" it).

Scores per edited image:

- success: every requested object is detected with its colour and shape and no replaced (or removed)
  object is detected any more;
- preservation: every object the edit should leave alone is detected with the same colour and shape
  and a bounding box overlapping its source box with IoU >= 0.5; for a swap the edited object must
  also stay where it was (some detection at its place, IoU >= 0.5, whatever it looks like), which is
  the paper's "structure preservation".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from ebca_shapes.data import caption_for
from ebca_shapes.detector import Detection

Label = tuple[str, str]
Box = tuple[int, int, int, int]

KINDS: tuple[str, ...] = ("colour", "shape", "add", "remove")
IOU_KEEP = 0.5

_NEXT_COLOUR = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"}
_NEXT_SHAPE = {"circle": "square", "square": "circle", "triangle": "square"}
# A second object for "add": a colour and a shape both different from the single object's.
_ADD_COLOUR = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
_ADD_SHAPE = {"circle": "square", "square": "circle", "triangle": "circle"}


@dataclass
class Source:
    """A source image: its caption's objects and the detector's boxes for them (same order)."""

    name: str
    image: Image.Image
    labels: list[Label]
    boxes: list[Box]
    seed: int | None  # the generation seed (synthetic editing needs it); None for a data-set image

    @property
    def caption(self) -> str:
        return caption_for(self.labels)


@dataclass
class EditCase:
    kind: str
    source: Source
    target_caption: str
    and_phrases: list[str]
    not_phrases: list[str]
    requested: list[Label]
    gone: list[Label]
    keep: list[tuple[Label, Box]]  # untouched objects: same label, same place
    keep_place: list[Box] = field(default_factory=list)  # swapped object: something stays here


def _phrase(label: Label) -> str:
    return f"a {label[0]} {label[1]}"


def _swap(source: Source, kind: str) -> EditCase:
    old = source.labels[0]
    if kind == "colour":
        colours = [_NEXT_COLOUR[old[0]], *_NEXT_COLOUR.values()]
        new = next((c, old[1]) for c in colours if c != old[0] and (c, old[1]) not in source.labels)
    else:
        shapes = [_NEXT_SHAPE[old[1]], *_NEXT_SHAPE.values()]
        new = next((old[0], s) for s in shapes if s != old[1] and (old[0], s) not in source.labels)
    labels = [new, *source.labels[1:]]
    keep = list(zip(source.labels[1:], source.boxes[1:], strict=True))
    return EditCase(
        kind,
        source,
        caption_for(labels),
        [_phrase(new)],
        [_phrase(old)],
        requested=labels,
        gone=[old],
        keep=keep,
        keep_place=[source.boxes[0]],
    )


def make_case(source: Source, kind: str) -> EditCase:
    """The edit of ``kind`` on ``source`` (add needs one object, remove two)."""
    if kind in ("colour", "shape"):
        return _swap(source, kind)
    if kind == "add":
        if len(source.labels) != 1:
            raise ValueError("add needs a single-object source")
        (old,) = source.labels
        new = (_ADD_COLOUR[old[0]], _ADD_SHAPE[old[1]])
        return EditCase(
            kind,
            source,
            caption_for([old, new]),
            [_phrase(new)],
            [],
            requested=[old, new],
            gone=[],
            keep=[(old, source.boxes[0])],
        )
    if kind == "remove":
        if len(source.labels) != 2:
            raise ValueError("remove needs a two-object source")
        kept, dropped = source.labels
        return EditCase(
            kind,
            source,
            caption_for([kept]),
            [],
            [_phrase(dropped)],
            requested=[kept],
            gone=[dropped],
            keep=[(kept, source.boxes[0])],
        )
    raise ValueError(f"unknown edit kind {kind!r}")


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Score:
    success: bool
    preserved: bool

    @property
    def both(self) -> bool:
        return self.success and self.preserved


def score(case: EditCase, found: list[Detection]) -> Score:
    labels = [d.label for d in found]
    success = all(r in labels for r in case.requested) and not any(g in labels for g in case.gone)
    kept = all(
        any(d.label == label and iou(d.bbox, box) >= IOU_KEEP for d in found) for label, box in case.keep
    )
    placed = all(any(iou(d.bbox, box) >= IOU_KEEP for d in found) for box in case.keep_place)
    return Score(success, kept and placed)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(scores: list[Score]) -> dict[str, object]:
    n = len(scores)
    out: dict[str, object] = {"n": n}
    for name in ("success", "preserved", "both"):
        hits = sum(getattr(s, name) for s in scores)
        lo, hi = wilson(hits, n)
        out[name] = hits / n if n else 0.0
        out[f"{name}_ci95"] = [round(lo, 4), round(hi, 4)]
    return out
