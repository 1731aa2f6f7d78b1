"""The one image intake: decoding, the pixel bound, mode conversion and the decompression-bomb policy.

Both sides of the queue take input images through here: the api for uploads and stored references
(``ebca_common.images.decode_image``), ebca_core for whatever a library caller passes
(``ebca_core.images.load_image`` / ``load_mask``, which the worker feeds the stored bytes). PIL and
the parameter contract only; failures raise :class:`~ebca_common.params.ParameterError` naming the
field, which each side turns into its own error.

Bomb policy: the pixel count is read from the header and checked against the caller's limit before
any pixel is decoded. PIL's own warning for large images is not an error here (the limit is ours
and configurable); PIL's hard refusal, far beyond any sensible limit, is reported as too large.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from ebca_common.params import ParameterError

#: Encoded formats accepted (what PIL decodes safely and what clients send), PIL name -> ours.
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
#: The smallest image side (the VAE downsamples by 8).
MIN_SIDE = 8
#: Gray level from which a mask pixel means "repaint".
MASK_THRESHOLD = 128

ImageSource = Image.Image | bytes | bytearray | str | Path


def open_image(value: object, field: str, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Decode ``value`` (encoded bytes, a file path or a PIL image) with its pixels loaded.

    Returns the image and its format (``"png"``...; None for a PIL image passed as such).
    """
    if isinstance(value, Image.Image):
        _check_size(value, field, max_pixels)
        return value, None
    if isinstance(value, bytes | bytearray):
        if not value:
            raise ParameterError("is empty (0 bytes)", field)
        source: io.BytesIO | Path = io.BytesIO(bytes(value))
    elif isinstance(value, str | Path):
        source = Path(value)
        if not source.is_file():
            raise ParameterError(f"file {str(value)!r} does not exist", field)
    else:
        raise ParameterError(
            f"expected a PIL image, encoded image bytes or a file path, got {type(value).__name__}", field
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            fmt = UPLOAD_FORMATS.get(image.format or "")
            if fmt is None:
                raise ParameterError(
                    f"unsupported image format {image.format!r}; send PNG, JPEG or WEBP", field
                )
            _check_size(image, field, max_pixels)  # from the header: nothing is decoded yet
            image.load()
    except ParameterError:
        raise
    except Image.DecompressionBombError as exc:
        raise ParameterError(f"image is too large to decode safely ({exc})", field) from None
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "not an image"
        raise ParameterError(
            f"not a decodable image: it cannot be decoded ({type(exc).__name__}: {exc})", field
        ) from None
    return image, fmt


def _check_size(image: Image.Image, field: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ParameterError(
            f"{width}x{height} is {width * height} pixels, more than the limit of {max_pixels}; images "
            "over the limit are refused before decoding",
            field,
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ParameterError(f"{width}x{height} is too small (at least {MIN_SIDE}x{MIN_SIDE})", field)


def convert(image: Image.Image, mode: str, field: str) -> Image.Image:
    """``image`` in pixel mode ``"RGB"`` (an image) or ``"L"`` (a mask; a transparent mask's alpha means
    nothing, its visible gray levels count)."""
    try:
        if mode == "L" and image.mode in ("RGBA", "LA", "PA"):
            image = image.convert("RGB")
        return image.convert(mode)
    except ValueError:  # a mode PIL decodes but cannot convert (LAB -> L)
        raise ParameterError(
            f"pixel mode {image.mode!r} is not supported; send RGB, RGBA or grayscale", field
        ) from None


def check_convertible(image: Image.Image, field: str) -> None:
    """A stored input may later serve as an image or as a mask: it must convert to both."""
    for mode in ("RGB", "L"):
        convert(image, mode, field)


def check_size_multiple(image: Image.Image, multiple: int, field: str) -> None:
    width, height = image.size
    if width % multiple or height % multiple:
        raise ParameterError(f"width and height must be multiples of {multiple}, got {width}x{height}", field)


def check_mask(image: Image.Image, mask: Image.Image, field: str = "mask") -> None:
    """The mask has the image's size and is neither empty nor full (white >= 128 = repaint)."""
    if mask.size != image.size:
        raise ParameterError(
            f"mask is {mask.size[0]}x{mask.size[1]}, which differs from the image's "
            f"{image.size[0]}x{image.size[1]}",
            field,
        )
    gray = convert(mask, "L", field)
    low, high = gray.point(lambda v: 255 if v >= MASK_THRESHOLD else 0).getextrema()
    if high == 0:
        raise ParameterError(
            "mask is empty: no pixel is white (>= 128), so there is nothing to repaint", field
        )
    if low == 255:
        raise ParameterError(
            "mask covers the whole image: every pixel is white (>= 128), nothing of the image would be kept",
            field,
        )
