"""The Celery wiring both sides share: task name, queue and broker options.

The api publishes by task name (it never imports the worker); the worker registers the task under
the same name and consumes the same queue.
"""

from __future__ import annotations

from typing import Any

from ebca_common.settings import Settings

RUN_JOB_TASK = "ebca.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for the api (producer) and the worker (consumer)."""
    return {
        "broker_url": settings.redis_url,
        "result_backend": None,  # job state lives in the job store, not in Celery results
        "task_default_queue": settings.queue,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only after it ran; a worker lost mid-job gives the message back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "task_track_started": False,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Redis has no real acks: an unacked message comes back after this many seconds.
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_timeout": settings.redis_timeout_seconds,
            "socket_connect_timeout": settings.redis_timeout_seconds,
        },
        "broker_connection_timeout": settings.redis_timeout_seconds,
        "worker_send_task_events": False,
        "worker_enable_remote_control": True,
    }
