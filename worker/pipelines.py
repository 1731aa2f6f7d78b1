"""A per-process cache of loaded pipelines, keyed by model id: a model is loaded once per worker
process and reused by every later job that names it (up to EBCA_MAX_CACHED_MODELS models, least
recently used evicted first, so a worker serving many models does not run out of GPU memory)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from ebca_common.model_defaults import ModelDefaults, defaults_of
from ebca_common.settings import Settings
from ebca_common.specs import service_limits
from ebca_core import ModelNotFoundError, load_pipeline

log = logging.getLogger("ebca.worker")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        # Half precision on GPUs (memory and speed); float32 on CPU, where half is slow or unsupported.
        return torch.float16 if device.startswith("cuda") else torch.float32
    return _DTYPES[setting]


class PipelineCache:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        # The scheduler each model was loaded with. Jobs name theirs per call and leave the pipeline's
        # alone; handing this one back on every get keeps it that way whatever a job does.
        self._schedulers: dict[str, Any] = {}
        self._defaults: dict[str, ModelDefaults] = {}
        self._lock = threading.Lock()
        #: Seconds each model took to load (the first job's extra cost; later jobs pay nothing).
        self.load_seconds: dict[str, float] = {}

    def get(self, model_id: str) -> Any:
        with self._lock:
            pipe = self._pipes.get(model_id)
            if pipe is None:
                pipe = self._load(model_id)
            self._pipes.move_to_end(model_id)
            pipe.scheduler = self._schedulers[model_id]
            return pipe

    def _load(self, model_id: str) -> Any:
        location = self.settings.model_table().get(model_id)
        if location is None:
            raise ModelNotFoundError(f"model {model_id!r} is not configured on this worker")
        while len(self._pipes) >= self.settings.max_cached_models:
            evicted, _ = self._pipes.popitem(last=False)
            self._schedulers.pop(evicted, None)
            self._defaults.pop(evicted, None)
            log.info("evicted model %s from the pipeline cache", evicted)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        start = time.perf_counter()
        pipe = load_pipeline(location, device=self.device, dtype=self.dtype)
        # The REST contract's bounds with this deployment's settings: ebca_core refuses exactly what
        # the api does (EBCA_MAX_EDITS above ebca_core's own 4, say, must not fail jobs here).
        pipe.limits = service_limits(self.settings)
        self.load_seconds[model_id] = time.perf_counter() - start
        log.info("loaded model %s from %s in %.2fs", model_id, location, self.load_seconds[model_id])
        self._pipes[model_id] = pipe
        self._schedulers[model_id] = pipe.scheduler
        self._defaults[model_id] = defaults_of(location)
        return pipe

    def defaults(self, model_id: str) -> ModelDefaults:
        """The sampler defaults of a loaded model, read from its directory when it was loaded."""
        return self._defaults[model_id]

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._pipes
