"""Runs one job: claim it in the job store, translate it into ebca_core calls, store the images,
record the result. The Celery task is a one-line wrapper around :meth:`JobRunner.run`.

The worker checks no request rule: the api checked them before queueing the job, and ebca_core checks
the same rules (:mod:`ebca_common.params`) again on this side of the queue. Here requests are only
converted: a table of small handlers, one per job mode, turns the stored request into the arguments of
one pipeline method.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ebca_common import params
from ebca_common.errors import ServiceError, ValidationFailed
from ebca_common.images import encode_image, sha256_hex
from ebca_common.jobs import ImageResult, JobError, JobRecord, JobResult, JobStatus, Progress
from ebca_common.model_defaults import EditMode, fill_defaults
from ebca_common.refs import resolve_ref
from ebca_common.specs import (
    MAX_SEED,
    EditSpec,
    EnergySpec,
    GenerateRequest,
    ImageRef,
    InpaintRequest,
    RealEditRequest,
    stored_request,
)
from ebca_common.storage import Storage
from ebca_common.store import JobStore
from ebca_core import (
    EditorialPrompt,
    EnergyConfig,
    InvalidInputError,
    InversionConfig,
    ModelLoadError,
    ModelNotFoundError,
    Schedule,
)
from worker.pipelines import PipelineCache

log = logging.getLogger("ebca.worker")

#: Longest wait between two tries to record a job's end while the job store is unreachable.
STORE_RETRY_MAX_SECONDS = 5.0

_STORE_DOWN = (RedisConnectionError, RedisTimeoutError)


def draw_seed(num_images: int) -> int:
    """A random seed for image 0 such that seed + i stays a valid seed (<= 2**32 - 1) for every image."""
    return secrets.randbelow(MAX_SEED - num_images + 2)


class JobCanceled(Exception):
    """Raised from the per-step callback to stop a job whose cancel flag is set."""


class JobTimedOut(Exception):
    """Raised from the per-step callback once the job's deadline has passed."""


class LeaseLost(Exception):
    """Raised from the per-step callback when the job is no longer this worker's (the sweep gave it to
    another worker or ended it): stop, writing nothing."""


class HandBack(Exception):
    """Raised from the per-step callback when this worker is shutting down: the job goes back in line."""


def energy_config(spec: EnergySpec | None) -> EnergyConfig | None:
    """EnergySpec -> ebca_core EnergyConfig: both gammas follow the one schedule (docs/EBCA.md,
    "Step-size schedules"); token weight keys go as they are (ebca_core reads digit keys as indices)."""
    if spec is None:
        return None
    sched = spec.schedule
    ratio = sched.ratio if sched.ratio is not None else params.default_ratio(sched.kind)
    return EnergyConfig(
        gamma_attn=Schedule.from_kind(sched.kind, spec.gamma_attn, tau=sched.tau, ratio=ratio),
        gamma_norm=Schedule.from_kind(sched.kind, spec.gamma_norm, tau=sched.tau, ratio=ratio),
        token_weights={params.token_key(k): v for k, v in spec.token_weights.items()} or None,
    )


