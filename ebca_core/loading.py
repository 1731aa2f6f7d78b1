"""Loading Stable Diffusion checkpoints (diffusers layout) into an :class:`EBCAPipeline`.

The scheduler names live in :mod:`ebca_core.schedulers`; they are re-exported here for callers that
imported them from this module.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ebca_core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from ebca_core.pipeline import EBCAPipeline
from ebca_core.schedulers import SCHEDULERS, check_scheduler_name, make_scheduler, scheduler_name

__all__ = ["SCHEDULERS", "load_pipeline", "make_scheduler", "scheduler_name"]

_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with separators or a leading dot/tilde is a
    # filesystem path the caller expected to exist.
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


def _read_local_index(path: Path, model_str: str) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelLoadError(f"model {model_str!r} is a file; expected a diffusers-format directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"model directory {model_str!r} has no model_index.json; expected a diffusers-format "
            "Stable Diffusion checkpoint (convert single-file checkpoints with diffusers first)"
        )
    try:
        listed = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model directory {model_str!r}: unreadable model_index.json ({exc})") from exc
    if not isinstance(listed, dict):
        raise ModelLoadError(f"model directory {model_str!r}: model_index.json is not a JSON object")
    return listed


def _listed(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(e, str) for e in entry)


def _load_component(source: str, name: str, entry: list[str], dtype: torch.dtype, local_only: bool) -> Any:
    """One component of a diffusers checkpoint, by the (library, class) model_index.json names.

    Components are loaded one by one rather than through ``DiffusionPipeline.from_pretrained``: that
    would import diffusers' whole pipeline class (and with it image-processor classes this project
    never uses, whose import prints warnings about optional packages).
    """
    library, class_name = entry
    if library not in ("diffusers", "transformers"):
        raise ModelLoadError(f"component {name!r} comes from {library!r}; expected diffusers or transformers")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelLoadError(f"component {name!r}: {library} has no class {class_name!r}")
    kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": local_only}
    if name in ("scheduler", "tokenizer"):  # no weights, no dtype
        return cls.from_pretrained(source, **kwargs)
    return cls.from_pretrained(source, dtype=dtype, **kwargs)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars while loading: a model loads in seconds, and a bar per component only fills
    the logs of the services that load models (the previous setting comes back afterwards)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def load_pipeline(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str | None = None,
    local_files_only: bool = False,
) -> EBCAPipeline:
    """Load a Stable Diffusion 1.x / 2.x (or inpainting) checkpoint into an :class:`EBCAPipeline`.

    ``model`` is a diffusers-format directory or a hub id. Hub ids are only usable where the network
    (or the local hub cache) allows; otherwise :class:`ModelNotFoundError` says what to do.
    ``local_files_only`` forbids network access for hub ids. Inpainting checkpoints (9-channel U-Net)
    are detected from the U-Net config. ``scheduler`` names one of :data:`SCHEDULERS` (default: the
    checkpoint's own scheduler).
    """
    if scheduler is not None:
        check_scheduler_name(scheduler)
    if not isinstance(model, str | Path) or not str(model).strip():
        raise InvalidInputError("must be a model directory or a hub id", field="model")
    model_str = str(model)
    source, index, local_only = _locate(model_str, local_files_only)
    missing = [name for name in _REQUIRED_COMPONENTS if not _listed(index, name)]
    if missing:
        raise ModelLoadError(
            f"model {model_str!r} is not a Stable Diffusion layout: model_index.json lacks "
            f"{', '.join(missing)}"
        )
    try:
        with _quiet_loading():
            components = {
                name: _load_component(source, name, index[name], dtype, local_only)
                for name in _REQUIRED_COMPONENTS
            }
    except Exception as exc:  # diffusers/transformers raise many types for a broken checkpoint
        raise ModelLoadError(f"model {model_str!r} could not be loaded: {exc}") from exc
    scheduler_component = components["scheduler"]
    pipe = EBCAPipeline(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        # The same fix-ups as diffusers' pipelines apply on load (see make_scheduler).
        scheduler=make_scheduler(scheduler_name(scheduler_component), scheduler_component.config)
        if type(scheduler_component) in SCHEDULERS.values()
        else scheduler_component,
        model_id=model_str,
        device=device,
        dtype=dtype,
    )
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    return pipe


def _locate(model_str: str, local_files_only: bool) -> tuple[str, dict[str, Any], bool]:
    """Where the checkpoint's files come from: ``(source, model_index.json, local files only)``."""
    path = Path(model_str).expanduser()
    if path.exists():
        source = str(path)
        index = _read_local_index(path, model_str)
        local_only = True
    elif _looks_like_path(model_str):
        raise ModelNotFoundError(
            f"model directory {model_str!r} does not exist; pass an existing diffusers-format directory "
            "or a hub id"
        )
    else:
        source, local_only = model_str, local_files_only
        try:
            index = DiffusionPipeline.load_config(model_str, local_files_only=local_files_only)
        except Exception as exc:  # offline, unknown repo, gated repo, interrupted download...
            raise ModelNotFoundError(
                f"model {model_str!r} is neither a local directory nor loadable from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}). On a machine without network, download it first (e.g. "
                f"`huggingface-cli download {model_str}`) into the hub cache or save it with "
                "`save_pretrained` and pass the directory"
            ) from exc
    return source, index, local_only
