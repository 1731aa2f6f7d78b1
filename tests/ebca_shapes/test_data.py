from __future__ import annotations

import numpy as np
import pytest

from ebca_shapes.data import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    MAX_CAPTION_TOKENS,
    SHAPES,
    VOCABULARY,
    ShapeObject,
    ShapesDataset,
    caption_for,
    make_sample,
    parse_caption,
    render,
    to_array,
)


def test_samples_are_deterministic_per_seed_and_index() -> None:
    a, b = make_sample(3, 17), make_sample(3, 17)
    assert a.caption == b.caption and a.objects == b.objects
    assert np.array_equal(to_array(a.image), to_array(b.image))
    others = [make_sample(4, 17), make_sample(3, 18)]
    assert any(o.objects != a.objects for o in others)


def test_scenes_are_valid_and_varied() -> None:
    samples = list(ShapesDataset(seed=0, length=500))
    counts = {1: 0, 2: 0}
    seen_labels = set()
    for s in samples:
        assert s.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        counts[len(s.objects)] += 1
        assert len(set(o.label for o in s.objects)) == len(s.objects)
        for o in s.objects:
            seen_labels.add(o.label)
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 < x1 < IMAGE_SIZE and 0 < y0 < y1 < IMAGE_SIZE
            assert 8 <= x1 - x0 <= 16 and x1 - x0 == y1 - y0
        if len(s.objects) == 2:
            (a0, b0, a1, b1), (c0, d0, c1, d1) = (o.bbox for o in s.objects)
            assert a1 < c0 or c1 < a0 or b1 < d0 or d1 < b0, "objects overlap"
        words = s.caption.split()
        assert set(words) <= set(VOCABULARY) and len(words) + 2 <= MAX_CAPTION_TOKENS
        assert parse_caption(s.caption) == [o.label for o in s.objects]
    assert counts[1] > 100 and counts[2] > 200
    assert len(seen_labels) == len(COLOURS) * len(SHAPES)


def test_render_draws_palette_colours_on_background() -> None:
    square = ShapeObject("blue", "square", (4, 4, 14, 14))
    triangle = ShapeObject("red", "triangle", (18, 18, 30, 30))
    x = to_array(render([square, triangle]))
    assert tuple(x[9, 9]) == COLOURS["blue"]
    assert tuple(x[28, 24]) == COLOURS["red"]  # base of the triangle
    assert tuple(x[19, 19]) == BACKGROUND  # top-left corner of the triangle's bbox stays empty
    assert tuple(x[0, 0]) == BACKGROUND and tuple(x[31, 31]) == BACKGROUND


def test_caption_language_round_trip_and_errors() -> None:
    labels = [("red", "circle"), ("yellow", "triangle")]
    assert caption_for(labels) == "a red circle and a yellow triangle"
    assert parse_caption("A Red Circle") == [("red", "circle")]
    for bad, word in [
        ("a purple circle", "purple"),
        ("a red hexagon", "hexagon"),
        ("a red circle or a blue square", "or"),
        ("a red", "word 0"),
        ("a red circle and a blue square and a green circle", "and"),
    ]:
        with pytest.raises(ValueError, match=word):
            parse_caption(bad)
    with pytest.raises(ValueError, match="one or two"):
        caption_for([])
