"""The Celery app: ``celery -A worker.celery_app worker``.

Consumes the GPU queue (EBCA_QUEUE, default "gpu") without ``-Q``: it is the app's default queue.
Late acknowledgement and prefetch 1 come from ebca_common.queueing.

Every worker process beats (its heartbeat and the jobs it holds: the lease of docs/DEPLOY.md, "Crash
recovery"); the main process of every ``celery worker`` also runs the sweep that puts the jobs of dead
workers back in line. A warm shutdown (SIGTERM) hands running jobs back at their next step.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery, signals
from celery.exceptions import SecurityWarning

from ebca_common.model_defaults import configured_defaults
from ebca_common.queueing import CeleryPublisher, celery_config
from ebca_common.settings import get_settings
from ebca_common.store import JobStore
from ebca_common.sweep import Sweeper

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
    """A daemon thread writing this process's heartbeat and the jobs it holds (/readyz and the leases
    read them); it also carries a warm shutdown from a prefork parent to its children."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._jobs: set[str] = set()
        self.worker_id = ""
        #: The main process of this worker when this is a prefork child (its shutdown is ours).
        self.parent_id: str | None = None
        #: A warm shutdown began: a running job is handed back at its next step (set by shut_down).
        self.stopping = False

    def start(self, parent_id: str | None = None) -> None:
        if self._thread is not None and self._thread.is_alive() and self.worker_id == process_id():
            return
        self.worker_id = process_id()
        self.parent_id = parent_id
        # A forked child gets a copy of the lock in whatever state the parent's thread left it: new one.
        self._lock = threading.Lock()
        self._jobs = set()
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._loop, name="ebca-heartbeat", daemon=True)
        self._thread.start()

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        """List ``job_id`` among the jobs this process runs while the block runs (before it begins the
        job: store.JobStore.begin relies on it)."""
        with self._lock:
            self._jobs.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._jobs.discard(job_id)

    def add(self, job_id: str) -> None:
        """List a job this process claims for its batch (before it begins it, as :meth:`holding`)."""
        with self._lock:
            self._jobs.add(job_id)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._jobs.discard(job_id)

    def jobs(self) -> set[str]:
        with self._lock:
            return set(self._jobs)

    def _loop(self) -> None:
        store = JobStore.from_settings(settings)
        marked = False
        while not self._stop.is_set():
            try:
                store.heartbeat(self.worker_id, self.jobs)
                if self.parent_id is not None and not self.stopping and store.draining(self.parent_id):
                    self.stopping = True
                if self.stopping and not marked:
                    store.mark_draining(self.worker_id)
                    marked = True
            except Exception as exc:  # Redis away for a moment: keep trying, the TTL tells the rest
                log.warning("heartbeat failed: %s", exc)
            self._wake.wait(settings.heartbeat_seconds)
            self._wake.clear()
        try:
            store.worker_gone(self.worker_id)
        except Exception:
            pass

    def shut_down(self) -> None:
        """A warm shutdown began (called from the signal handler): set the flag and wake the thread, so
        that the draining mark for this process's prefork children is written now. Only the main
        thread runs signal handlers and it never waits on ``_wake``, so setting it cannot deadlock."""
        self.stopping = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


heartbeat = Heartbeat()
#: Crash recovery (ebca_common/sweep.py), in the main process only (started when the worker is ready).
sweeper = Sweeper(settings, CeleryPublisher(settings))


@signals.worker_ready.connect
def _on_ready(**_: object) -> None:
    heartbeat.start()
    sweeper.start()
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
    heartbeat.start(parent_id=f"{socket.gethostname()}:{os.getppid()}")


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    # Runs in the main process's signal handler (SIGTERM, SIGINT): only a flag. With pool=solo the
    # job runs in this process and sees it at its next step; prefork children learn it from the mark
    # the heartbeat writes (docs/DEPLOY.md, "Stopping a worker").
    heartbeat.shut_down()


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    sweeper.stop()
    heartbeat.stop()


celery = app
