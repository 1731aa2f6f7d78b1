"""Coalescing on the real service (issue 13): one solo worker with the default EBCA_MAX_BATCH takes
the compatible jobs queued behind the one it starts into one batch. Each job keeps its own seed,
prompt, energy, cancel and record, and a worker SIGKILLed mid-batch loses none of them."""

from __future__ import annotations

import io
import json
import signal
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import submit
from PIL import Image
from testkeys import TestKeys

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Keeps the worker busy while the jobs to coalesce are queued behind it (another step count, so it
#: does not take them along itself).
BLOCKER = {"prompt": "a cat", "steps": 40, "seed": 1}
STEPS = 6


def jobs_to_batch(steps: int = STEPS) -> list[dict[str, Any]]:
    """Compatible jobs (same model, steps, guidance, scheduler, size) that differ in everything else."""
    return [
        {"prompt": "a red circle", "seed": 11, "steps": steps,
         "energy": {"gamma_attn": 0.05, "gamma_norm": 0.02, "token_weights": {"circle": 2}}},
        {"prompt": "a blue square", "seed": 12, "steps": steps, "negative_prompt": "green"},
        {"prompt": "a green circle", "seed": 13, "steps": steps, "num_images": 2,
         "energy": {"gamma_attn": 0.2, "schedule": {"kind": "exp", "tau": 0.5}}},
    ]  # fmt: skip


def behind_a_busy_worker(stack: Stack, bodies: list[dict[str, Any]]) -> list[str]:
    """Queue ``bodies`` while the worker runs a blocker, so that it finds them all queued next."""
    blocker = submit(stack, BLOCKER)
    stack.wait_job(blocker, lambda job: job["status"] == "running")
    ids = [submit(stack, body) for body in bodies]
    assert stack.wait_job(blocker)["status"] == "succeeded"
    return ids


def pixels(stack: Stack, image: dict[str, Any]) -> np.ndarray:
    response = stack.get(image["url"], timeout=10)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def one_batch(stack: Stack, jobs: list[dict[str, Any]]) -> bool:
    """Whether the jobs ran in one batch: the same worker, each its own attempt, started together."""
    leases = {json.loads(stack.redis.hget(f"ebca:job:{job['id']}", "lease")) for job in jobs}
    started = sorted(job["started_at"] for job in jobs)
    return len(leases) == 1 and started[-1][:19] == started[0][:19]


def running_batch(stack: Stack) -> list[str]:
    """Three long jobs queued behind a blocker, then running together (at step 3 or later)."""
    blocker = submit(stack, BLOCKER)
    stack.wait_job(blocker, lambda job: job["status"] == "running")
    ids = [submit(stack, body) for body in jobs_to_batch(steps=150)]
    running = [stack.wait_job(job_id, lambda j: j["progress"]["step"] >= 3, timeout=120) for job_id in ids]
    assert one_batch(stack, running)
    return ids


def test_coalesced_jobs_each_succeed_with_their_own_settings(batching_stack: Stack) -> None:
    bodies = jobs_to_batch()
    ids = behind_a_busy_worker(batching_stack, bodies)
    batched = [batching_stack.wait_job(job_id) for job_id in ids]
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in batched), batched
    assert one_batch(batching_stack, batched)
    for body, job in zip(bodies, batched, strict=True):
        seeds = [image["seed"] for image in job["result"]["images"]]
        assert seeds == [body["seed"] + i for i in range(body.get("num_images", 1))]
        assert job["request"]["prompt"] == body["prompt"]
        assert job["progress"] == {"stage": "done", "step": STEPS, "total": STEPS}
    # The same jobs alone (each submitted to an idle worker): the same pictures to round-off. One
    # batch of five rows sums in other orders than one or two rows (~1e-6 relative), which may move a
    # saved 8-bit channel by one level, never more; another job's prompt or energy leaking into a row
    # would change it by far more.
    for body, job in zip(bodies, batched, strict=True):
        alone = batching_stack.wait_job(submit(batching_stack, body))
        assert alone["status"] == "succeeded"
        for mine, theirs in zip(job["result"]["images"], alone["result"]["images"], strict=True):
            assert int(np.abs(pixels(batching_stack, mine) - pixels(batching_stack, theirs)).max()) <= 1
    first, second = (pixels(batching_stack, job["result"]["images"][0]) for job in batched[:2])
    assert int(np.abs(first - second).max()) > 8, "different jobs, different images"
    metrics = batching_stack.get("/metrics", key=TestKeys.root).text
    assert "ebca_batch_images_bucket" in metrics and "ebca_batch_images_per_second_count" in metrics


def test_cancel_of_one_job_inside_a_batch(batching_stack: Stack) -> None:
    ids = running_batch(batching_stack)
    asked = time.monotonic()
    assert batching_stack.delete(f"/jobs/{ids[1]}", timeout=10).status_code == 202
    canceled = batching_stack.wait_job(ids[1], timeout=30)
    took = time.monotonic() - asked
    others = [batching_stack.job(ids[0]), batching_stack.job(ids[2])]
    # Ended at the next step, while the rest of the batch still runs.
    assert canceled["status"] == "canceled" and canceled["result"] is None, canceled
    assert all(job["status"] == "running" for job in others), others
    print(f"\ncancel inside a batch -> canceled: {took:.2f} s")
    for job_id in (ids[0], ids[2]):
        done = batching_stack.wait_job(job_id, timeout=180)
        assert done["status"] == "succeeded" and done["progress"]["step"] == 150, done
    assert batching_stack.get(f"/jobs/{ids[1]}/images/0", timeout=10).status_code == 404


def test_a_worker_killed_mid_batch_loses_no_job(batching_stack: Stack) -> None:
    ids = running_batch(batching_stack)
    victim = batching_stack.worker_of(ids[0])
    victim.stop(signal.SIGKILL)
    assert not victim.alive()
    batching_stack.start_worker()
    # The sweep finds every claimed job's lease lapsed (the dead process listed them all in its
    # holdings) and puts each back in line; the new worker runs them again, as a batch again.
    done = [batching_stack.wait_job(job_id, timeout=240) for job_id in ids]
    assert all(job["status"] == "succeeded" and job["attempts"] == 2 for job in done), done
    assert batching_stack.worker_of(ids[0]) is not victim
