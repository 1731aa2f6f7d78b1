"""Cancel (queued and running), a worker SIGKILLed mid-job, the attempt limit, and model errors that
fail the job but leave the worker healthy."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
from conftest import running_at_step, submit

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: A job that takes several seconds with the tiny model on one CPU thread (200 steps at 32x32).
SLOW = {"prompt": "a red circle", "steps": 200, "seed": 1}
QUICK = {"prompt": "a cat", "steps": 2, "seed": 1}


def ensure_workers(stack: Stack, count: int = 2) -> None:
    while len(stack.live_workers()) < count:
        stack.start_worker()
    for worker in stack.live_workers():
        stack.wait_worker(worker)


def test_cancel_running_job(stack: Stack) -> None:
    ensure_workers(stack)
    job_id = submit(stack, SLOW)
    stack.wait_job(job_id, running_at_step(3))
    response = stack.delete(f"/jobs/{job_id}", timeout=10)
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    job = stack.wait_job(job_id, timeout=30)
    assert job["status"] == "canceled"
    assert job["result"] is None and job["error"] is None
    assert 3 <= job["progress"]["step"] < 200  # stopped at a denoising step, not at the end
    assert stack.get(f"/jobs/{job_id}/images/0", timeout=10).status_code == 404


def test_cancel_queued_job_never_starts(stack: Stack) -> None:
    ensure_workers(stack)
    busy = [submit(stack, SLOW) for _ in stack.live_workers()]
    for job_id in busy:  # every worker is now running a job, so the next ones wait in the queue
        stack.wait_job(job_id, running_at_step(1))
    queued = [submit(stack, QUICK), submit(stack, QUICK)]
    first, second = (stack.job(job_id) for job_id in queued)
    assert (first["status"], first["queue_position"]) == ("queued", 0)
    assert (second["status"], second["queue_position"]) == ("queued", 1)
    response = stack.delete(f"/jobs/{queued[0]}", timeout=10)
    assert response.status_code == 202
    assert response.json()["status"] == "canceled" and response.json()["queue_position"] is None
    assert stack.job(queued[1])["queue_position"] == 0
    for job_id in busy:
        assert stack.delete(f"/jobs/{job_id}", timeout=10).status_code == 202
    # The workers now take the canceled job's message and drop it; the other queued job runs.
    assert stack.wait_job(queued[1])["status"] == "succeeded"
    for job_id in busy:
        assert stack.wait_job(job_id)["status"] == "canceled"
    assert stack.wait_job(submit(stack, QUICK))["status"] == "succeeded"
    canceled = stack.job(queued[0])
    assert canceled["status"] == "canceled"
    assert canceled["attempts"] == 0 and canceled["started_at"] is None
    assert stack.delete(f"/jobs/{queued[0]}", timeout=10).status_code == 409


def test_worker_killed_mid_job_finishes_elsewhere(stack: Stack) -> None:
    ensure_workers(stack)
    job_id = submit(stack, SLOW)
    stack.wait_job(job_id, running_at_step(3))
    victim = stack.worker_of(job_id)
    victim.stop(signal.SIGKILL)
    assert not victim.alive()
    job = stack.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert stack.worker_of(job_id) is not victim and stack.worker_of(job_id).alive()
    image = job["result"]["images"][0]
    response = stack.get(image["url"], timeout=10)
    assert response.status_code == 200 and len(response.content) > 0
    # Same seed as an undisturbed run: the crash left no trace in the result.
    again = stack.wait_job(submit(stack, {**SLOW, "steps": 200}), timeout=120)
    assert again["result"]["images"][0]["sha256"] == image["sha256"]
    ensure_workers(stack)


def test_job_that_keeps_killing_workers_fails_worker_lost(stack: Stack) -> None:
    ensure_workers(stack)
    job_id = submit(stack, SLOW)
    for attempt in (1, 2):  # EBCA_MAX_ATTEMPTS=2 in the suite
        stack.wait_job(job_id, running_at_step(2, attempts=attempt), timeout=120)
        stack.worker_of(job_id).stop(signal.SIGKILL)
        stack.start_worker(wait=False)
    job = stack.wait_job(job_id, timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "worker_lost"
    assert job["attempts"] == 2
    ensure_workers(stack)
    assert stack.wait_job(submit(stack, QUICK))["status"] == "succeeded"


def test_model_errors_fail_the_job_and_the_worker_stays_healthy(stack: Stack) -> None:
    ensure_workers(stack)
    failed = stack.wait_job(submit(stack, {**QUICK, "model": "broken"}))
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "model_not_found"
    assert "no-such-model" in failed["error"]["message"]
    worker = stack.worker_of(failed["id"])
    # A word the model's tokenizer cannot find in the prompt: invalid_input, naming the field.
    bad = stack.wait_job(submit(stack, {**QUICK, "energy": {"token_weights": {"zebra": 2.0}}}))
    assert bad["status"] == "failed"
    assert bad["error"]["code"] == "invalid_input"
    assert bad["error"]["field"].startswith("energy.token_weights")
    assert worker.alive()
    for _ in range(3):
        assert stack.wait_job(submit(stack, QUICK))["status"] == "succeeded"
    assert worker.alive()


def test_prefork_child_killed_mid_job_runs_again(prefork_stack: Stack) -> None:
    stack = prefork_stack
    job_id = submit(stack, SLOW)
    stack.wait_job(job_id, running_at_step(3), timeout=120)
    (parent,) = stack.workers
    child = stack.lease_pid(job_id)
    assert child != parent.pid  # the default pool runs jobs in a child process
    os.kill(child, signal.SIGKILL)
    # The parent notices the lost child and hands the message back (reject_on_worker_lost); a new
    # child takes the job once the dead child's heartbeat has gone stale.
    job = stack.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert stack.lease_pid(job_id) not in (child, parent.pid)
    assert parent.alive()
    assert stack.wait_job(submit(stack, QUICK))["status"] == "succeeded"  # the worker serves on
