"""The thread that runs crash recovery: :meth:`ebca_common.store.JobStore.sweep` every
EBCA_HEARTBEAT_SECONDS (docs/DEPLOY.md, "Crash recovery").

Both the api and the main process of every ``celery worker`` run one. The workers, because wherever a
job can run there is a sweep, also in a deployment without an api replica up; the api, because it is
up while workers come and go, so that a job whose last worker was killed is back in line within the
lease TTL even while every replacement worker is still starting, and a queued job past its deadline
fails on time when no worker is there at all. Any number of sweeps is safe: each decision on a job is
one Redis transaction, so a job is put back in line (and published) once.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from ebca_common.settings import Settings
from ebca_common.store import JobStore

log = logging.getLogger("ebca.sweep")


class FrontPublisher(Protocol):
    """ebca_common.queueing.CeleryPublisher: ``front`` puts a job ahead of the new ones."""

    def publish(self, job_id: str, *, front: bool = False) -> None: ...


class Sweeper:
    """A daemon thread sweeping the job store; jobs it puts back in line are published to the front."""

    def __init__(self, settings: Settings, publisher: FrontPublisher, store: JobStore | None = None):
        self.settings = settings
        self.publisher = publisher
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ebca-sweep", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        store = self.store or JobStore.from_settings(self.settings)
        while not self._stop.is_set():  # the first pass at once: a starting process may find work
            try:
                for outcome, job_ids in store.sweep(self._publish).items():
                    log.warning("sweep: %s %s", outcome, " ".join(job_ids))
            except Exception as exc:  # Redis away: the next pass catches up
                log.warning("sweep failed: %s", exc)
            self._stop.wait(self.settings.heartbeat_seconds)

    def _publish(self, job_id: str) -> None:
        self.publisher.publish(job_id, front=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
