"""Input images and masks: the project's one intake, then conversion to and from model tensors.

Everything a client can send (PIL images, encoded bytes, file paths) goes through :func:`load_image` or
:func:`load_mask`, which take it through :mod:`ebca_common.intake` (the same decoding, pixel bound,
mode conversion and decompression-bomb policy as the REST api's uploads) and raise
:class:`InvalidInputError` naming the field instead of letting PIL's own errors escape.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ebca_common import intake
from ebca_core.errors import contract

ImageInput = PIL.Image.Image | bytes | bytearray | str | Path

#: Default limit on decoded pixels (width * height) of an input image or mask.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def load_image(
    value: ImageInput, field: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Decode ``value`` into an RGB image; alpha is dropped (composited on black by PIL's convert)."""
    return _load(value, field, max_pixels, "RGB")


def load_mask_image(
    value: ImageInput, field: str = "mask", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Decode ``value`` into a grayscale (``"L"``) mask image."""
    return _load(value, field, max_pixels, "L")


def _load(value: ImageInput, field: str, max_pixels: int, mode: str) -> PIL.Image.Image:
    with contract():
        image, _ = intake.open_image(value, field, max_pixels)
        return intake.convert(image, mode, field)


def load_mask(
    value: ImageInput, field: str = "mask", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode ``value`` into a boolean ``[H, W]`` mask: True (gray level >= 128) = region to repaint."""
    return mask_region(load_mask_image(value, field, max_pixels))


def mask_region(mask: PIL.Image.Image) -> np.ndarray:
    """The repaint region of a grayscale mask image: ``[H, W]`` bool."""
    return np.asarray(mask) >= intake.MASK_THRESHOLD


def check_size_multiple(image: PIL.Image.Image, multiple: int, field: str) -> None:
    with contract():
        intake.check_size_multiple(image, multiple, field)


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
