"""Image checks and encoding shared by the api (uploads) and the worker (results). PIL only."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image

from ebca_common.errors import ValidationFailed
from ebca_common.specs import CONTENT_TYPES

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: Formats accepted as uploads (what PIL decodes safely and what clients send).
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def decode_image(data: bytes, field: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode an uploaded or stored image; 422 naming ``field`` if it is not a usable image.

    The pixel count is checked from the header before the pixels are decoded, so a decompression bomb
    is refused without allocating it.
    """
    if not data:
        raise ValidationFailed(f"{field}: the file is empty", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ValidationFailed(
                    f"{field}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
                    "(EBCA_MAX_IMAGE_PIXELS)",
                    field=field,
                )
            fmt = UPLOAD_FORMATS.get(image.format or "")
            if fmt is None:
                raise ValidationFailed(
                    f"{field}: unsupported image format {image.format!r}; send PNG, JPEG or WEBP", field=field
                )
            image.load()
            # The worker converts inputs to RGB (image) or L (mask); some modes PIL decodes cannot be
            # converted (LAB TIFF -> L raises), so refuse them here rather than fail later.
            for target in ("RGB", "L"):
                try:
                    image.convert(target)
                except ValueError:
                    raise ValidationFailed(
                        f"{field}: pixel mode {image.mode!r} is not supported; send RGB, RGBA or grayscale",
                        field=field,
                    ) from None
    except ValidationFailed:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValidationFailed(f"{field}: image too large to decode safely ({exc})", field=field) from None
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "not an image"
        raise ValidationFailed(
            f"{field}: not a decodable image ({type(exc).__name__})", field=field
        ) from None
    if width < 8 or height < 8:
        raise ValidationFailed(f"{field}: {width}x{height} is too small (at least 8x8)", field=field)
    return image, fmt


def check_mask(image: Image.Image, mask: Image.Image) -> None:
    """docs/API.md: the mask has the image's size and is neither empty nor full (white >= 128)."""
    if mask.size != image.size:
        raise ValidationFailed(
            f"mask: size {mask.size[0]}x{mask.size[1]} differs from the image's "
            f"{image.size[0]}x{image.size[1]}",
            field="mask",
        )
    low, high = mask.convert("L").point(lambda v: 255 if v >= 128 else 0).getextrema()
    if high == 0:
        raise ValidationFailed("mask: no pixel is white (>= 128); nothing to repaint", field="mask")
    if low == 255:
        raise ValidationFailed("mask: every pixel is white; nothing of the image would be kept", field="mask")


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
