"""Fixtures of the api tests: an in-process app whose queue is a fake worker (for the synchronous
adapters of api/compat/, which wait for their job to finish)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from testkeys import TestKeys

from api.main import create_app
from ebca_common.jobs import ImageResult, JobError, JobRecord, JobResult, JobStatus
from ebca_common.settings import Settings
from ebca_common.storage import Storage, storage_from_settings
from ebca_common.store import JobStore

LEASE = "fake-worker:1"
#: How a job ends on the fake worker: None = success, else the error it fails with.
Outcome = Callable[[JobRecord], JobError | None]


@dataclass
class FakeWorker:
    """A publisher that runs each job at once on a thread: one solid PNG per image (seed + i), at the
    requested size (else 32x32, or the input image's), or the error ``outcome`` returns. ``hold``
    keeps jobs running until it is set (for cancel and disconnect tests)."""

    store: JobStore
    storage: Storage
    outcome: Outcome = lambda record: None
    hold: threading.Event | None = None
    jobs: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def publish(self, job_id: str) -> None:
        self.jobs.append(job_id)
        thread = threading.Thread(target=self._run, args=(job_id,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def input(self, job_id: str, name: str) -> Image.Image:
        record = self.store.record(job_id)
        assert record is not None
        return Image.open(io.BytesIO(self.storage.get(record.inputs[name])))

    def _run(self, job_id: str) -> None:
        begun = self.store.begin(job_id, LEASE)
        if begun.outcome != "run":
            return
        record = begun.record
        assert record is not None
        if self.hold is not None:
            while not self.hold.wait(0.02):
                if self.store.cancel_requested(job_id):
                    self.store.finish(job_id, JobStatus.CANCELED, lease=LEASE)
                    return
        error = self.outcome(record)
        if error is not None:
            self.store.finish(job_id, JobStatus.FAILED, lease=LEASE, error=error)
            return
        request = dict(record.request)
        request.setdefault("steps", 20)
        request["steps"] = request["steps"] or 20
        request["guidance_scale"] = request.get("guidance_scale") or 5.0
        request["scheduler"] = request.get("scheduler") or "ddim"
        self.store.resolve_request(job_id, request, request["steps"] * request["num_images"])
        size = (request.get("width") or 32, request.get("height") or 32)
        if "image" in record.inputs:
            size = self.input(job_id, "image").size
        seed = request.get("seed") or 1234
        images = []
        for i in range(request["num_images"]):
            out = io.BytesIO()
            Image.new("RGB", size, (i * 40 % 256, 100, 200)).save(out, format="PNG")
            key = f"jobs/{job_id}/{i}.png"
            self.storage.put(key, out.getvalue(), "image/png")
            images.append(ImageResult(index=i, url=f"/jobs/{job_id}/images/{i}", seed=seed + i, width=size[0],
                                      height=size[1], content_type="image/png", sha256="0" * 64, key=key,
                                      settings_endpoint="/generate", settings={}))  # fmt: skip
        self.store.finish(job_id, JobStatus.SUCCEEDED, lease=LEASE, result=JobResult(images=images))


@dataclass
class CompatApp:
    client: TestClient
    store: JobStore
    worker: FakeWorker
    settings: Settings


@pytest.fixture
def compat_app(store_settings: Settings) -> Iterator[CompatApp]:
    """The app with a fake worker, the client sending alice's key, and a second model ``other``."""
    settings = store_settings.model_copy(update={"models": {"other": "models/other"}})
    store = JobStore.from_settings(settings)
    storage = storage_from_settings(settings)
    worker = FakeWorker(store, storage)
    app = create_app(settings, store=store, storage=storage, publisher=worker)
    with TestClient(app, headers=TestKeys.header(TestKeys.alice)) as client:
        yield CompatApp(client, store, worker, settings)
    if worker.hold is not None:
        worker.hold.set()
