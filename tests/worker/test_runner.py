"""JobRunner with the real job store, local storage and the tiny model (no Celery)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.exceptions import ConnectionError as RedisConnectionError

from ebca_common.jobs import JobStatus
from ebca_common.settings import Settings
from ebca_common.specs import EnergySpec, parse_generate
from ebca_common.storage import LocalStorage
from ebca_common.store import JobStore, StepVerdict
from ebca_core import Schedule
from worker import batch as batch_module
from worker import pipelines
from worker.pipelines import PipelineCache
from worker.runner import JobRunner, energy_config


class SpyStore(JobStore):
    """The real store, recording progress calls; optionally it cancels a job (``cancel_job``, else the
    first one reported) at a given step, sleeps at every step or calls ``on_step(step)`` first."""

    cancel_at: int | None = None
    cancel_job: str | None = None
    step_delay: float = 0.0
    on_step: Callable[[int], None] | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[str, int, int]] = []
        self.job_calls: list[tuple[str, str, int]] = []  # (job id, stage, step)

    def progress_many(self, lease: str, entries: list[tuple[str, str, int, int]]) -> list[StepVerdict]:
        stage, step = entries[0][1], entries[0][2]
        for job_id, stage, step, total in entries:
            self.calls.append((stage, step, total))
            self.job_calls.append((job_id, stage, step))
        if stage == "denoising":
            time.sleep(self.step_delay)
            if self.on_step is not None:
                self.on_step(step)
        if self.cancel_at is not None and stage == "denoising" and step == self.cancel_at:
            self.cancel(self.cancel_job or entries[0][0])
        return super().progress_many(lease, entries)


@pytest.fixture
def settings(store_settings: Settings, tiny_model_dir: Path) -> Settings:
    return store_settings.model_copy(update={"default_model": str(tiny_model_dir), "device": "cpu"})


@pytest.fixture
def store(settings: Settings) -> SpyStore:
    return SpyStore(JobStore.from_settings(settings).r, settings)


@pytest.fixture
def runner(settings: Settings, store: SpyStore) -> JobRunner:
    return JobRunner(store, LocalStorage(settings.storage_root), PipelineCache(settings), "test:1")


def submit(store: JobStore, settings: Settings, **body: Any) -> str:
    request = parse_generate({"prompt": "a red circle", "steps": 3, "seed": 5, **body})
    data = request.model_dump(mode="json") | {"model": settings.default_model_id}
    job, _ = store.create(
        kind="generate",
        mode=None,
        request=data,
        total_steps=request.steps,
        timeout_seconds=request.timeout_seconds,
    )
    return job.id


def test_progress_at_every_step_and_result(runner: JobRunner, store: SpyStore, settings: Settings) -> None:
    job_id = submit(store, settings, num_images=2)
    assert runner.run(job_id) == "succeeded"
    denoising = [step for stage, step, _ in store.calls if stage == "denoising"]
    # Both images are denoised together (one batch): every one of the 3 steps is recorded, in order.
    assert denoising == [0, 1, 2, 3]
    assert ("uploading", 3, 3) in store.calls
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1
    assert [i.seed for i in job.result.images] == [5, 6]
    assert [i.key for i in job.result.images] == [f"jobs/{job_id}/0.png", f"jobs/{job_id}/1.png"]
    assert job.result.images[1].settings["seed"] == 6 and job.result.images[1].settings["num_images"] == 1


def test_pipeline_loaded_once_per_process(
    runner: JobRunner, store: SpyStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real = pipelines.load_pipeline

    def counting(location: str, **kw: Any) -> Any:
        loads.append(location)
        return real(location, **kw)

    monkeypatch.setattr(pipelines, "load_pipeline", counting)
    for _ in range(3):
        assert runner.run(submit(store, settings)) == "succeeded"
    assert loads == [settings.model_table()[settings.default_model_id]]


def test_cancel_stops_at_the_next_step(runner: JobRunner, store: SpyStore, settings: Settings) -> None:
    store.cancel_at = 2
    job_id = submit(store, settings, steps=10)
    assert runner.run(job_id) == "canceled"
    job = store.get(job_id)
    assert job.status == JobStatus.CANCELED and job.result is None
    assert max(step for stage, step, _ in store.calls if stage == "denoising") == 2
    assert not (Path(settings.storage_root) / "jobs" / job_id).exists()


def test_rerun_after_a_crash_overwrites_the_same_keys(
    runner: JobRunner, store: SpyStore, settings: Settings
) -> None:
    job_id = submit(store, settings)
    store.begin(job_id, "dead:1")  # a worker took it and died (it never beats)
    assert runner.run(job_id) == "succeeded"
    first = store.get(job_id)
    assert first.attempts == 2
    # A late duplicate delivery of a finished job does nothing.
    assert runner.run(job_id) == "terminal"
    files = sorted(p.name for p in (Path(settings.storage_root) / "jobs" / job_id).iterdir())
    assert files == ["0.png"]


class BrokenCache:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def get(self, model_id: str) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory"),
        (MemoryError(), "out_of_memory"),
        (RuntimeError("something odd"), "internal_error"),
    ],
)
def test_failures_get_stable_codes(
    settings: Settings, store: SpyStore, runner: JobRunner, exc: BaseException, code: str
) -> None:
    broken = JobRunner(store, runner.storage, BrokenCache(exc), "test:2")  # type: ignore[arg-type]
    job_id = submit(store, settings)
    assert broken.run(job_id) == "failed"
    assert store.get(job_id).error.code == code
    # The process carries on: the next job runs normally.
    assert runner.run(submit(store, settings)) == "succeeded"


def test_invalid_input_names_the_field(runner: JobRunner, store: SpyStore, settings: Settings) -> None:
    job_id = submit(store, settings, energy={"gamma_attn": 0.1, "token_weights": {"zebra": 2}})
    assert runner.run(job_id) == "failed"
    error = store.get(job_id).error
    assert error.code == "invalid_input" and error.field.startswith("energy.token_weights")


def test_energy_config_translation() -> None:
    spec = EnergySpec(
        gamma_attn=0.5, gamma_norm=0.25, schedule={"kind": "exp"}, token_weights={"crown": 2, "5": 3}
    )
    config = energy_config(spec)
    assert config.gamma_attn == Schedule.from_kind("exp", 0.5, tau=1.0, ratio=1.0)
    assert config.gamma_norm == Schedule.from_kind("exp", 0.25, tau=1.0, ratio=1.0)
    assert config.token_weights == {"crown": 2.0, 5: 3.0}  # digit strings are token indices
    assert energy_config(None) is None


def test_cache_evicts_least_recently_used(
    settings: Settings, tiny_sd2_model_dir: Path, tiny_inpaint_model_dir: Path
) -> None:
    models = {"sd2": str(tiny_sd2_model_dir), "inpaint": str(tiny_inpaint_model_dir)}
    cache = PipelineCache(settings.model_copy(update={"models": models, "max_cached_models": 2}))
    default = settings.default_model_id
    first = cache.get(default)
    cache.get("sd2")
    assert cache.get(default) is first  # a hit refreshes it
    cache.get("inpaint")  # evicts sd2, the least recently used
    assert default in cache and "inpaint" in cache and "sd2" not in cache


def test_every_job_starts_from_the_models_own_scheduler(settings: Settings) -> None:
    cache = PipelineCache(settings)
    pipe = cache.get(settings.default_model_id)
    original = pipe.scheduler
    pipe.set_scheduler("euler")
    assert cache.get(settings.default_model_id).scheduler is original


def test_a_store_outage_mid_job_does_not_stop_it(
    runner: JobRunner, store: SpyStore, settings: Settings
) -> None:
    """A Redis restart while a job runs: the steps meanwhile go unrecorded, the job carries on, and its
    end is recorded once the store answers again (no attempt is spent on it)."""
    real_progress, real_finish = store.progress_many, store.finish
    finish_failures = iter([True, True])

    def flaky_progress(lease: str, entries: list[tuple[str, str, int, int]]) -> list[StepVerdict]:
        if entries[0][1] == "denoising" and entries[0][2] in (1, 2):
            raise RedisConnectionError("connection reset")
        return real_progress(lease, entries)

    def flaky_finish(*args: Any, **kwargs: Any) -> bool:
        if next(finish_failures, False):
            raise RedisConnectionError("connection refused")
        return real_finish(*args, **kwargs)

    store.progress_many = flaky_progress  # type: ignore[method-assign]
    store.finish = flaky_finish  # type: ignore[method-assign]
    job_id = submit(store, settings)
    assert runner.run(job_id) == "succeeded"
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.progress.step == 3


def test_a_job_past_its_deadline_stops_at_the_next_step(
    runner: JobRunner, store: SpyStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Clock:
        """The runner's clock, a minute ahead from step 3 on: past the job's 60 s deadline there."""

        ahead = 0.0
        perf_counter = staticmethod(time.perf_counter)
        sleep = staticmethod(time.sleep)

        @classmethod
        def time(cls) -> float:
            return time.time() + cls.ahead

    monkeypatch.setattr(batch_module, "time", Clock)
    job_id = submit(store, settings, steps=10, timeout_seconds=60)
    store.on_step = lambda step: setattr(Clock, "ahead", 61.0 if step >= 3 else 0.0)
    assert runner.run(job_id) == "timeout"
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.error.code == "timeout"
    assert "timeout_seconds=60" in job.error.message and job.result is None
    assert job.progress.step == 3  # stopped at the first step past the deadline
    Clock.ahead, store.on_step = 0.0, None
    assert runner.run(submit(store, settings)) == "succeeded"  # the worker is free at once


def test_a_job_taken_over_elsewhere_is_dropped_without_writing(
    runner: JobRunner, store: SpyStore, settings: Settings
) -> None:
    job_id = submit(store, settings, steps=10)

    def taken_over(step: int) -> None:
        if step == 2:  # the sweep found this worker's lease lapsed and another worker began the job
            store.r.hset(store.job_key(job_id), mapping=store._encode({"lease": "other:9", "attempts": 2}))

    store.on_step = taken_over
    assert runner.run(job_id) == "lease_lost"
    record = store.require(job_id)
    assert (record.status, record.lease, record.attempts) == (JobStatus.RUNNING, "other:9", 2)
    assert record.progress.step == 1 and record.result is None  # step 2 on was not written
    assert not (Path(settings.storage_root) / "jobs" / job_id).exists()


def test_a_stopping_worker_hands_its_job_back(store: SpyStore, settings: Settings) -> None:
    stopping = {"now": False}
    runner = JobRunner(
        store, LocalStorage(settings.storage_root), PipelineCache(settings), "test:1", lambda: stopping["now"]
    )
    job_id = submit(store, settings, steps=10)
    later = submit(store, settings)
    store.on_step = lambda step: stopping.update(now=step >= 2)
    assert runner.run(job_id) == "handed_back"
    job = store.get(job_id)
    # Back in line at its old place (ahead of the job submitted after it), its attempt kept.
    assert (job.status, job.queue_position, job.attempts) == (JobStatus.QUEUED, 0, 1)
    assert job.progress.stage == "queued" and job.progress.step == 0
    assert store.get(later).queue_position == 1
    stopping["now"] = False
    store.on_step = None
    assert runner.run(job_id) == "succeeded" and store.get(job_id).attempts == 2


def test_null_steps_run_the_models_own_defaults(settings: Settings) -> None:
    """The shipped shapes model's ebca_defaults.json says 20 DDIM steps at guidance 5: a request
    without them runs that, and the record says so."""
    shapes = str(Path(__file__).resolve().parents[2] / "models" / "shapes")
    settings = settings.model_copy(update={"models": {"shapes": shapes}})
    store = SpyStore(JobStore.from_settings(settings).r, settings)
    runner = JobRunner(store, LocalStorage(settings.storage_root), PipelineCache(settings), "test:1")
    request = parse_generate({"prompt": "a red circle", "model": "shapes", "seed": 1})
    job, _ = store.create(kind="generate", mode=None, request=request.model_dump(mode="json"), total_steps=0)
    assert runner.run(job.id) == "succeeded"
    assert {total for stage, _, total in store.calls if stage == "denoising"} == {20}
    done = store.get(job.id)
    assert done.progress.total == 20 and done.progress.step == 20
    used = {"steps": 20, "guidance_scale": 5.0, "scheduler": "ddim", "width": 32, "height": 32}
    assert {k: done.request[k] for k in used} == used
    assert {k: done.result.images[0].settings[k] for k in used} == used


def test_a_job_names_its_scheduler_per_call(runner: JobRunner, store: SpyStore, settings: Settings) -> None:
    """The worker passes scheduler= to ebca_core; the cached pipeline's own scheduler is never swapped."""
    pipe = runner.cache.get(settings.default_model_id)
    own = pipe.scheduler
    seen: list[str] = []
    real = pipe.check_inputs

    def spy(task: str, **kwargs: Any) -> Any:
        seen.append(kwargs.get("scheduler"))
        inputs = real(task, **kwargs)
        seen.append(type(inputs.scheduler).__name__)
        return inputs

    pipe.check_inputs = spy  # type: ignore[method-assign]
    assert runner.run(submit(store, settings, scheduler="euler")) == "succeeded"
    assert seen == ["euler", "EulerDiscreteScheduler"]
    assert pipe.scheduler is own


