"""Runs one job: claim it in the job store, translate it into ebca_core calls, store the images,
record the result. The Celery task is a one-line wrapper around :meth:`JobRunner.run`."""

from __future__ import annotations

import io
import logging
import secrets
import time
from typing import Any

import torch
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ebca_common.errors import ServiceError, ValidationFailed
from ebca_common.images import encode_image, sha256_hex
from ebca_common.jobs import ImageResult, JobError, JobRecord, JobResult, JobStatus, Progress
from ebca_common.model_defaults import fill_defaults
from ebca_common.refs import resolve_ref
from ebca_common.specs import (
    MAX_SEED,
    EditSpec,
    EnergySpec,
    GenerateRequest,
    ImageRef,
    InpaintRequest,
    RealEditRequest,
    token_weight_key,
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

#: How often a worker holding a duplicate delivery looks again at the job's lease holder.
DUPLICATE_POLL_SECONDS = 0.5


def draw_seed(num_images: int) -> int:
    """A random seed for image 0 such that seed + i stays a valid seed (<= 2**32 - 1) for every image."""
    return secrets.randbelow(MAX_SEED - num_images + 2)


class JobCanceled(Exception):
    """Raised from the per-step callback to stop a job whose cancel flag is set."""


def energy_config(spec: EnergySpec | None) -> EnergyConfig | None:
    """EnergySpec -> ebca_core EnergyConfig; both gammas follow the one schedule (EBCA_SPEC.md schedules)."""
    if spec is None:
        return None
    sched = spec.schedule
    ratio = sched.ratio if sched.ratio is not None else (1.0 if sched.kind == "exp" else 0.0)
    weights: dict[int | str, float] = {
        token_weight_key(key): value for key, value in spec.token_weights.items()
    }
    return EnergyConfig(
        gamma_attn=Schedule.from_kind(sched.kind, spec.gamma_attn, tau=sched.tau, ratio=ratio),
        gamma_norm=Schedule.from_kind(sched.kind, spec.gamma_norm, tau=sched.tau, ratio=ratio),
        token_weights=weights or None,
    )


def editorial_prompts(edits: list[EditSpec]) -> list[EditorialPrompt]:
    return [
        EditorialPrompt(
            prompt=e.prompt,
            alpha=e.alpha,
            direction=e.direction,
            alpha_tau=e.alpha_tau,
            gamma_attn=e.gamma_attn,
            gamma_norm=e.gamma_norm,
            gamma_tau=e.gamma_tau,
        )
        for e in edits
    ]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class JobRunner:
    def __init__(self, store: JobStore, storage: Storage, cache: PipelineCache, worker_id: str) -> None:
        self.store = store
        self.storage = storage
        self.cache = cache
        #: This process's id (``host:pid``): the lease it takes on the jobs it runs.
        self.worker_id = worker_id

    # -- entry point -------------------------------------------------------------------------------------
    def run(self, job_id: str) -> str:
        """Run ``job_id`` to a terminal state; returns what happened (for logs and tests)."""
        waited = False
        while True:
            begin = self.store.begin(job_id, self.worker_id)
            if begin.outcome != "duplicate":
                break
            if not waited:
                lease = begin.record.lease if begin.record else None
                log.info("job %s: redelivered while %s still runs it; waiting", job_id, lease)
                waited = True
            # The broker redelivered a job whose worker is alive and still running it (visibility
            # timeout shorter than the job). Hold the message until that worker finishes or dies, so
            # the job is neither run twice nor lost if it dies later.
            time.sleep(DUPLICATE_POLL_SECONDS)
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
            outcome = "canceled"
            self.store.finish(job_id, JobStatus.CANCELED)
        except (RedisConnectionError, RedisTimeoutError):
            raise  # the job store is away: not the job's fault; the task sends it round again
        except Exception as exc:  # every failure ends the job with a stable code; the worker lives on
            code, message, field = self._classify(exc)
            outcome = "failed"
            if code == "internal_error":
                log.exception("job %s failed", job_id)
            else:
                log.warning("job %s failed: %s: %s", job_id, code, message)
            error = JobError(code=code, message=message, field=field or None)  # type: ignore[arg-type]
            self.store.finish(job_id, JobStatus.FAILED, error=error)
            if code == "out_of_memory" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.store.finish(
                job_id,
                JobStatus.SUCCEEDED,
                result=result,
                progress=Progress(stage="done", step=total, total=total),
            )
        self.store.observe("job_duration_seconds", time.perf_counter() - started)
        return outcome

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
        job_id = record.id
        mode = record.mode
        if record.kind == "generate" or mode == "synthetic":
            # A synthetic edit is its source's generate request re-run with editorial prompts (the api
            # resolved it into ``plan`` at submission).
            source = record.plan if mode == "synthetic" and record.plan is not None else record.request
            request: Any = GenerateRequest.model_validate(source)
            endpoint = "/generate"
        elif mode == "inpaint":
            request = InpaintRequest.model_validate(record.request)
            endpoint = "/edit"
        elif mode == "real":
            request = RealEditRequest.model_validate(record.request)
            endpoint = "/edit"
        else:
            raise ValueError(f"unknown job kind {record.kind!r} / mode {mode!r}")

        pipe = self.cache.get(request.model)
        # Null sampler settings take the model's defaults; the record then shows the values used.
        request = fill_defaults(request, self.cache.defaults(request.model), pipe.default_size)
        data = request.model_dump(mode="json")
        # Images are made one pipeline call each (num_images=1, seed + i): batched CPU/GPU kernels round
        # differently from single ones, so only this makes each image's settings reproduce it byte for
        # byte. The inversion of a real image is cached by ebca_core, so repeating the call is cheap.
        base = request.seed if request.seed is not None else draw_seed(request.num_images)
        seeds = [base + i for i in range(request.num_images)]
        total = request.steps * len(seeds)
        self.store.resolve_request(job_id, data, total, field="plan" if mode == "synthetic" else "request")
        report = self._reporter(job_id, total)
        report.stage("loading")
        common: dict[str, Any] = {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "energy": energy_config(request.energy),
            "num_images": 1,
            "output_type": "pil",
            "callback": report.step,
            "on_stage": report.stage,
        }
        if isinstance(request, GenerateRequest | InpaintRequest):
            pipe.set_scheduler(request.scheduler)
        inputs: dict[str, Any] = {}
        if isinstance(request, InpaintRequest):
            inputs["image"] = self._load_image(request.image_ref, "image_ref", "RGB")
            inputs["mask"] = self._load_image(request.mask_ref, "mask_ref", "L")
        elif isinstance(request, RealEditRequest):
            inputs["image"] = self._load_image(request.image_ref, "image_ref", "RGB")
        made: list[Image.Image] = []
        for index, seed in enumerate(seeds):
            report.offset = index * request.steps
            if isinstance(request, GenerateRequest):
                out = pipe.generate(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    height=request.height,
                    width=request.width,
                    latents=None,
                    edits=editorial_prompts(request.edits) or None,
                    seed=seed,
                    **common,
                )
            elif isinstance(request, InpaintRequest):
                out = pipe.inpaint(
                    image=inputs["image"],
                    mask=inputs["mask"],
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    seed=seed,
                    **common,
                )
            else:
                out = pipe.edit_real(
                    image=inputs["image"],
                    source_prompt=request.source_prompt,
                    edits=editorial_prompts(request.edits),
                    inversion=InversionConfig(regularize=request.inversion.regularize),
                    seed=seed,
                    **common,
                )
            made.append(out.images[0])

        report.stage("uploading")
        images = []
        for index, (image, seed) in enumerate(zip(made, seeds, strict=True)):
            payload, content_type = encode_image(image, request.output_format)
            key = f"jobs/{job_id}/{index}.{request.output_format}"
            # Deterministic keys: a re-run of the job overwrites these objects instead of adding more.
            self.storage.put(key, payload, content_type)
            settings = {**data, "num_images": 1, "seed": int(seed)}
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
                    settings=settings,
                )
            )
        return JobResult(images=images), total

    def _load_image(self, ref: ImageRef | None, field: str, mode: str) -> Image.Image:
        if ref is None:
            raise ValidationFailed(f"{field}: missing", field=field)
        key = resolve_ref(self.store, ref, field)
        image = Image.open(io.BytesIO(self.storage.get(key)))
        image.load()
        return image.convert(mode)

    def _reporter(self, job_id: str, total: int) -> _Reporter:
        return _Reporter(self.store, job_id, total)


class _Reporter:
    """Progress into the job record at every denoising step; the cancel flag is read in the same
    round trip and stops the job there (EBCA core ``callback`` may raise to abort)."""

    def __init__(self, store: JobStore, job_id: str, total: int) -> None:
        self.store = store
        self.job_id = job_id
        self.total = total
        self.done = 0
        #: Steps of the images already made (images run one after another, see JobRunner._execute).
        self.offset = 0
        self.current_stage = "loading"
        self._last = time.perf_counter()

    def stage(self, stage: str) -> None:
        self.current_stage = stage
        self._last = time.perf_counter()
        if self.store.progress(self.job_id, stage, self.done, self.total):
            raise JobCanceled()

    def step(self, step: int, total: int, latents: Any = None) -> None:
        now = time.perf_counter()
        self.store.observe("step_duration_seconds", now - self._last)
        self._last = now
        self.done = self.offset + min(step, total)
        if self.store.progress(self.job_id, "denoising", self.done, self.total):
            raise JobCanceled()
