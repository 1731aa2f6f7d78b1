"""The Celery app: ``celery -A worker.celery_app worker``.

Consumes the GPU queue (EBCA_QUEUE, default "gpu") without ``-Q``: it is the app's default queue.
Late acknowledgement, reject-on-worker-lost and prefetch 1 come from ebca_common.queueing, so a job
is handed back to the broker when its worker dies mid-run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings

from celery import Celery, signals
from celery.exceptions import SecurityWarning

from ebca_common.model_defaults import configured_defaults
from ebca_common.queueing import celery_config
from ebca_common.settings import get_settings
from ebca_common.store import JobStore

log = logging.getLogger("ebca.worker")

settings = get_settings()
# Celery's multi-line warning about root privileges is replaced by one line of ours (at ready) that
# says what to do; every other warning stays.
warnings.filterwarnings("ignore", category=SecurityWarning, module="celery.platforms")
app = Celery("ebca-worker", include=["worker.tasks"])
app.conf.update(celery_config(settings))


def process_id() -> str:
    """Identity of this worker process in the job store (the lease on the jobs it runs, heartbeat key)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """A daemon thread writing this process's heartbeat; /readyz and crash detection read it."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.worker_id = ""

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self.worker_id == process_id():
            return
        self.worker_id = process_id()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ebca-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        store = JobStore.from_settings(settings)
        while not self._stop.is_set():
            try:
                store.heartbeat(self.worker_id)
            except Exception as exc:  # Redis away for a moment: keep trying, the TTL tells the rest
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(settings.heartbeat_seconds)
        try:
            store.worker_gone(self.worker_id)
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


heartbeat = Heartbeat()


@signals.worker_ready.connect
def _on_ready(**_: object) -> None:
    heartbeat.start()
    if os.geteuid() == 0:
        log.warning(
            "the worker runs as root; in production run it as an unprivileged user "
            "(Dockerfile.gpu does, as user ebca)"
        )
    publish_model_defaults()


def publish_model_defaults() -> None:
    """Tell the api the defaults of the models this worker serves (GET /models lists them)."""
    try:
        JobStore.from_settings(settings).publish_model_defaults(
            {model_id: d.model_dump(mode="json") for model_id, d in configured_defaults(settings).items()}
        )
    except Exception as exc:  # Redis away: the api falls back to reading the files itself
        log.warning("could not publish the model defaults: %s", exc)


@signals.worker_process_init.connect
def _on_child(**_: object) -> None:
    # Prefork children run the jobs, so each one beats under its own id (a killed child goes silent);
    # the thread inherited from the parent does not exist in the child, so start() makes a new one.
    heartbeat.start()


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    heartbeat.stop()


celery = app
