"""Celery tasks. Thin: the job id goes to JobRunner, which makes the ebca_core calls."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ebca_common.errors import Unavailable
from ebca_common.queueing import RUN_JOB_TASK, CeleryPublisher
from ebca_common.storage import storage_from_settings
from ebca_common.store import JobStore
from worker.celery_app import app, heartbeat, process_id, settings
from worker.pipelines import PipelineCache
from worker.runner import JobRunner


@lru_cache(maxsize=1)
def _cache() -> PipelineCache:
    return PipelineCache(settings)


def runner() -> JobRunner:
    """One runner per process: its Redis client, storage and pipeline cache outlive the jobs."""
    return _runner(os.getpid())


@lru_cache(maxsize=1)
def _runner(pid: int) -> JobRunner:
    # Keyed by the process id: a prefork child builds its own instead of using a parent's clients.
    return JobRunner(
        JobStore.from_settings(settings),
        storage_from_settings(settings),
        _cache(),
        process_id(),
        stopping=lambda: heartbeat.stopping,
        holdings=heartbeat,
        max_batch=settings.max_batch,
        batch_max_pixels=settings.batch_max_pixels,
    )


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self: Task, job_id: str) -> str:
    heartbeat.start()  # no-op when already beating for this process (pool=solo starts it at ready)
    with heartbeat.holding(job_id):
        try:
            outcome = runner().run(job_id)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # The job store blinked before the job could start: send the job id round again (the
            # attempt count still bounds how often it can start).
            raise self.retry(exc=exc, countdown=settings.retry_after_seconds, max_retries=None) from exc
    # Handed-back jobs (this one, and those it had taken along into its batch) are queued again; a
    # message at the front of the queue lets another worker start each at once (this one is
    # acknowledged; a partner's old message, if the broker still has it, is dropped as a duplicate).
    # Should the broker be away, the sweep re-publishes.
    for handed in runner().handed_back:
        with contextlib.suppress(Unavailable):
            _publisher().publish(handed, front=True)
    return outcome


@lru_cache(maxsize=1)
def _publisher() -> CeleryPublisher:
    return CeleryPublisher(settings)
