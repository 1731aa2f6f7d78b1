"""Runs one job, with the compatible queued jobs it takes along: claim them in the job store,
translate them into ebca_core calls (one batch), store the images, record each job's result. The
Celery task is a one-line wrapper around :meth:`JobRunner.run`.

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
from ebca_core.pipeline import BatchPart
from worker.batch import BatchJob, BatchOver, BatchReporter, HandBack, Holdings
from worker.pipelines import PipelineCache

log = logging.getLogger("ebca.worker")

#: Longest wait between two tries to record a job's end while the job store is unreachable.
STORE_RETRY_MAX_SECONDS = 5.0

_STORE_DOWN = (RedisConnectionError, RedisTimeoutError)


def draw_seed(num_images: int) -> int:
    """A random seed for image 0 such that seed + i stays a valid seed (<= 2**32 - 1) for every image."""
    return secrets.randbelow(MAX_SEED - num_images + 2)


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
        holdings: Holdings | None = None,
        max_batch: int = 1,
        batch_max_pixels: int = 8 * 512 * 512,
    ) -> None:
        self.store = store
        self.storage = storage
        self.cache = cache
        #: This process's id (``host:pid``): the lease it takes on the jobs it runs.
        self.worker_id = worker_id
        #: Whether this worker is shutting down (running jobs are then handed back at their next step).
        self.stopping = stopping
        #: The jobs this process's heartbeat reports; jobs claimed for a batch are added before begin.
        self.holdings: Holdings = holdings if holdings is not None else set()
        #: EBCA_MAX_BATCH and EBCA_BATCH_MAX_PIXELS: how far a starting job takes queued jobs along.
        self.max_batch = max_batch
        self.batch_max_pixels = batch_max_pixels
        #: Ids of the jobs the last run handed back (the task re-publishes their messages).
        self.handed_back: list[str] = []

    # -- entry point -------------------------------------------------------------------------------------
    def run(self, job_id: str) -> str:
        """Run ``job_id`` (and the jobs it takes along) to a terminal state; returns what happened to
        ``job_id`` (for logs and tests)."""
        self.handed_back = []
        begin = self.store.begin(job_id, self.worker_id)
        if begin.outcome != "run":
            log.info("job %s: %s, not running it", job_id, begin.outcome)
            return begin.outcome
        assert begin.record is not None  # a "run" outcome always carries the claimed record
        lead = BatchJob(begin.record)
        log.info("job %s: attempt %s on %s", job_id, lead.record.attempts, self.worker_id)
        jobs = [lead]
        try:
            self._prepare(lead)
            jobs += self._claim_partners(lead)
            if len(jobs) > 1:
                # Checked now only when it has partners (a lone job pays nothing for batching): a lead
                # that ebca_core refuses fails alone and its partners run without it.
                self._check_alone(lead)
            self._execute([job for job in jobs if job.active])
        except BatchOver:
            pass  # every job of the batch ended at a step (canceled, timed out, taken over)
        except HandBack:
            for job in jobs:
                if job.active:
                    released = self._store_retry(lambda job=job: self.store.release(job.id, self.worker_id))
                    self.drop(job, "handed_back" if released else "lease_lost")
                    if released:
                        self.handed_back.append(job.id)
            log.info("jobs %s: handed back (worker stopping)", self.handed_back)
        except _STORE_DOWN:
            # The job store is away before the batch could start: the task sends the job round again;
            # the partners' leases lapse once this process stops listing them (finally), and the sweep
            # puts them back in line.
            raise
        except Exception as exc:  # every failure ends the jobs with a stable code; the worker lives on
            self._fail(jobs, exc)
        finally:
            for job in jobs[1:]:
                self.holdings.discard(job.id)
        assert lead.outcome is not None
        return lead.outcome

    def end(self, job: BatchJob, outcome: str, status: JobStatus, **fields: Any) -> None:
        """Record the end of one job of the batch (``outcome``), or "lease_lost" when another worker
        holds it now."""
        if self._store_retry(lambda: self.store.finish(job.id, status, lease=self.worker_id, **fields)):
            job.outcome = outcome
        else:
            log.warning(
                "job %s: ended %s, but it is no longer held by this worker; not recorded", job.id, outcome
            )
            job.outcome = "lease_lost"
        with contextlib.suppress(*_STORE_DOWN):  # a metric is not worth waiting for
            self.store.observe("job_duration_seconds", time.perf_counter() - job.started)

    def drop(self, job: BatchJob, outcome: str) -> None:
        """Stop computing for a job without recording anything (it is no longer this worker's)."""
        job.outcome = outcome

    def _check_alone(self, job: BatchJob) -> None:
        """ebca_core's checks of a job about to join a batch; a job they refuse fails on its own."""
        try:
            self.cache.get(job.request.model).check_inputs("generate", **self._call_arguments(job))
        except _STORE_DOWN:
            raise
        except Exception as exc:
            self._fail([job], exc)

    def _fail(self, jobs: list[BatchJob], exc: Exception) -> None:
        code, message, field = self._classify(exc)
        if code == "internal_error":
            log.exception("jobs %s failed", [job.id for job in jobs if job.active])
        else:
            log.warning("jobs %s failed: %s: %s", [job.id for job in jobs if job.active], code, message)
        error = JobError(code=code, message=message, field=field or None)  # type: ignore[arg-type]
        for job in jobs:
            if job.active:
                self.end(job, "failed", JobStatus.FAILED, error=error)
        if code == "out_of_memory" and torch.cuda.is_available():
            torch.cuda.empty_cache()

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
    def _prepare(self, job: BatchJob) -> None:
        """The job's request as it runs (model defaults filled in, seeds drawn), recorded."""
        record = job.record
        job.mode = mode = MODES.get(_mode_of(record))  # type: ignore[assignment]
        if mode is None:
            raise ValueError(f"unknown job kind {record.kind!r} / mode {record.mode!r}")
        # A synthetic edit is its source's generate request re-run with editorial prompts (the api
        # resolved it into ``plan`` at submission).
        stored = record.plan if mode.field == "plan" and record.plan is not None else record.request
        request: Any = stored_request(mode.model, stored)
        pipe = self.cache.get(request.model)
        # Null sampler and edit settings take the model's defaults; the record then shows the values used.
        defaults = self.cache.defaults(request.model)
        job.request = request = fill_defaults(request, defaults, pipe.default_size, edit_mode=mode.edit_mode)
        # The webhook belongs to the job (its record), not to what reproduces an image.
        job.data = request.model_dump(mode="json", exclude={"webhook", "webhook_events"})
        # All images of the job run in one batch: image i draws from its own generator seeded seed + i,
        # so its settings reproduce it alone to float32 round-off (docs/API.md, "Reproducibility").
        base = request.seed if request.seed is not None else draw_seed(request.num_images)
        job.seeds = [base + i for i in range(request.num_images)]
        self.store.resolve_request(record.id, job.data, job.total, field=mode.field)
        job.method, job.arguments = mode.handler(self, request)

    @staticmethod
    def _call_arguments(job: BatchJob) -> dict[str, Any]:
        request = job.request
        return {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "energy": energy_config(request.energy),
            "num_images": len(job.seeds),
            "seed": job.seeds[0],
            "output_type": "pil",
            **job.arguments,
        }

    def _claim_partners(self, lead: BatchJob) -> list[BatchJob]:
        """Queued jobs that share the lead's batch, claimed in queue order (docs/DEPLOY.md, "Batching").

        Never waits: only jobs already queued are looked at. Stops at the first queued job that cannot
        share the batch, so no job is ever overtaken by a later one; stops before EBCA_MAX_BATCH image
        rows or EBCA_BATCH_MAX_PIXELS. A claim is :meth:`JobStore.begin` (its own attempt, this worker's
        lease), with the job listed in this process's heartbeat first; a claimed job that fails
        ebca_core's checks fails alone.
        """
        key = lead.batch_key()
        rows = len(lead.seeds)
        if key is None or rows >= self.max_batch:
            return []
        pixels = rows * lead.request.width * lead.request.height
        partners: list[BatchJob] = []
        for record in self.store.queued_records(self.max_batch):
            candidate = BatchJob(record)
            try:
                self._peek(candidate)
            except Exception:  # a request this worker cannot even read ends up failing on its own
                break
            if candidate.batch_key() != key:
                break
            images = candidate.request.num_images
            area = images * candidate.request.width * candidate.request.height
            if rows + images > self.max_batch or pixels + area > self.batch_max_pixels:
                break
            self.holdings.add(record.id)
            begin = self.store.begin(record.id, self.worker_id, queued_only=True)
            if begin.outcome != "run" or begin.record is None:
                self.holdings.discard(record.id)  # canceled meanwhile, or taken by another worker
                continue
            job = BatchJob(begin.record)
            try:
                self._prepare(job)
            except _STORE_DOWN:
                raise
            except Exception as exc:
                self._fail([job], exc)
            else:
                self._check_alone(job)
            if not job.active:  # failed alone, before the batch starts
                self.holdings.discard(job.id)
                continue
            partners.append(job)
            rows, pixels = rows + images, pixels + area
        if partners:
            log.info("job %s: batched with %s", lead.id, [job.id for job in partners])
        return partners

    def _peek(self, job: BatchJob) -> None:
        """A queued job's request with the model's defaults, to compare without claiming it."""
        mode = MODES.get(_mode_of(job.record))
        if mode is None or mode.field != "request":
            return  # synthetic edits and unknown modes never coalesce (batch_key is None)
        request: Any = stored_request(mode.model, job.record.request)
        if request.model not in self.cache:
            return
        pipe = self.cache.get(request.model)
        job.request = fill_defaults(request, self.cache.defaults(request.model), pipe.default_size)

    def _execute(self, jobs: list[BatchJob]) -> None:
        """Run the batch: one pipeline call for all images of all jobs, then each job's images."""
        if not jobs:
            return
        lead = jobs[0]
        pipe = self.cache.get(lead.request.model)
        report = BatchReporter(self, jobs)
        report.stage("loading")
        started = time.perf_counter()
        if len(jobs) == 1:
            run = getattr(pipe, lead.method)
            made = [
                list(run(callback=report.step, on_stage=report.stage, **self._call_arguments(lead)).images)
            ]
        else:
            made = self._generate_batch(pipe, jobs, report)
        rows = sum(len(job.seeds) for job in jobs)
        with contextlib.suppress(*_STORE_DOWN):
            self.store.observe("batch_images", rows)
            self.store.observe("batch_images_per_second", rows / max(time.perf_counter() - started, 1e-9))
        report.stage("uploading")
        for job, images in zip(jobs, made, strict=True):
            if not job.active:
                continue  # ended or dropped at a step: its rows were computed but are not its result
            assert job.mode is not None
            result = JobResult(
                images=self._store_images(job.id, images, job.seeds, job.data, job.mode.endpoint)
            )
            progress = Progress(stage="done", step=job.total, total=job.total)
            self.end(job, "succeeded", JobStatus.SUCCEEDED, result=result, progress=progress)

    @staticmethod
    def _generate_batch(pipe: Any, jobs: list[BatchJob], report: BatchReporter) -> list[list[Image.Image]]:
        lead = jobs[0].request
        parts = [
            BatchPart(
                prompt=job.request.prompt,
                negative_prompt=job.request.negative_prompt,
                num_images=len(job.seeds),
                seed=job.seeds[0],
                energy=energy_config(job.request.energy),
            )
            for job in jobs
        ]
        outputs = pipe.generate_batch(
            parts,
            num_inference_steps=lead.steps,
            guidance_scale=lead.guidance_scale,
            height=lead.height,
            width=lead.width,
            output_type="pil",
            callback=report.step,
            on_stage=report.stage,
            scheduler=lead.scheduler,
        )
        return [list(out.images) for out in outputs]

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
