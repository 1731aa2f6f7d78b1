"""Coalescing (issue 13): a starting generate job takes compatible queued jobs into its batch; each
job keeps its own record. JobRunner with the real job store, local storage and the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_runner import SpyStore, stored_pixels, submit

from ebca_common.jobs import JobStatus
from ebca_common.settings import Settings
from ebca_common.storage import LocalStorage
from ebca_common.store import JobStore
from worker.pipelines import PipelineCache
from worker.runner import JobRunner

ENERGY = {"gamma_attn": 0.05, "gamma_norm": 0.02, "token_weights": {"circle": 2}}


@pytest.fixture
def settings(store_settings: Settings, tiny_model_dir: Path) -> Settings:
    return store_settings.model_copy(update={"default_model": str(tiny_model_dir), "device": "cpu"})


@pytest.fixture
def store(settings: Settings) -> SpyStore:
    return SpyStore(JobStore.from_settings(settings).r, settings)


class Holdings(set):  # type: ignore[type-arg]
    """A heartbeat's holdings that remember every job ever listed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def add(self, job_id: str) -> None:
        self.seen.add(job_id)
        super().add(job_id)


def make_runner(settings: Settings, store: SpyStore, max_batch: int = 8, **kw: Any) -> JobRunner:
    cache = PipelineCache(settings)
    return JobRunner(store, LocalStorage(settings.storage_root), cache, "test:1", max_batch=max_batch, **kw)


def three_different(store: SpyStore, settings: Settings) -> list[str]:
    """Compatible jobs (same model, steps, guidance, scheduler, size) that differ in everything else."""
    return [
        submit(store, settings, prompt="a red circle", seed=11, energy=ENERGY),
        submit(store, settings, prompt="a blue square", seed=12, negative_prompt="green", num_images=2),
        submit(store, settings, prompt="a green circle", seed=13, output_format="webp",
               energy={"gamma_attn": 0.2, "schedule": {"kind": "exp", "tau": 0.5}}),
    ]  # fmt: skip


def test_queued_compatible_jobs_share_the_batch_and_keep_their_records(
    store: SpyStore, settings: Settings
) -> None:
    lead = submit(store, settings, seed=10)
    partners = three_different(store, settings)
    later = submit(store, settings, steps=4)  # another step count: not in this batch
    holdings = Holdings()
    runner = make_runner(settings, store, holdings=holdings)
    seen_during: list[set[str]] = []
    store.on_step = lambda step: seen_during.append(set(holdings))
    assert runner.run(lead) == "succeeded"
    # Every claimed job was listed in the heartbeat while it ran, and is no longer afterwards.
    assert seen_during and all(set(partners) <= s for s in seen_during) and holdings.seen == set(partners)
    assert not holdings
    for job_id, seed in zip([lead, *partners], [10, 11, 12, 13], strict=True):
        job = store.get(job_id)
        assert job.status == JobStatus.SUCCEEDED and job.attempts == 1, job
        assert job.result.images[0].seed == seed and job.progress.step == job.progress.total == 3
    assert store.get(partners[1]).result.images[1].seed == 13  # its seed 12 + 1
    assert store.get(partners[2]).result.images[0].content_type == "image/webp"
    # One progress write per job and step: all four jobs report every step of the one batch.
    steps = {job_id: [s for j, stage, s in store.job_calls if j == job_id and stage == "denoising"]
             for job_id in [lead, *partners]}  # fmt: skip
    assert all(s == [0, 1, 2, 3] for s in steps.values()), steps
    assert store.get(later).status == JobStatus.QUEUED
    # A late delivery of a claimed job finds it finished and is dropped.
    assert runner.run(partners[0]) == "terminal"


def test_a_job_in_a_batch_equals_the_same_job_alone(store: SpyStore, settings: Settings) -> None:
    """The per-row processor state keeps each job's rows independent: the same job alone and inside a
    batch of three different jobs gives the same image to round-off."""
    runner = make_runner(settings, store)
    body = {"prompt": "a red circle", "seed": 21, "energy": ENERGY}
    alone = submit(store, settings, **body)
    assert runner.run(alone) == "succeeded"
    others = three_different(store, settings)
    batched = submit(store, settings, **body)
    assert runner.run(others[0]) == "succeeded"
    assert store.get(batched).status == JobStatus.SUCCEEDED
    a = stored_pixels(settings, store.get(alone).result.images[0].key)
    b = stored_pixels(settings, store.get(batched).result.images[0].key)
    # Four jobs' rows run other float32 blockings than one row (~1e-6 relative): at most one 8-bit
    # level; a leak of another job's energy or prompt changes pixels by far more.
    assert int(abs(a - b).max()) <= 1
    c = stored_pixels(settings, store.get(others[0]).result.images[0].key)
    assert int(abs(a - c).max()) > 8, "another job's image really differs"


