"""The jobs of one batch and what reports on them at every step.

A worker starting a generate job takes compatible queued jobs along (JobRunner._claim_partners): one
denoising batch then makes the images of all of them, and each job keeps its own record. Every step is
reported to every job still in the batch in one Redis round trip; a job that is canceled, past its
deadline or taken over elsewhere is ended (or dropped) at that step on its own, while the others go
on. Its rows stay in the batch until the batch ends, masked: they are computed but never reported or
stored (dropping rows mid-loop would mean slicing the state of every scheduler, see docs/EBCA.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ebca_common.jobs import JobRecord, JobStatus

if TYPE_CHECKING:
    from worker.runner import JobRunner, Mode

log = logging.getLogger("ebca.worker")

_STORE_DOWN = (RedisConnectionError, RedisTimeoutError)


class Holdings(Protocol):
    """The jobs this process reports running in its heartbeat (celery_app.Heartbeat, or a set)."""

    def add(self, job_id: str) -> None: ...

    def discard(self, job_id: str) -> None: ...


class HandBack(Exception):
    """Raised from the per-step callback when this worker is shutting down: the jobs go back in line."""


class BatchOver(Exception):
    """Raised from the per-step callback once no job of the batch is left to compute for."""


@dataclass
class BatchJob:
    """One job of a batch: its record, its request as it runs, and how it ended (None: still running)."""

    record: JobRecord
    mode: Mode | None = None
    request: Any = None  # the stored request with the model's defaults filled in
    data: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    method: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None
    #: When this worker took the job (its job_duration_seconds).
    started: float = field(default_factory=time.perf_counter)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def active(self) -> bool:
        return self.outcome is None

    @property
    def total(self) -> int:
        return int(self.request.steps) if self.request is not None else 0

    def batch_key(self) -> tuple[Any, ...] | None:
        """What jobs sharing a batch must have in common, or None when this job never shares one.

        Only generate jobs without editorial prompts coalesce: CACAO's unconditional editorial context
        is shared by the rows of a call, and edit and inpaint jobs bring input images and a different
        U-Net input (docs/DEPLOY.md, "Batching").
        """
        request = self.request
        if self.record.kind != "generate" or request is None or request.edits:
            return None
        return (
            request.model,
            request.steps,
            request.guidance_scale,
            request.scheduler,
            request.width,
            request.height,
        )


class BatchReporter:
    """Progress into every running job of a batch at each stage and denoising step, and the checks that
    end a job there: its cancel and lease (read in the same round trip), its deadline; a shutdown of
    this worker stops the whole batch (EBCA core's ``callback`` may raise to abort)."""

    def __init__(self, runner: JobRunner, jobs: list[BatchJob]) -> None:
        self.runner = runner
        self.jobs = jobs
        self.done = 0
        self._last = time.perf_counter()
        self._store_down = False

    def stage(self, stage: str) -> None:
        self._last = time.perf_counter()
        self._report(stage)

    def step(self, step: int, total: int, latents: Any = None) -> None:
        now = time.perf_counter()
        self._last, elapsed = now, now - self._last
        self.done = min(step, total)
        self._report("denoising", elapsed)

    def _report(self, stage: str, step_seconds: float | None = None) -> None:
        runner, store = self.runner, self.runner.store
        active = [job for job in self.jobs if job.active]
        try:
            if step_seconds is not None:
                store.observe("step_duration_seconds", step_seconds)
            entries = [(job.id, stage, self.done, job.total) for job in active]
            verdicts = store.progress_many(runner.worker_id, entries)
            self._store_down = False
        except _STORE_DOWN as exc:
            # The store blinked (a Redis restart): keep computing; the ends are recorded once it is
            # back, for the jobs this worker still holds then.
            if not self._store_down:
                log.warning(
                    "batch of %s: progress not recorded, job store unreachable: %s", active[0].id, exc
                )
            self._store_down = True
            verdicts = ["run"] * len(active)
        now = time.time()
        for job, verdict in zip(active, verdicts, strict=True):
            if verdict == "cancel":
                runner.end(job, "canceled", JobStatus.CANCELED)
            elif verdict == "lost":
                log.warning("job %s: no longer held by this worker (recovered elsewhere or ended)", job.id)
                runner.drop(job, "lease_lost")
            elif job.record.past_deadline(now):
                log.warning("job %s: past its deadline %s; stopped", job.id, job.record.deadline_at)
                runner.end(job, "timeout", JobStatus.FAILED, error=job.record.timeout_error())
        if not any(job.active for job in self.jobs):
            raise BatchOver()
        if runner.stopping():
            raise HandBack()
