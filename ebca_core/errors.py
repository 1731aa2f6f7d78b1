"""Exceptions raised by ebca_core.

Everything ebca_core raises on purpose derives from :class:`EBCAError`, so a caller (the worker, a
notebook) can tell "the request was wrong" (:class:`InvalidInputError`) from "the model cannot be had"
(:class:`ModelNotFoundError`, :class:`ModelLoadError`) without parsing messages.
"""

from __future__ import annotations


class EBCAError(Exception):
    """Base class of every error ebca_core raises deliberately."""


class InvalidInputError(EBCAError, ValueError):
    """A parameter is invalid. Raised before any compute; ``field`` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ModelNotFoundError(EBCAError):
    """The model directory or hub id cannot be found (or cannot be fetched offline)."""


class ModelLoadError(EBCAError):
    """The model was found but is not a usable Stable-Diffusion-layout checkpoint."""
