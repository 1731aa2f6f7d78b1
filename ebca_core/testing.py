"""Small, deterministic models for tests, benchmarks and the built-in CPU model.

Nothing here downloads anything: tokenizers and weights are generated locally and saved in the
diffusers layout, so tests exercise the same loading code as real Stable Diffusion checkpoints.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def write_word_tokenizer(directory: str | Path, words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``directory``.

    Every word in ``words`` becomes one token (``word</w>``), so token indices line up with words the
    way they do for common words in the real CLIP vocabulary. Lower-case letters and digits are in the
    vocabulary as single characters too, so any other lower-case word still tokenizes (into
    characters) instead of collapsing into the unknown token.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = string.ascii_lowercase + string.digits
    tokens: list[str] = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        if not word.isalnum():
            raise ValueError(f"tokenizer words must be alphanumeric, got {word!r}")
        # Merge left to right: "c i r c l e</w>" -> "ci" -> "cir" ... -> "circle</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])
    tokens += [START_TOKEN, END_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    unique_merges = list(dict.fromkeys(merges))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in unique_merges)
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
