"""The Celery wiring both sides share: task name, queue, broker options, the publisher, and where the
broker keeps a job's message.

The api publishes by task name (it never imports the worker); the worker registers the task under
the same name and consumes the same queue, and its sweep re-publishes with the same publisher.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.transport.redis import PRIORITY_STEPS, Channel

from ebca_common.errors import Unavailable
from ebca_common.settings import Settings

RUN_JOB_TASK = "ebca.run_job"

#: Broker priorities (kombu's Redis transport pops its priority lists lowest number first): a new job
#: waits behind the jobs already queued; a job put back in line (recovered from a dead worker, handed
#: back by a stopping one, or re-published after its message was lost) goes ahead of them, where its
#: queue position (its submission order) says it belongs.
NEW_PRIORITY = 3
FRONT_PRIORITY = 0


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
        "task_default_priority": NEW_PRIORITY,
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


class CeleryPublisher:
    """Sends a job id to the worker queue by task name; ``front`` puts it ahead of the new jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("ebca-publisher", set_as_current=False)
        self.app.conf.update(celery_config(settings))

    def publish(self, job_id: str, *, front: bool = False) -> None:
        priority = FRONT_PRIORITY if front else NEW_PRIORITY
        try:
            self.app.send_task(
                RUN_JOB_TASK, args=[job_id], queue=self.settings.queue, priority=priority, retry=False
            )
        except OperationalError as exc:
            raise Unavailable(
                f"the job queue is unreachable: {exc}", retry_after=self.settings.retry_after_seconds
            ) from exc


def queued_job_ids(client: redis.Redis, queue: str) -> set[str]:
    """The job ids that have a message in the broker: waiting in ``queue`` or delivered to a worker
    and not yet acknowledged.

    This reads the layout of kombu's Redis transport (kombu.transport.redis): one list per queue and
    priority step (``queue``, then ``queue`` + ``Channel.sep`` + step), and the hash ``unacked``
    (delivery tag -> JSON ``[message, exchange, routing_key]``) that holds every message a worker has
    taken until it acknowledges it. A message is JSON whose ``body`` is the base64 of Celery's
    protocol-2 body ``[args, kwargs, embed]``; ``args[0]`` is the job id. ``client`` decodes responses.
    """
    raw: list[str] = []
    for key in broker_lists(queue):
        raw.extend(client.lrange(key, 0, -1))  # type: ignore[arg-type]
    messages = [json.loads(m) for m in raw]
    messages.extend(json.loads(v)[0] for v in client.hvals(Channel.unacked_key))  # type: ignore[union-attr]
    ids: set[str] = set()
    for message in messages:
        if message.get("headers", {}).get("task") != RUN_JOB_TASK:
            continue
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if args:
            ids.add(str(args[0]))
    return ids


def broker_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, one per priority step (kombu's layout)."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]