def test_a_real_image_edit_runs_from_the_stored_upload(
    runner: JobRunner, store: SpyStore, settings: Settings
) -> None:
    """The worker hands ebca_core the stored bytes; ebca_core's intake (the api's too) decodes them."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    key = "jobs/src/inputs/image.png"
    runner.storage.put(key, buf.getvalue(), "image/png")
    data = {
        "mode": "real",
        "source_prompt": "a red circle",
        "edits": [{"prompt": "a blue square"}],
        "steps": 2,
        "seed": 1,
        "model": settings.default_model_id,
        "image_ref": {"job_id": "src", "index": 0, "input": "image"},
    }
    job, _ = store.create(
        kind="edit", mode="real", request=data, total_steps=2, inputs={"image": key}, job_id="src"
    )
    assert runner.run(job.id) == "succeeded", store.get(job.id).error
    assert store.get(job.id).result.images[0].settings["source_prompt"] == "a red circle"
    # The edit left alpha, alpha_tau and gamma_attn null: the record shows the model's real-image "and"
    # defaults (the tiny model has no ebca_defaults.json, so the paper's Stable Diffusion values).
    (edit,) = store.get(job.id).request["edits"]
    assert (edit["alpha"], edit["alpha_tau"], edit["gamma_attn"]) == (0.75, 0.3, 5e-4)


def stored_pixels(settings: Settings, key: str) -> Any:
    import io

    import numpy as np
    from PIL import Image

    data = (Path(settings.storage_root) / key).read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_jobs_images_are_one_batch_each_equal_to_its_solo_run(
    runner: JobRunner, store: SpyStore, settings: Settings
) -> None:
    energy = {"gamma_attn": 0.05, "gamma_norm": 0.02, "token_weights": {"circle": 2}}
    batch = submit(store, settings, num_images=3, seed=40, energy=energy)
    solo = submit(store, settings, num_images=1, seed=41, energy=energy)
    assert runner.run(batch) == "succeeded" and runner.run(solo) == "succeeded"
    images = store.get(batch).result.images
    assert [i.seed for i in images] == [40, 41, 42]
    assert images[1].settings["seed"] == 41 and images[1].settings["num_images"] == 1
    second, alone = stored_pixels(settings, images[1].key), stored_pixels(settings, f"jobs/{solo}/0.png")
    # Image 1 of the batch and its settings run alone: one batch of three rounds its float32 sums
    # differently from a single row (~1e-6 relative), which may flip a saved 8-bit channel by one
    # level, never more.
    assert int(abs(second - alone).max()) <= 1
    assert int(abs(second - stored_pixels(settings, images[0].key)).max()) > 8, "other seed, other image"
