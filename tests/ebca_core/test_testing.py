"""The generated tokenizers behave like the real CLIP vocabulary for their words."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from ebca_core.testing import TINY_WORDS, write_word_tokenizer

SHAPES_WORDS = ("a", "and", "red", "green", "blue", "yellow", "circle", "square", "triangle")


@pytest.mark.parametrize("words", [TINY_WORDS, SHAPES_WORDS])
def test_every_word_is_one_token(tmp_path: Path, words: tuple[str, ...]) -> None:
    # "triangle" used to split because the "a n" merge of "and" outranked "tri a".
    tokenizer = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, words))
    for word in words:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == [
            f"{word}</w>"
        ]
    ids = tokenizer(" ".join(words)).input_ids
    assert len(ids) == 2 + len(words)


def test_unknown_words_fall_back_to_characters(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, ["red"]))
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zebra", add_special_tokens=False).input_ids)
    assert "".join(pieces).replace("</w>", "") == "zebra"
    with pytest.raises(ValueError, match="alphanumeric"):
        write_word_tokenizer(tmp_path / "bad", ["a-b"])