def test_coalescing_keeps_queue_order_and_the_limits(store: SpyStore, settings: Settings) -> None:
    runner = make_runner(settings, store, max_batch=4)
    lead = submit(store, settings, num_images=2)
    big = submit(store, settings, num_images=3)  # 2 + 3 rows > 4: stops here
    small = submit(store, settings)  # would fit, but must not overtake `big`
    assert runner.run(lead) == "succeeded"
    assert store.get(big).status == store.get(small).status == JobStatus.QUEUED
    assert runner.run(big) == "succeeded"  # takes `small` along (3 + 1 rows)
    assert store.get(small).status == JobStatus.SUCCEEDED
    # The pixel budget: 32x32 images, a budget of two of them.
    tight = make_runner(settings, store, batch_max_pixels=2 * 32 * 32)
    ids = [submit(store, settings) for _ in range(3)]
    assert tight.run(ids[0]) == "succeeded"
    assert [store.get(i).status for i in ids[1:]] == [JobStatus.SUCCEEDED, JobStatus.QUEUED]
    # EBCA_MAX_BATCH=1: no coalescing.
    off = make_runner(settings, store, max_batch=1)
    assert off.run(ids[2]) == "succeeded"
    ids = [submit(store, settings) for _ in range(2)]
    assert off.run(ids[0]) == "succeeded" and store.get(ids[1]).status == JobStatus.QUEUED


def test_edit_jobs_do_not_coalesce(store: SpyStore, settings: Settings) -> None:
    runner = make_runner(settings, store)
    lead = submit(store, settings, edits=[{"prompt": "a blue circle"}])
    plain = submit(store, settings)
    assert runner.run(lead) == "succeeded" and store.get(plain).status == JobStatus.QUEUED
    assert runner.run(plain) == "succeeded"


def test_a_claimed_job_that_fails_validation_fails_alone(store: SpyStore, settings: Settings) -> None:
    runner = make_runner(settings, store)
    lead = submit(store, settings)
    bad = submit(store, settings, energy={"gamma_attn": 0.1, "token_weights": {"zebra": 2}})
    good = submit(store, settings, seed=9)
    assert runner.run(lead) == "succeeded"
    error = store.get(bad).error
    assert store.get(bad).status == JobStatus.FAILED and error.code == "invalid_input"
    assert error.field.startswith("energy.token_weights")
    assert store.get(good).status == JobStatus.SUCCEEDED


def test_a_lead_that_fails_validation_fails_alone_and_its_partners_run(
    store: SpyStore, settings: Settings
) -> None:
    runner = make_runner(settings, store)
    bad = submit(store, settings, energy={"gamma_attn": 0.1, "token_weights": {"zebra": 2}})
    partners = [submit(store, settings, seed=s) for s in (8, 9)]
    assert runner.run(bad) == "failed"
    assert store.get(bad).error.code == "invalid_input"
    assert [store.get(p).status for p in partners] == [JobStatus.SUCCEEDED] * 2
    assert [store.get(p).attempts for p in partners] == [1, 1]


def test_a_canceled_job_leaves_the_batch_the_others_go_on(store: SpyStore, settings: Settings) -> None:
    runner = make_runner(settings, store)
    lead = submit(store, settings, steps=8)
    victim = submit(store, settings, steps=8, seed=6)
    other = submit(store, settings, steps=8, seed=7)
    store.cancel_at, store.cancel_job = 2, victim
    assert runner.run(lead) == "succeeded"
    job = store.get(victim)
    assert job.status == JobStatus.CANCELED and job.result is None and job.progress.step <= 2
    # Its progress stops at the step where the cancel was seen; the others report every step.
    assert max(s for j, stage, s in store.job_calls if j == victim and stage == "denoising") <= 3
    assert store.get(other).status == JobStatus.SUCCEEDED and store.get(other).progress.step == 8
    assert not (Path(settings.storage_root) / "jobs" / victim).exists()


def test_a_stopping_worker_hands_the_whole_batch_back(store: SpyStore, settings: Settings) -> None:
    stopping = {"now": False}
    runner = make_runner(settings, store, stopping=lambda: stopping["now"])
    ids = [submit(store, settings, steps=8, seed=s) for s in (1, 2, 3)]
    store.on_step = lambda step: stopping.update(now=step >= 2)
    assert runner.run(ids[0]) == "handed_back"
    assert runner.handed_back == ids
    jobs = [store.get(i) for i in ids]
    assert [(j.status, j.queue_position, j.attempts) for j in jobs] == [
        (JobStatus.QUEUED, 0, 1), (JobStatus.QUEUED, 1, 1), (JobStatus.QUEUED, 2, 1)
    ]  # fmt: skip


def test_a_batch_whose_jobs_all_end_stops(store: SpyStore, settings: Settings) -> None:
    runner = make_runner(settings, store)
    ids = [submit(store, settings, steps=10, seed=s) for s in (1, 2)]
    store.on_step = lambda step: [store.cancel(i) for i in ids] if step == 2 else None
    assert runner.run(ids[0]) == "canceled"
    assert [store.get(i).status for i in ids] == [JobStatus.CANCELED] * 2
    # Both cancels are seen at step 2: the batch stops there instead of running its 10 steps.
    assert max(s for _, stage, s in store.job_calls if stage == "denoising") == 2