def editorial_prompts(edits: list[EditSpec]) -> list[EditorialPrompt]:
    """EditSpec -> EditorialPrompt: the same fields, by the same names (the model's edit defaults are
    filled in by then: ``fill_defaults``)."""
    return [EditorialPrompt(**e.model_dump()) for e in edits]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        cache: PipelineCache,
        worker_id: str,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.storage = storage
        self.cache = cache
        #: This process's id (``host:pid``): the lease it takes on the jobs it runs.
        self.worker_id = worker_id
        #: Whether this worker is shutting down (a running job is then handed back at its next step).
        self.stopping = stopping

    # -- entry point -------------------------------------------------------------------------------------
    def run(self, job_id: str) -> str:
        """Run ``job_id`` to a terminal state; returns what happened (for logs and tests)."""
        begin = self.store.begin(job_id, self.worker_id)
        if begin.outcome != "run":
            log.info("job %s: %s, not running it", job_id, begin.outcome)
            return begin.outcome
        record = begin.record
        assert record is not None  # a "run" outcome always carries the claimed record
        log.info("job %s: attempt %s on %s", job_id, record.attempts, self.worker_id)
        started = time.perf_counter()
        outcome = "succeeded"
        try:
            result, total = self._execute(record)
        except JobCanceled:
            outcome = self._finish(job_id, "canceled", JobStatus.CANCELED)
        except JobTimedOut:
            log.warning("job %s: past its deadline %s; stopped", job_id, record.deadline_at)
            outcome = self._finish(job_id, "timeout", JobStatus.FAILED, error=record.timeout_error())
        except LeaseLost:
            log.warning(
                "job %s: no longer held by this worker (recovered elsewhere or ended); dropped", job_id
            )
            return "lease_lost"
        except HandBack:
            released = self._store_retry(lambda: self.store.release(job_id, self.worker_id))
            log.info("job %s: handed back (worker stopping)", job_id)
            return "handed_back" if released else "lease_lost"
        except _STORE_DOWN:
            raise  # the job store is away before the job could start: the task sends it round again
        except Exception as exc:  # every failure ends the job with a stable code; the worker lives on
            code, message, field = self._classify(exc)
            outcome = "failed"
            if code == "internal_error":
                log.exception("job %s failed", job_id)
            else:
                log.warning("job %s failed: %s: %s", job_id, code, message)
            error = JobError(code=code, message=message, field=field or None)  # type: ignore[arg-type]
            outcome = self._finish(job_id, "failed", JobStatus.FAILED, error=error)
            if code == "out_of_memory" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            progress = Progress(stage="done", step=total, total=total)
            outcome = self._finish(job_id, "succeeded", JobStatus.SUCCEEDED, result=result, progress=progress)
        with contextlib.suppress(*_STORE_DOWN):  # a metric is not worth waiting for
            self.store.observe("job_duration_seconds", time.perf_counter() - started)
        return outcome

    def _finish(self, job_id: str, outcome: str, status: JobStatus, **fields: Any) -> str:
        """Record the end of the job (``outcome``), or "lease_lost" when another worker holds it now."""
        if self._store_retry(lambda: self.store.finish(job_id, status, lease=self.worker_id, **fields)):
            return outcome
        log.warning(
            "job %s: ended %s, but it is no longer held by this worker; not recorded", job_id, outcome
        )
        return "lease_lost"

    def _store_retry(self, call: Callable[[], bool]) -> bool:
        """Run a store call that must not be lost, retrying while the store is unreachable (a Redis
        restart): the work is done and the lease decides who may record it once the store is back.
        Gives up (raises) only when this worker is shutting down."""
        delay = 0.5
        while True:
            try:
                return call()
            except _STORE_DOWN as exc:
                if self.stopping():
                    raise
                log.warning("job store unreachable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, STORE_RETRY_MAX_SECONDS)

    @staticmethod
    def _classify(exc: BaseException) -> tuple[str, str, str | None]:
        if isinstance(exc, ModelNotFoundError | ModelLoadError):
            return "model_not_found", str(exc), None
        if isinstance(exc, InvalidInputError):
            return "invalid_input", str(exc), getattr(exc, "field", None)
        if isinstance(exc, ValidationFailed):
            return "invalid_input", exc.message, exc.field
        if is_out_of_memory(exc):
            return "out_of_memory", f"out of memory: {exc}", None
        if isinstance(exc, ServiceError):
            return "internal_error", exc.message, None
        return "internal_error", f"{type(exc).__name__}: {exc}", None

    # -- translation into ebca_core calls --------------------------------------------------------------
    def _execute(self, record: JobRecord) -> tuple[JobResult, int]:
        job_id, mode_name = record.id, _mode_of(record)
        mode = MODES.get(mode_name)
        if mode is None:
            raise ValueError(f"unknown job kind {record.kind!r} / mode {record.mode!r}")
        # A synthetic edit is its source's generate request re-run with editorial prompts (the api
        # resolved it into ``plan`` at submission).
        stored = record.plan if mode.field == "plan" and record.plan is not None else record.request
        request: Any = stored_request(mode.model, stored)
        pipe = self.cache.get(request.model)
        # Null sampler and edit settings take the model's defaults; the record then shows the values used.
        defaults = self.cache.defaults(request.model)
        request = fill_defaults(request, defaults, pipe.default_size, edit_mode=mode.edit_mode)
        data = request.model_dump(mode="json")
        # Images are made one pipeline call each (num_images=1, seed + i): batched CPU/GPU kernels round
        # differently from single ones, so only this makes each image's settings reproduce it byte for
        # byte. The inversion of a real image is cached by ebca_core, so repeating the call is cheap.
        base = request.seed if request.seed is not None else draw_seed(request.num_images)
        seeds = [base + i for i in range(request.num_images)]
        total = request.steps * len(seeds)
        self.store.resolve_request(job_id, data, total, field=mode.field)
        report = _Reporter(self.store, record, total, self.worker_id, self.stopping)
        report.stage("loading")
        method, arguments = mode.handler(self, request)
        run = getattr(pipe, method)
        made: list[Image.Image] = []
        for index, seed in enumerate(seeds):
            report.offset = index * request.steps
            out = run(
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                energy=energy_config(request.energy),
                num_images=1,
                seed=seed,
                output_type="pil",
                callback=report.step,
                on_stage=report.stage,
                **arguments,
            )
            made.append(out.images[0])
        report.stage("uploading")
        return JobResult(images=self._store_images(job_id, made, seeds, data, mode.endpoint)), total

    def _store_images(
        self, job_id: str, made: list[Image.Image], seeds: list[int], data: dict[str, Any], endpoint: str
    ) -> list[ImageResult]:
        images = []
        output_format = data["output_format"]
        for index, (image, seed) in enumerate(zip(made, seeds, strict=True)):
            payload, content_type = encode_image(image, output_format)
            key = f"jobs/{job_id}/{index}.{output_format}"
            # Deterministic keys: a re-run of the job overwrites these objects instead of adding more.
            self.storage.put(key, payload, content_type)
            images.append(
                ImageResult(
                    index=index,
                    url=f"/jobs/{job_id}/images/{index}",
                    seed=int(seed),
                    width=image.size[0],
                    height=image.size[1],
                    content_type=content_type,
                    sha256=sha256_hex(payload),
                    key=key,
                    settings_endpoint=endpoint,
                    settings={**data, "num_images": 1, "seed": int(seed)},
                )
            )
        return images

    def input_bytes(self, ref: ImageRef | None, field: str) -> bytes:
        """The stored bytes of an input image: ebca_core decodes, bounds and converts them (the same
        intake as the api's uploads)."""
        if ref is None:
            raise ValidationFailed(f"{field}: missing", field=field)
        return self.storage.get(resolve_ref(self.store, ref, field))


# -- one small handler per job mode: the request's task-specific arguments of one pipeline method -----
Handler = Callable[[JobRunner, Any], tuple[str, dict[str, Any]]]


def _generate(runner: JobRunner, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
    return "generate", {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "height": request.height,
        "width": request.width,
        "edits": editorial_prompts(request.edits) or None,
        "scheduler": request.scheduler,  # per call: the cached pipeline's own scheduler is left alone
    }


def _inpaint(runner: JobRunner, request: InpaintRequest) -> tuple[str, dict[str, Any]]:
    return "inpaint", {
        "image": runner.input_bytes(request.image_ref, "image_ref"),
        "mask": runner.input_bytes(request.mask_ref, "mask_ref"),
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "scheduler": request.scheduler,
    }


def _real_edit(runner: JobRunner, request: RealEditRequest) -> tuple[str, dict[str, Any]]:
    return "edit_real", {  # always DDIM (docs/EBCA.md, "Tasks")
        "image": runner.input_bytes(request.image_ref, "image_ref"),
        "source_prompt": request.source_prompt,
        "edits": editorial_prompts(request.edits),
        "inversion": InversionConfig(regularize=request.inversion.regularize),
    }


@dataclass(frozen=True)
class Mode:
    """How a job mode runs: its stored request's model, the record field holding it, the endpoint an
    image's settings replay through, its handler, and which edit defaults its editorial prompts take."""

    model: type[BaseModel]
    field: str
    endpoint: str
    handler: Handler
    edit_mode: EditMode | None = None


MODES: dict[str, Mode] = {
    # A generate request with edits is synthetic editing too (docs/EBCA.md, "Tasks").
    "generate": Mode(GenerateRequest, "request", "/generate", _generate, "synthetic"),
    "synthetic": Mode(GenerateRequest, "plan", "/generate", _generate, "synthetic"),
    "inpaint": Mode(InpaintRequest, "request", "/edit", _inpaint),
    "real": Mode(RealEditRequest, "request", "/edit", _real_edit, "real"),
}


def _mode_of(record: JobRecord) -> str:
    return "generate" if record.kind == "generate" else str(record.mode)


class _Reporter:
    """Progress into the job record at every stage and denoising step, and the checks that stop a job
    there (EBCA core's ``callback`` may raise to abort): a cancel and the lease (read in the same round
    trip), the deadline, a shutdown of this worker."""

    def __init__(
        self, store: JobStore, record: JobRecord, total: int, worker_id: str, stopping: Callable[[], bool]
    ) -> None:
        self.store = store
        self.record = record
        self.total = total
        self.worker_id = worker_id
        self.stopping = stopping
        self.done = 0
        #: Steps of the images already made (images run one after another, see JobRunner._execute).
        self.offset = 0
        self.current_stage = "loading"
        self._last = time.perf_counter()
        self._store_down = False

    def stage(self, stage: str) -> None:
        self.current_stage = stage
        self._last = time.perf_counter()
        self._report(stage)

    def step(self, step: int, total: int, latents: Any = None) -> None:
        now = time.perf_counter()
        self._last, elapsed = now, now - self._last
        self.done = self.offset + min(step, total)
        self._report("denoising", elapsed)

    def _report(self, stage: str, step_seconds: float | None = None) -> None:
        try:
            if step_seconds is not None:
                self.store.observe("step_duration_seconds", step_seconds)
            verdict = self.store.progress(self.record.id, self.worker_id, stage, self.done, self.total)
            self._store_down = False
        except _STORE_DOWN as exc:
            # The store blinked (a Redis restart): keep computing; the end is recorded once it is back,
            # if this worker still holds the job then.
            if not self._store_down:
                log.warning("job %s: progress not recorded, job store unreachable: %s", self.record.id, exc)
            self._store_down = True
            verdict = "run"
        if verdict == "cancel":
            raise JobCanceled()
        if verdict == "lost":
            raise LeaseLost()
        if self.record.past_deadline(time.time()):
            raise JobTimedOut()
        if self.stopping():
            raise HandBack()
