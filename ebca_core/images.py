"""Input images and masks: decoding with limits, conversion to and from model tensors.

Everything a client can send (PIL images, encoded bytes, file paths) goes through :func:`load_image` or
:func:`load_mask`, which raise :class:`InvalidInputError` naming the field instead of letting PIL's own
errors (or a decompression bomb) escape.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ebca_core.errors import InvalidInputError

ImageInput = PIL.Image.Image | bytes | bytearray | str | Path

#: Default limit on decoded pixels (width * height) of an input image or mask.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def _open(value: ImageInput, field: str, max_pixels: int) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, bytes | bytearray | str | Path):
        if isinstance(value, bytes | bytearray):
            if not value:
                raise InvalidInputError("is empty (0 bytes)", field=field)
            source: io.BytesIO | Path = io.BytesIO(bytes(value))
        else:
            source = Path(value)
            if not source.is_file():
                raise InvalidInputError(f"file {str(value)!r} does not exist", field=field)
        try:
            # PIL warns (and past 2x its own limit raises) on decompression bombs; we enforce our own
            # limit below from the header alone, before decoding any pixel data.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                image = PIL.Image.open(source)
        except PIL.Image.DecompressionBombError as exc:
            raise InvalidInputError(f"image is too large to decode safely ({exc})", field=field) from exc
        except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot be decoded as an image ({exc})", field=field) from exc
    else:
        raise InvalidInputError(
            f"expected a PIL image, encoded image bytes or a file path, got {type(value).__name__}",
            field=field,
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has no pixels ({width}x{height})", field=field)
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
            field=field,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"cannot be decoded as an image ({exc})", field=field) from exc
    return image


def load_image(
    value: ImageInput, field: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Decode ``value`` into an RGB image; alpha is dropped (composited on black by PIL's convert)."""
    return _open(value, field, max_pixels).convert("RGB")


def load_mask(
    value: ImageInput, field: str = "mask", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode ``value`` into a boolean ``[H, W]`` mask: True (gray level >= 128) = region to repaint."""
    image = _open(value, field, max_pixels)
    if image.mode in ("RGBA", "LA", "PA"):
        # A transparent mask's alpha carries no meaning for us; use the visible gray levels.
        image = image.convert("RGB")
    return np.asarray(image.convert("L")) >= 128


def check_size_multiple(image: PIL.Image.Image, multiple: int, field: str) -> None:
    width, height = image.size
    if width % multiple or height % multiple:
        raise InvalidInputError(
            f"width and height must be multiples of {multiple}, got {width}x{height}", field=field
        )


def image_sha256(image: PIL.Image.Image) -> str:
    """Hash of the decoded RGB pixels and size (not of the file bytes, so re-encodings collide only
    when the pixels are the same)."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes())
    return digest.hexdigest()


def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB image -> ``[1, 3, H, W]`` float32 in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def tensor_to_numpy(images: torch.Tensor) -> np.ndarray:
    """VAE output ``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` float32 in [0, 1]."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """``[B, H, W, 3]`` floats in [0, 1] -> RGB images (rounded to the nearest 8-bit level)."""
    return [PIL.Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
