"""Webhooks against uvicorn and a real worker, to a receiver on loopback (EBCA_WEBHOOK_ALLOW_PRIVATE):
start, throttled progress and completed arrive signed (verified with the documented SDK helper and
the key's secret from GET /keys/me); a receiver failing twice gets the event three times under one
webhook-id; a dead receiver does not delay the job; deliveries queued while the api was down go out
once it is back."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import submit
from webhook_receiver import Receiver, documented_verify

from ebca_client import verify_webhook
from ebca_common.jobs import unix_time

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: A job that runs for a few seconds on the tiny model (several progress deliveries at 1 per second).
LONG = {"prompt": "a red circle", "steps": 200, "seed": 3, "width": 32, "height": 32}
SHORT = {"prompt": "a blue square", "steps": 8, "seed": 4, "width": 32, "height": 32}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def settled(stack: Stack, job_id: str) -> dict[str, Any]:
    """The job once it ended and none of its deliveries is pending."""
    stack.wait_job(job_id, timeout=120)
    wait_until(lambda: stack.job(job_id)["webhook"]["deliveries"]["pending"] == 0, 60, "the deliveries")
    return stack.job(job_id)


def test_signed_start_throttled_progress_and_completed(events_stack: Stack) -> None:
    secret = events_stack.get("/keys/me").json()["webhook_secret"]
    with Receiver() as receiver:
        job_id = submit(events_stack, {**LONG, "webhook": receiver.url})
        job = settled(events_stack, job_id)
        seen = receiver.deliveries()
    assert job["status"] == "succeeded"
    payloads = [verify_webhook(d.body, d.headers, secret) for d in seen]
    # The ten lines docs/API.md shows agree with the SDK's helper.
    verify = documented_verify()
    assert [verify(d.body, d.headers, secret) for d in seen] == payloads
    # Deliveries run concurrently, so they may arrive out of order; docs/API.md says to order them by
    # the event's time (`data.at`), as a receiver would.
    payloads.sort(key=lambda p: unix_time(p["data"]["at"]))
    kinds = [p["type"] for p in payloads]
    assert kinds[0] == "start" and kinds[-1] == "completed" and set(kinds[1:-1]) == {"progress"}
    assert all(p["data"]["job_id"] == job_id for p in payloads)
    assert payloads[-1]["data"]["status"] == "succeeded" and payloads[-1]["data"]["result"]["images"]
    progress = [p["data"] for p in payloads if p["type"] == "progress"]
    assert len(progress) >= 2, "the job ran too briefly to show the throttle"
    steps = [d["progress"]["step"] for d in progress]
    assert steps == sorted(steps) and steps[-1] < LONG["steps"] * 2
    # At most one a second: the events they carry are a second apart (the throttle is Redis time;
    # the timestamps are the worker's, on the same machine, to the millisecond).
    times = [unix_time(d["at"]) for d in progress]
    assert all(b - a >= 0.95 for a, b in zip(times, times[1:], strict=False))
    assert len({d.headers["webhook-id"] for d in seen}) == len(seen)
    assert job["webhook"]["deliveries"] == {
        "delivered": len(seen), "pending": 0, "failed": 0, "last_error": None,
    }  # fmt: skip


def test_a_receiver_failing_twice_gets_the_event_three_times_with_one_id(events_stack: Stack) -> None:
    secret = events_stack.get("/keys/me").json()["webhook_secret"]
    with Receiver(plan=[500, 502]) as receiver:
        job_id = submit(events_stack, {**SHORT, "webhook": receiver.url, "webhook_events": ["completed"]})
        job = settled(events_stack, job_id)
        seen = receiver.deliveries()
    assert len(seen) == 3
    assert len({d.headers["webhook-id"] for d in seen}) == 1 and len({d.body for d in seen}) == 1
    assert all(verify_webhook(d.body, d.headers, secret)["type"] == "completed" for d in seen)
    # Backoff: the second retry waited longer than the first (0.3 s, then 0.6 s).
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:], strict=False)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5
    deliveries = job["webhook"]["deliveries"]
    assert (deliveries["delivered"], deliveries["failed"], deliveries["last_error"]) == (1, 0, "HTTP 502")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duration(job: dict[str, Any]) -> float:
    return unix_time(job["finished_at"]) - unix_time(job["started_at"])


def test_a_dead_receiver_does_not_delay_the_job(events_stack: Stack) -> None:
    plain = events_stack.wait_job(submit(events_stack, SHORT), timeout=120)
    hooked_id = submit(events_stack, {**SHORT, "webhook": f"http://127.0.0.1:{closed_port()}/x"})
    hooked = events_stack.wait_job(hooked_id, timeout=120)
    assert plain["status"] == hooked["status"] == "succeeded"
    # The same work with and without the dead webhook (one delivery try alone takes longer than
    # either job could lose to run-to-run noise on this machine).
    assert duration(hooked) <= duration(plain) * 2 + 1.0
    wait_until(lambda: events_stack.job(hooked_id)["webhook"]["deliveries"]["last_error"], 30, "a failed try")
    deliveries = events_stack.job(hooked_id)["webhook"]["deliveries"]
    assert deliveries["delivered"] == 0 and deliveries["pending"] >= 1
    assert "ConnectError" in deliveries["last_error"]


def test_deliveries_queued_while_the_api_is_down_go_out_when_it_is_back(events_stack: Stack) -> None:
    with Receiver() as receiver:
        job_id = submit(events_stack, {**SHORT, "webhook": receiver.url, "webhook_events": ["completed"]})
        port = int(events_stack.api_url.rsplit(":", 1)[1])
        assert events_stack.api is not None
        events_stack.api.stop()
        try:
            key = f"ebca:job:{job_id}"
            wait_until(lambda: '"succeeded"' == events_stack.redis.hget(key, "status"), 120, "the job")
            time.sleep(0.5)
            assert receiver.deliveries() == []  # nobody delivers while no api runs
        finally:
            events_stack.start_api(port)
        wait_until(lambda: len(receiver.deliveries()) == 1, 30, "the delivery")
    assert events_stack.job(job_id)["webhook"]["deliveries"]["delivered"] == 1
