"""Exceptions raised by ebca_core.

Everything ebca_core raises on purpose derives from :class:`EBCAError`, so a caller (the worker, a
notebook) can tell "the request was wrong" (:class:`InvalidInputError`) from "the model cannot be had"
(:class:`ModelNotFoundError`, :class:`ModelLoadError`) without parsing messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ebca_common.params import ParameterError


class EBCAError(Exception):
    """Base class of every error ebca_core raises deliberately."""


class InvalidInputError(EBCAError, ParameterError):
    """A parameter is invalid. Raised before any compute; ``field`` names the offending parameter.

    It is the parameter contract's :class:`~ebca_common.params.ParameterError` as ebca_core raises it:
    the rules of :mod:`ebca_common.params` are the ones the REST api applies too.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.message = message


@contextlib.contextmanager
def contract(prefix: str | None = None) -> Iterator[None]:
    """Run rules of the parameter contract; a broken one raises :class:`InvalidInputError` with the
    same reason and field (under ``prefix``, e.g. ``edits[0]``, when one is given)."""
    try:
        yield
    except InvalidInputError:
        raise
    except ParameterError as exc:
        field = exc.field if prefix is None else f"{prefix}.{exc.field}" if exc.field else prefix
        raise InvalidInputError(exc.reason, field=field) from None


class ModelNotFoundError(EBCAError):
    """The model directory or hub id cannot be found (or cannot be fetched offline)."""


class ModelLoadError(EBCAError):
    """The model was found but is not a usable Stable-Diffusion-layout checkpoint."""
