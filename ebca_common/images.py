"""Image checks and encoding shared by the api (uploads) and the worker (results). PIL only.

Decoding and checking go through the one intake (:mod:`ebca_common.intake`) that ebca_core uses too;
here its refusals become the api's 422s.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from ebca_common import intake
from ebca_common.errors import ValidationFailed
from ebca_common.params import ParameterError
from ebca_common.specs import CONTENT_TYPES

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@contextmanager
def _as_validation() -> Iterator[None]:
    try:
        yield
    except ParameterError as exc:
        raise ValidationFailed(str(exc), field=exc.field) from None


def decode_image(data: bytes, field: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode an uploaded or stored image; 422 naming ``field`` if it is not a usable image.

    The pixel count is checked from the header before the pixels are decoded, so a decompression bomb
    is refused without allocating it. The image must convert to RGB and to grayscale: a stored input
    may later serve as an image or as a mask (LAB TIFF -> L raises in PIL).
    """
    with _as_validation():
        image, fmt = intake.open_image(data, field, max_pixels)
        intake.check_convertible(image, field)
    assert fmt is not None
    return image, fmt


def check_image_size(image: Image.Image, field: str) -> None:
    """The VAE downsamples by 8: ebca_core refuses other sizes, so the api refuses them early."""
    with _as_validation():
        intake.check_size_multiple(image, 8, field)


def check_mask(image: Image.Image, mask: Image.Image) -> None:
    """docs/API.md: the mask has the image's size and is neither empty nor full (white >= 128)."""
    with _as_validation():
        intake.check_mask(image, mask)


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str]:
    """Encode a result image; returns (bytes, content type). Deterministic for the same pixels."""
    buf = io.BytesIO()
    pil_format = _PIL_FORMATS[output_format]
    if pil_format == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    save_args: dict[str, object] = {}
    if pil_format == "JPEG":
        save_args["quality"] = 95
    elif pil_format == "WEBP":
        save_args["quality"] = 95
        save_args["method"] = 4
    image.save(buf, format=pil_format, **save_args)
    return buf.getvalue(), CONTENT_TYPES[output_format]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
