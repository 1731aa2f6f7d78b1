"""Small, deterministic models for tests, benchmarks and the built-in CPU model.

Nothing here downloads anything: tokenizers and weights are generated locally and saved in the
diffusers layout, so tests exercise the same loading code as real Stable Diffusion checkpoints.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

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
    ordered = _merge_order({w.lower() for w in words if w})
    for word in ordered:
        for a, b in _word_merges(word):
            merges.append((a, b))
            tokens.append(a + b)
    tokens += [START_TOKEN, END_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    unique_merges = list(dict.fromkeys(merges))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in unique_merges))
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


def _word_merges(word: str) -> list[tuple[str, str]]:
    """The merge chain of one word, left to right: "c i r c l e</w>" -> "ci" -> "cir" ... -> "circle</w>"."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges = []
    while len(pieces) > 1:
        merges.append((pieces[0], pieces[1]))
        pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """What byte-pair encoding with these merge ranks makes of ``word`` (lowest rank first)."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def _merge_order(words: set[str]) -> list[str]:
    """An order of the words' merge chains under which every word encodes to a single token.

    Merge ranks are global, so an early merge of one word ("h o" of "house") can win inside another
    ("p h o t o") and split it. Start with longer words first and move any word that splits to the
    front until every word is one token.
    """
    for word in words:
        if not word.isalnum() or not word.isascii():
            raise ValueError(f"tokenizer words must be ASCII alphanumeric, got {word!r}")
    order = sorted(words, key=lambda w: (-len(w), w))
    for _ in range(4 * len(order) + 1):
        ranks: dict[tuple[str, str], int] = {}
        for word in order:
            for merge in _word_merges(word):
                ranks.setdefault(merge, len(ranks))
        split = [w for w in order if len(_bpe_pieces(w, ranks)) != 1]
        if not split:
            return order
        order.remove(split[0])
        order.insert(0, split[0])
    raise ValueError(f"cannot make every word a single token; these split: {split}")


# Words of the tiny models' vocabulary: the prompts used across the test suites, the shapes dataset and
# the README examples tokenize into one token per word.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "of", "with", "in", "on", "photo", "painting", "monet", "van", "gogh",
    "cat", "dog", "bear", "teddy", "boat", "crown", "wearing", "sitting", "red", "green", "blue",
    "yellow", "white", "black", "purple", "orange", "circle", "square", "triangle", "star", "small",
    "large", "big", "background", "left", "right", "top", "bottom", "sunset", "lake", "tree", "house",
)  # fmt: skip

TinyVariant = Literal["sd1", "sd2", "inpaint"]


def build_tiny_model(
    path: str | Path,
    variant: TinyVariant = "sd1",
    seed: int = 0,
    words: Iterable[str] = TINY_WORDS,
) -> Path:
    """Write a tiny random-weight Stable Diffusion model in the diffusers layout and return its path.

    The architecture is SD 1.x (or SD 2.x / SD-inpainting) shaped at toy width: a U-Net with two
    cross-attention down blocks (channels 32, 64), a 2-block VAE (latents at 1/2 resolution), a 2-layer
    CLIP text encoder of width 32 with a word-level tokenizer, and the SD 1.5 noise schedule. The
    native size is 32x32 pixels (16x16 latents). Weights come from ``seed`` alone: the same seed
    writes the same bytes. ``variant``: ``"sd1"`` (PNDM scheduler, epsilon prediction), ``"sd2"``
    (linear projections, per-block head counts, DDIM with v-prediction) or ``"inpaint"`` (9-channel
    U-Net, StableDiffusionInpaintPipeline layout).
    """
    # Imported here so that ``write_word_tokenizer`` stays usable without torch/diffusers.
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if variant not in ("sd1", "sd2", "inpaint"):
        raise ValueError(f"variant must be 'sd1', 'sd2' or 'inpaint', got {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_word_tokenizer(path / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    sd2 = variant == "sd2"
    with torch.random.fork_rng(devices=[]):
        # One seed per component, in this order: the same seed writes the same bytes.
        torch.manual_seed(seed)
        unet = _tiny_unet(variant)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_text_encoder(tokenizer, sd2)
    pipeline_class = StableDiffusionInpaintPipeline if variant == "inpaint" else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(sd2),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def _tiny_unet(variant: TinyVariant) -> Any:
    from diffusers import UNet2DConditionModel

    sd2 = variant == "sd2"
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=9 if variant == "inpaint" else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # SD 1.x gives one head count for every block; SD 2.x a list (and linear projections).
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=16,
    )


def _tiny_vae() -> Any:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    # Calibrate the latent scaling like SD's 0.18215: scaled latents of natural-ish (smooth) images
    # get unit standard deviation, which is what the noise schedule assumes.
    coarse = torch.rand(8, 3, 8, 8) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    with torch.no_grad():
        latent_std = float(vae.encode(smooth).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / latent_std, 5))
    return vae


def _tiny_text_encoder(tokenizer: Any, sd2: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=vocab[START_TOKEN],
            eos_token_id=vocab[END_TOKEN],
            pad_token_id=vocab[END_TOKEN],
            projection_dim=32,
        )
    )


def _tiny_scheduler(sd2: bool) -> Any:
    """The SD 1.5 / 2.x training noise schedule: PNDM (SD 1.x) or DDIM with v-prediction (SD 2.x)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if sd2:
        return DDIMScheduler(
            **schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    return PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
